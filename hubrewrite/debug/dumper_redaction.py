"""What mitmdump prints of each flow, without a secret, whatever its ``flow_detail`` or terminal width.

mitmdump's dumper prints a flow's URL (cut to the terminal's width, so with a
wide terminal a signed URL whole), and at higher ``flow_detail`` its headers and
bodies: credentials and token answers. The mirror hands the dumper a redacted
copy of each flow instead (``hub_show_secrets`` turns this off for local
debugging). mitmweb has no dumper: its flows are redacted where the mirror owns
them (its side flows; a client flow's request once it was used).
"""

from __future__ import annotations

from ..mitmseams import dumper
from .redact import redacted


class DumperRedaction:
    """An addon that hands mitmdump's dumper a redacted copy of each flow."""

    def __init__(self, show_secrets) -> None:
        self.show_secrets = show_secrets  # -> bool, read at each flow: the option may change

    def running(self) -> None:
        dumper.print_flows_as(lambda flow: flow if self.show_secrets() else redacted(flow))
