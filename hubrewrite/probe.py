"""The container's health check: ``python -m hubrewrite.probe`` exits 0 while the mirror is healthy.

It asks the mirror's own ``/_hub/health`` on the loopback address, port
``HUB_PORT`` (5000), in plain HTTP (mitmproxy tells TLS from plain HTTP on
the same port, so this works when the mirror serves HTTPS too): ``200`` (``ok``
or ``degraded``, which still serves) is healthy; anything else, or no answer
within five seconds, is not.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def main() -> int:
    url = f"http://127.0.0.1:{os.environ.get('HUB_PORT', '5000')}/_hub/health"
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            body = answer.read(4096).decode(errors="replace")
    except (urllib.error.URLError, OSError) as e:
        print(f"unhealthy: {url}: {getattr(e, 'reason', e)}", file=sys.stderr)
        return 1
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
