"""The mitmproxy addons of the mirror: options and lifecycle, hooks that guard and delegate.

A request's way through the files (reverse mode, a blob GET):

1. ``requestheaders``: ``admission.admit`` builds a ``ClientRequest`` (registry, route,
   client view, identity, upstream headers) and applies every gate (grammar,
   rules, accounts, method, body) before any byte goes anywhere; the flow is
   pointed at the mirror's loopback server until it is answered.
2. ``request``: ``paths.serve`` hands the ClientRequest to its path (``paths/blobs.py``),
   which answers with a response or a ``Retarget``; the addon applies it.
3. ``responseheaders`` streams a retargeted answer, ``response``/``error``
   write its log line and metrics (``observe/summaries.py``).

Along the way the flow's record (what mitmweb and saved flows keep) loses its
credentials as soon as each may go: ``debug/records.py``.
"""

from __future__ import annotations

import asyncio
import logging

from mitmproxy import connection, ctx, exceptions, http
from mitmproxy.proxy import mode_specs, server_hooks

from . import paths
from .admission import admit, carries_body, place_of
from .certificates import CertificateRenewal
from .check import listener_line, report
from .connwork import ConnectionWork
from .debug import contentviews, records
from .debug.dumper_redaction import DumperRedaction
from .debug.redact import redact_metadata
from .debug.sideflows import is_side_flow, serving
from .forwardproxy import ForwardProxy
from .guard import ConnectionGuard
from .h2streams import PieceReading, body_disagrees_with_length, reset_as_malformed
from .loopback import CLIENT_URL
from .mirror import Mirror
from .mitmseams.connections import close_client
from .mitmseams.tools import command_line_options
from .observe import logformat, summaries
from .observe.metrics import CountingStream
from .client_request import ClientRequest, RequestKind, Retarget, TransferSource
from .registry import headers as hdrs
from .registry.errors import RegistryError
from .util.bounded_dict import BoundedDict
from .responses import CORS_HEADERS, add_missing, error_response, without_body_for_head
from .config_file import apply_config_file
from .settings import declare, read_settings
from .paths.blobs import replace_storage_error

log = logging.getLogger("hub_rewrite")

# how many client flows may be in flight at once before the oldest's ClientRequest is forgotten
MAX_REQUESTS = 100_000


class HubRewrite:
    def __init__(self) -> None:
        self.mirror: Mirror | None = None
        # client flow id -> the ClientRequest it became; not in flow.metadata, which mitmproxy copies
        # and saves (-w) with every flow: live objects (downloads, tasks) do not belong there
        self.requests = BoundedDict(MAX_REQUESTS)
        self.certificates = CertificateRenewal()
        # one concern each, mitmproxy style: sub-addons get every hook after this one
        guard = ConnectionGuard(lambda: self.mirror.budget if self.mirror is not None else None)
        self.work = ConnectionWork(close_client, guard.count)  # HTTP/2 streams reset while served
        self.addons = [
            ForwardProxy(lambda: self.mirror),
            guard,
            PieceReading(),  # after the guard, which decides a connection's first layer
            DumperRedaction(lambda: self.mirror is not None and self.mirror.settings.show_secrets),
            self.certificates,
        ]
        self.check_report: list[str] | None = None  # hub_check: what would be served
        self.configured = False  # a first configuration has been taken (later errors are refusals)
        self.startup_error: str | None = None  # the problem that stops the start (or fails the check)

    # ---- options and lifecycle ---------------------------------------------

    def load(self, loader) -> None:
        declare(loader)
        contentviews.register()  # registry payloads decoded in mitmweb (and the dumper's detail levels)

    def configure(self, updated: set[str]) -> None:
        try:
            self._configure(updated)
        except exceptions.OptionsError as e:
            if self.configured and not ctx.options.hub_check:
                raise  # a later change: mitmproxy refuses it and keeps the previous value
            # At startup (and in a check) the answer is one line and exit status 1, not a
            # traceback: an error logged at startup makes mitmdump exit. A mirror running with
            # half its configuration would be worse than none.
            if str(e) != self.startup_error:
                self.startup_error = str(e)
                log.error("hub_rewrite: check: %s" if ctx.options.hub_check else "hub_rewrite: %s; stopping", e)
                _stop_later(getattr(ctx, "master", None))
            return
        self.configured = True

    def _configure(self, updated: set[str]) -> None:
        applied = None
        if "hub_config" in updated:
            # Here, not in load(): command-line --set values of addon options are
            # applied only after load(), and they must win over the file.
            applied = apply_config_file(ctx.options, command_line_options(ctx.master))
        settings = read_settings(ctx.options)
        logformat.use(settings.log_format)  # before the mirror logs anything more
        if applied:
            log.info("hub_rewrite: options loaded from %s", applied)
        if "certs" in updated or "cert_passphrase" in updated:
            self.certificates.use(ctx.options.certs, ctx.options.cert_passphrase)
        if self.mirror is None:
            self.mirror = Mirror(settings)
        if settings.check:
            # nothing opened, bound or written: the running mirror may be using all of it
            self.mirror.settings = settings
            listeners = [listener_line(spec, ctx.options.listen_host, ctx.options.listen_port,
                                       bool(ctx.options.certs)) for spec in ctx.options.mode]
            self.check_report = report(settings, listeners, self.certificates.watched)
            return
        self.mirror.apply(settings, self.certificates.listener)
        if settings.upstream_credentials.registries():
            log.info("hub_rewrite: server-side upstream credentials for %s",
                     ", ".join(settings.upstream_credentials.registries()))

    async def running(self) -> None:
        if self.startup_error is not None:
            return  # mitmdump is exiting with status 1
        if self.check_report is not None:
            for line in self.check_report:
                log.info("hub_rewrite: check: %s", line)
            log.info("hub_rewrite: check: configuration OK; nothing was started")
            ctx.master.shutdown()
            return
        await self.mirror.client.warm_up()  # once, here: start() below also runs on every request
        await self.mirror.start()

    async def done(self) -> None:
        contentviews.unregister()
        if self.mirror is not None:
            await self.mirror.close()

    # ---- hooks -----------------------------------------------------------

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live or is_side_flow(flow):
            return
        if self.mirror is None:
            flow.kill()  # the options stopped the start: nothing is served, nothing passes
            return
        if not self.work.arrived(flow):
            flow.kill()  # its connection was closed for resetting streams: nothing more of it is served
            return
        place = place_of(flow, self.mirror.settings.registries)
        if place is None:
            return  # forward-proxy traffic for another host, passed through
        await self.mirror.start()
        serving.set(flow)  # the mirror's exchanges from here on are this flow's side flows
        request, refusal = await admit(flow, self.mirror, *place)
        self.requests.put(flow.id, request)
        if not self.mirror.settings.show_secrets:
            records.open_record(flow)  # before mitmweb's view (the next addon) first shows the flow
        if refusal is not None:
            request.settled = True
            self._refuse(flow, refusal)
        elif request.kind is RequestKind.API and request.method not in ("GET", "HEAD"):
            self._apply(request, await paths.serve(request, self.mirror))  # a push, streamed from here on
            flow.request.stream = True
        else:
            # Until the request hook answers, the flow points at the mirror: whatever
            # mitmproxy might do with it by itself only ever reaches the mirror.
            self.mirror.loopback.park(flow)
            flow.request.stream = False  # a token form is short and read whole

    async def request(self, flow: http.HTTPFlow) -> None:
        if body_disagrees_with_length(flow.request):
            reset_as_malformed(flow)  # RFC 9113 §8.1.1, before any work for it
            return
        request: ClientRequest | None = self.requests.get(flow.id)
        if request is None or request.settled or flow.response or flow.error or flow.request.stream:
            return  # not ours, answered, or streaming where requestheaders sent it
        if flow.request.raw_content and request.kind is not RequestKind.TOKEN:
            # a body announced by no header (HTTP/2): refused like any other
            flow.response = error_response(RegistryError(400, "UNSUPPORTED", "this request must not carry a body"))
            return
        request.client_body = flow.request.raw_content or b""
        if not self.mirror.settings.show_secrets:
            records.redact_request_record(flow, request.client_authorization)  # its form's password too, from now on
        serving.set(flow)
        async with self.work.turn(flow.client_conn) as ours:
            if not ours:
                if flow.killable:
                    flow.kill()  # its connection is gone: nobody waits for the answer
                return
            try:
                answer = await paths.serve(request, self.mirror)
            except Exception:
                # A bug must never let the request through unchecked.
                log.exception("hub_rewrite: internal error on %s %s", flow.request.method, request.path)
                answer = error_response(RegistryError(500, "UNKNOWN", "internal error in the mirror"))
        self._apply(request, answer)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        request: ClientRequest | None = self.requests.get(flow.id)
        if request is None or flow.response is None:
            return
        self._close_request(request)  # the request has gone by now
        if request.hidden is not None:
            # sent from the loopback server as it arrives, so its record can be redacted in response()
            counted = summaries.counting(request, self.mirror.metrics, request.summary.source)
            flow.response.stream = CountingStream(counted)
            return
        if request.transfer is None:
            return
        response, transfer = flow.response, request.transfer
        if 200 <= response.status_code < 300:
            # The bytes go to the client as they arrive: blobs can be many GB.
            source = "cache" if transfer.source is TransferSource.CACHE else "upstream"
            response.stream = CountingStream(summaries.counting(request, self.mirror.metrics, source))
            self.mirror.metrics.in_flight.inc()
            request.summary.in_flight = True
            add_missing(response, transfer.headers)
            add_missing(response, CORS_HEADERS)
        # error answers are small: left buffered for response() to replace

    def response(self, flow: http.HTTPFlow) -> None:
        if self.mirror is None:
            return  # never started (see requestheaders)
        self.work.finished(flow)
        request: ClientRequest | None = self.requests.pop(flow.id, None)
        self._close_record(flow, request)
        if request is None:
            return
        if request.transfer is not None and flow.response is not None:
            replaced = replace_storage_error(request.transfer, flow.response)
            if replaced is not None:
                add_missing(replaced, CORS_HEADERS)
                flow.response = without_body_for_head(flow.request.method, replaced)
        summaries.finish(request, self.mirror.metrics, self.mirror.sources)

    def error(self, flow: http.HTTPFlow) -> None:
        if self.mirror is None:
            return  # never started (see requestheaders)
        self.work.finished(flow)
        request: ClientRequest | None = self.requests.pop(flow.id, None)
        self._close_record(flow, request)
        if request is not None:
            if request.transfer is not None and flow.error:
                log.warning("blob %s transfer from %s failed: %s", request.transfer.digest, flow.request.host,
                            flow.error.msg)
            summaries.finish(request, self.mirror.metrics, self.mirror.sources)

    def client_disconnected(self, client: connection.Client) -> None:
        self.work.disconnected(client)

    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        # keep_host_header (mitm.conf) leaves the reverse target's TLS server
        # name unset, and mitmproxy would then send the client's (the mirror's
        # own name) upstream.
        if isinstance(data.client.proxy_mode, mode_specs.ReverseMode) and data.server.sni is None and data.server.address:
            data.server.sni = data.server.address[0]

    def _close_record(self, flow: http.HTTPFlow, request: ClientRequest | None) -> None:
        """The flow as mitmweb, saved flows and the log keep it: the client's request and
        the answer it got, their credentials (used by now) as fingerprints."""
        show_secrets = self.mirror.settings.show_secrets
        self.mirror.loopback.forget(flow)
        if request is not None:
            self._close_request(request)
            if request.hidden is not None and not show_secrets:
                records.close_response(flow, request.hidden)
        elif CLIENT_URL in flow.metadata:  # a saved flow loaded again (mitmweb -r)
            records.close_request(flow, None, show_secrets)
        elif not show_secrets:
            redact_metadata(flow)  # traffic passed through: the proxy's own password, if proxyauth kept it

    def _close_request(self, request: ClientRequest) -> None:
        records.close_request(request.flow, request.client_authorization, self.mirror.settings.show_secrets)

    # ---- answers -----------------------------------------------------------

    def _apply(self, request: ClientRequest, answer) -> None:
        flow = request.flow
        request.settled = True
        if isinstance(answer, Retarget):
            self._retarget(request, answer)
            return
        add_missing(answer, CORS_HEADERS)
        answer = without_body_for_head(flow.request.method, answer)
        if self.mirror.settings.records_flows:
            request.hidden = records.hideable(answer, flow.request.method)
        if request.hidden is not None:
            self.mirror.loopback.park(flow, request.hidden)  # its bytes leave before its record is redacted
        else:
            flow.response = answer
            self._close_request(request)  # answered here: the request goes nowhere

    def _retarget(self, request: ClientRequest, answer: Retarget) -> None:
        sent = request.flow.request
        # the client's credentials (their fingerprints, in the record) go nowhere: storage services
        # reject them; the registry itself gets what admission made of them (never a mirror-issued token)
        for name in hdrs.CREDENTIAL_HEADERS:
            sent.headers.pop(name, None)
        if answer.keep_credentials and request.authorization:
            sent.headers["Authorization"] = request.authorization
        if answer.loopback:
            self.mirror.loopback.point_here(request.flow, answer.url)
        else:
            sent.url = answer.url
        request.transfer = answer.transfer

    def _refuse(self, flow: http.HTTPFlow, refusal: http.Response) -> None:
        add_missing(refusal, CORS_HEADERS)
        refusal = without_body_for_head(flow.request.method, refusal)
        if carries_body(flow.request):
            self.mirror.loopback.park(flow, refusal)  # answered once its body is drained
        else:
            flow.response = refusal


def _stop_later(master, delay: float = 2.0) -> None:
    if master is None or not hasattr(master, "shutdown"):
        return
    try:
        asyncio.get_running_loop().call_later(delay, master.shutdown)
    except RuntimeError:
        pass  # no loop (tests): nothing is serving
