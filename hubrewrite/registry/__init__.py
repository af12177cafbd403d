"""The registry protocol as the mirror sees it: pure functions and records, no mitmproxy, no I/O."""
