"""Layers the mirror puts above a client connection's own, in mitmproxy's proxy core.

Relies on: the proxy core's layer protocol (``Layer.handle_event`` takes an event
and yields commands, running ``_handle_event`` under its pausing), the events
``Start``, ``DataReceived`` and ``Wakeup``, the commands ``RequestWakeup``,
``SendData`` and ``CloseConnection``, the HTTP layer's hook commands that mark a
parsed request head, ``Context.layers`` (the stack the nextlayer addon matches
to decide), and the nextlayer addon itself: its ``next_layer`` method, and that
script addons' hooks run before it (``ScriptLoader`` precedes ``NextLayer`` in
mitmproxy's default addons).
Why: the ``next_layer`` hook lets an addon choose a layer, not wrap the one
mitmproxy chooses; and hooks see a request once its head is parsed, never the
bytes and the time a client takes to send it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from mitmproxy import ctx
from mitmproxy.proxy import commands, events, layer
from mitmproxy.proxy.layers.http import HttpConnectHook, HttpRequestHeadersHook

# the hooks mitmproxy's HTTP layer starts once it has parsed a request head
HEAD_PARSED = (HttpRequestHeadersHook, HttpConnectHook)


def decide_now(nextlayer: layer.NextLayer) -> None:
    """Let mitmproxy's nextlayer addon set ``nextlayer.layer`` now, from the mirror's own
    next_layer hook, which runs before the addon's (the addon leaves it None while it needs
    more of the client's data, and a layer set by someone else alone)."""
    ctx.master.addons.get("nextlayer").next_layer(nextlayer)


class Overlay(layer.Layer):
    """A layer above ``child``, invisible to the layer decisions below it: not in
    ``context.layers``, which the nextlayer addon matches against the stacks it knows."""

    def __init__(self, context, child: layer.Layer) -> None:
        super().__init__(context)
        context.layers.remove(self)  # the stacks the nextlayer addon matches stay mitmproxy's
        self.child = child


@dataclass(frozen=True)
class CloseClient:
    """A watch's verdict: close the client connection, after sending ``answer`` if given."""

    answer: bytes | None = None


class HeadWatch(Protocol):
    """What a HeadLayer asks (guard.py's ``HeadWatch``)."""

    closed: bool

    def watching(self) -> bool: ...  # the client's bytes now are a request head's
    def check_every(self) -> float: ...  # seconds between two timer_fired
    def received(self, size: int) -> CloseClient | None: ...
    def head_parsed(self) -> None: ...
    def timer_fired(self) -> CloseClient | None: ...


def watch_heads(nextlayer: layer.NextLayer, watch: HeadWatch) -> bool:
    """mitmproxy's first layer for a client connection, decided now, under a HeadLayer that
    shows ``watch`` the client's request heads; False while mitmproxy needs more data."""
    decide_now(nextlayer)
    if nextlayer.layer is None:
        return False
    nextlayer.layer = HeadLayer(nextlayer.context, nextlayer.layer, watch)
    return True


class HeadLayer(Overlay):
    """Shows a ``HeadWatch`` what the client sends while it watches and when mitmproxy's HTTP
    layer parsed a head, wakes it up every ``check_every()`` seconds, and closes the client
    connection when it says so. While it does not watch (a request in flight, a tunnel), events
    go straight to the layers below."""

    def __init__(self, context, child: layer.Layer, watch: HeadWatch) -> None:
        super().__init__(context, child)
        self.watch = watch
        self.timer: commands.RequestWakeup | None = None

    def handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if self.watch.closed or self.watch.watching() or self._is_timer(event):
            return super().handle_event(event)
        # without this layer's cost per event: it never pauses, so the pause bookkeeping
        # of Layer.handle_event has nothing to do
        return self.child.handle_event(event)

    def _is_timer(self, event: events.Event) -> bool:
        return isinstance(event, events.Wakeup) and event.command is self.timer

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if self._is_timer(event):
            self.timer = None
            if not self.watch.closed:
                verdict = self.watch.timer_fired()
                yield from (self._close(verdict) if verdict else self._arm())
            return
        if self.watch.closed:
            return
        client = self.context.client
        if isinstance(event, events.Start):
            yield from self._arm()
        elif self.watch.watching() and isinstance(event, events.DataReceived) and event.connection is client:
            verdict = self.watch.received(len(event.data))
            if verdict:
                yield from self._close(verdict)
                return
        for command in self.child.handle_event(event):
            if isinstance(command, HEAD_PARSED):
                self.watch.head_parsed()
            yield command

    def _arm(self) -> layer.CommandGenerator[None]:
        if self.timer is None:
            self.timer = commands.RequestWakeup(self.watch.check_every())
            yield self.timer

    def _close(self, verdict: CloseClient) -> layer.CommandGenerator[None]:
        client = self.context.client
        if verdict.answer is not None and not client.tls:
            yield commands.SendData(client, verdict.answer)
        # else (no answer, or TLS): this layer sits above the client's TLS (an HTTPS listener,
        # a CONNECT tunnel the proxy intercepts), and plain text there is garbage the client
        # reports as a TLS error; the close is the answer
        yield commands.CloseConnection(client)
