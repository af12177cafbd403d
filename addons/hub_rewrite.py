"""mitmproxy entry point: ``mitmdump -s addons/hub_rewrite.py --mode reverse:https://registry-1.docker.io@5000``.

The addon itself is :class:`hubrewrite.addon.HubRewrite`; this file only makes
the package importable when it is not installed in the interpreter running
mitmproxy.
"""

import sys
from pathlib import Path

_REPO_ROOT = str(Path(__file__).resolve().parent.parent)
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from hubrewrite.addon import HubRewrite  # noqa: E402

addons = [HubRewrite()]
