"""The mirror's own HTTP client: ready before the first client waits."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_warm_up_loads_what_the_first_request_would():
    """httpx's transport imports anyio's event-loop backend on its first request (about
    30 ms here): ``warm_up`` at start-up takes that off the first pull. A fresh
    interpreter, since this one has long loaded it."""
    script = textwrap.dedent("""
        import asyncio, ssl, sys
        from hubrewrite.upstream_client import UpstreamClient

        async def main():
            client = UpstreamClient(ssl.create_default_context(), timeout=5, max_body=1024)
            before = "anyio._backends._asyncio" in sys.modules
            await client.warm_up()
            after = "anyio._backends._asyncio" in sys.modules
            await client.aclose()
            print(before, after)

        asyncio.run(main())
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "True"]
