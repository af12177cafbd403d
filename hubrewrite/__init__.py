"""hub-rewrite: a Docker Hub mirror as a mitmproxy addon.

The mitmproxy entry point is ``addons/hub_rewrite.py``; the addon class lives in
:mod:`hubrewrite.addon`. Everything else here is pure logic that can be tested
without a proxy.
"""
