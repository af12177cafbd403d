"""Every place where the mirror relies on how mitmproxy is built inside: the one place
to look when mitmproxy is upgraded.

mitmproxy promises addons its hooks and the data they carry (the next_layer
hook's ``NextLayer``: its ``context`` and the ``layer`` an addon may set),
``ctx.options`` and ``loader.add_option``, ``OptionsError``, the options it
documents, and the modules of its API reference (``mitmproxy.http``,
``connection``, ``flow``, ``tls``, ``tcp``, ``certs``, ``proxy.mode_specs``,
``proxy.server_hooks``, ``proxy.context``, ``contentviews.add``). The mirror
uses those anywhere.

The rule: anything else of mitmproxy, or of the libraries beneath it and httpx
(h2, httpcore), that the mirror relies on is a seam, since an upgrade may change
it without a word and without an ImportError:

- another addon's objects, methods or ``flow.metadata`` keys, and telling mitmproxy's
  tools apart by the options their addons declare;
- the proxy core's layers, events and commands, the proxy server's connections,
  the h2 connection of its HTTP/2 server, a value copied from its configuration;
- a private attribute, or a method replaced at run time;
- a logger's name, the wording of its messages and the extras of its records;
- the tools' command-line parsers, master classes and entry points.

Each seam is a small function or class here whose docstring says what it relies on
and why the public API does not do; outside this package the mirror imports only
the public modules above (tests/unit/test_mitmseams.py checks that). Each seam has a
test in ``tests/unit/test_mitmseams_*.py`` that drives the pinned mitmproxy's real
objects (a proxy server with a client connection, layers, masters, parsers) and
fails naming the seam when what it relies on changes.

Not seams: mitmproxy's helpers used like any library (``mitmproxy.utils.human``,
``optmanager.parse``), which take and give plain values and fail at their first
call in the unit tests; h11's documented API (httpwire.py); the order in which
mitmproxy runs the hooks of the mirror and of its view and save addons
(debug/records.py), checked end to end by tests/hardening. Still outside: the
httpcore read size set in upstream_client.py.

- ``connections``: the proxy server's connection table; closing a client connection.
- ``layers``: mitmproxy's layer decision, and a layer above a client's own (head limits).
- ``http2``: a client's HTTP/2 streams (a malformed request's reset, data read in pieces).
- ``logs``: the terminal log's formatter; the proxy server's per-connection lines.
- ``dumper``: what mitmdump prints of each flow.
- ``certificates``: the store of the ``--certs`` certificates.
- ``tools``: which tool runs, its command line, mitmdump's entry point.
- ``hooks``: a flow the mirror made, through every addon's hooks.
- ``proxyauth``: the proxy password proxyauth keeps in ``flow.metadata``.
- ``contentviews``: removing a content view.
"""

MITMPROXY = "12.3.1"  # the version every seam was checked against (pyproject.toml pins it)
