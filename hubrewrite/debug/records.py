"""What mitmweb and saved flows keep of a client flow: never a usable credential.

mitmproxy hands every addon the same flow object and sends what that object
holds. When each party reads it (mitmproxy 12: ``proxy/layers/http/__init__.py``,
``addons/view.py``, ``addons/save.py``, ``tools/web/``):

- mitmweb's view takes the flow itself in ``requestheaders``, right after the
  addon's hook, and pushes it to the UI's websocket then, and again after every
  later hook of the flow (``request``, ``responseheaders``, ``response``,
  ``error``: mitmproxy runs an ``update`` hook after each, ``addonmanager.py``
  ``handle_lifecycle``), each time before mitmproxy acts on it; its REST API
  (``/flows``, the content views, ``content.data``, ``/flows/dump``) reads the
  live object whenever asked.
  ``save_stream_file`` (``-w``) serializes it in ``response`` and ``error``,
  after the addon's hooks.
- A request is sent after the ``request`` hook (its head right after
  ``requestheaders`` when its body is streamed, as a push's is).
- A buffered answer, which every answer an addon makes is, is sent after the
  ``response`` hook, as the hooks left it. A streamed one has its head sent
  after ``responseheaders`` and its body as it arrives, all before
  ``response``. An answer without a body (to a HEAD) is never streamed.

So each part of the record is made safe at the first moment it may be:

1. ``requestheaders`` (``open_record``): the client's credential headers become
   fingerprints before the view shows the flow. The mirror has kept the
   client's ``Authorization`` in the ``ClientRequest`` and puts on the wire only what
   goes upstream (``addon._retarget``). In ``request``, once its body is in, a
   token form's password and refresh token likewise (``redact_request_record``;
   the ``ClientRequest`` keeps the form).
2. Once the request is sent (``responseheaders``, ``response``, ``error``; at
   once when the mirror answers it itself), ``close_request``: the client's URL
   instead of where the mirror sent it (a path on the loopback server, a signed
   storage URL), signed query parameters as fingerprints, mitmproxy's
   ``proxyauth`` password too. Where a flow points on the loopback server is no
   secret: that server answers only the connection mitmproxy opened for that
   flow (``loopback.py``), so the flow carries no key to it at any moment.
3. An answer carrying a credential (a token answer; a 307 to a signed listener
   or presigned bucket URL) is, while flows are recorded, parked on the
   loopback server and fetched from there streamed (``hideable``), so its
   bytes have left when the ``response`` hook makes its record the redacted
   answer (``close_response``). A HEAD's answer cannot be streamed: while flows
   are recorded, the mirror answers blob HEADs itself instead of redirecting
   them (``paths/blobs.py``).

Why not simpler: the record is the object mitmproxy sends, so rewriting it in
``response`` rewrites what the client gets; view and save take that object, not
a copy the addon could give them; putting the secret back after they looked
would leave it in the view for good. The loopback hop costs each token answer
and each redirect one more local exchange: 1 to 5 ms of mitmdump's CPU on two
busy cores (measured with -w, 500 requests x 3: a token request 7.3 -> 9.1 and
13.2 -> 16.2 ms, a 307 4.6 -> 5.4 and 6.1 -> 11.1 ms, in two runs), a few per
request. It is paid only while something records flows (``Settings.records_flows``):
mitmdump without ``-w`` sends those answers as before and prints redacted copies
(``debug/dumper_redaction.py``).

Still visible, briefly: what a request retargeted away from the mirror carries
between the ``request`` hook and its answer's head (a signed storage URL, the
upstream token of a blob the registry serves itself), in the websocket's push
right after that hook and to someone polling the REST API; and a push's
(``hub_allow_push``) credentials, whose head mitmproxy sends after the view has
shown the flow.
"""

from __future__ import annotations

from mitmproxy import http

from ..loopback import restore_client_url
from .fingerprint import fingerprint
from .redact import carries_credential, redact_headers, redact_metadata, redact_request, redact_response

# the body of a redirect sent through the loopback server: a streamed answer needs one
REDIRECT_BODY = b"Temporary Redirect.\n"


def open_record(flow: http.HTTPFlow) -> None:
    """The request's credential headers as fingerprints, before mitmweb first shows the flow."""
    redact_headers(flow.request.headers)


def close_request(flow: http.HTTPFlow, client_authorization: str | None, show_secrets: bool) -> None:
    """The request as the client made it, its credentials (used by now) as fingerprints."""
    restore_client_url(flow)
    if not show_secrets:
        redact_request_record(flow, client_authorization)


def redact_request_record(flow: http.HTTPFlow, client_authorization: str | None) -> None:
    """The request's credentials, form and signed query parameters as fingerprints, wherever it points."""
    redact_request(flow.request)
    if client_authorization:
        # what the client sent (its token answer shows the same digits), not what went upstream
        flow.request.headers["Authorization"] = fingerprint(client_authorization)
    redact_metadata(flow)


def hideable(answer: http.Response, method: str) -> http.Response | None:
    """``answer`` made fit to be streamed from the loopback server, if its record must differ from it."""
    if method == "HEAD" or not carries_credential(answer):
        return None
    if not answer.raw_content:
        answer.content = REDIRECT_BODY
    return answer


def close_response(flow: http.HTTPFlow, sent: http.Response) -> None:
    """The record of an answer streamed from the loopback server: ``sent``, redacted."""
    response = flow.response
    if response is None:
        return
    response.raw_content = sent.raw_content  # a streamed body is not kept: the one that was sent
    redact_response(response)
