"""What every seam test shares: a failure names the seam and the mitmproxy it ran against."""

from __future__ import annotations

import contextlib

from mitmproxy import version

from hubrewrite import mitmseams


@contextlib.contextmanager
def seam(name: str):
    """Turn any failure inside into one that says which seam of hubrewrite/mitmseams broke."""
    try:
        yield
    except Exception as e:
        raise AssertionError(
            f"mitmproxy seam {name} (hubrewrite/mitmseams) does not hold with mitmproxy {version.VERSION} "
            f"(checked against {mitmseams.MITMPROXY}): {e!r}") from e
