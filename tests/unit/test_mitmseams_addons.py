"""mitmseams/hooks.py, proxyauth.py and contentviews.py against the installed mitmproxy's own
addon manager, proxyauth and view addons and content view registry: a failure names the seam."""

from __future__ import annotations

import asyncio
import base64

from mitmproxy import contentviews
from mitmproxy.addons import proxyauth as proxyauth_addon
from mitmproxy.addons import view
from mitmproxy.proxy import mode_specs
from mitmproxy.test import taddons, tflow

from hubrewrite.debug.contentviews import VIEWS
from hubrewrite.mitmseams import hooks, proxyauth
from hubrewrite.mitmseams.contentviews import remove_view
from tests.unit.seamcheck import seam


class Hooks:
    def __init__(self) -> None:
        self.seen: list[str] = []

    def __getattr__(self, name: str):
        if name in ("requestheaders", "request", "responseheaders", "response", "error", "update"):
            return lambda *args: self.seen.append(name)
        raise AttributeError(name)


def test_a_flow_made_by_the_mirror_goes_through_every_addons_hooks():
    async def scenario():
        recorder, shown = Hooks(), view.View()
        with taddons.context(recorder, shown):
            flow = tflow.tflow(resp=True)
            flow.live = False
            await hooks.run_hooks(flow)
        return recorder.seen, flow in shown

    with seam("hooks.run_hooks"):
        seen, in_view = asyncio.run(scenario())
        assert [s for s in seen if s != "update"] == ["requestheaders", "request", "responseheaders", "response"]
        assert "update" in seen and in_view  # mitmweb's view lists it


def test_the_proxy_login_proxyauth_accepted_is_kept_in_the_flow():
    addon = proxyauth_addon.ProxyAuth()
    with taddons.context(addon) as tctx, seam("proxyauth.accepted_login, proxyauth.replace_accepted_password"):
        tctx.configure(addon, proxyauth="ann:secret", mode=["regular"])
        flow = tflow.tflow()
        flow.client_conn.proxy_mode = mode_specs.ProxyMode.parse("regular")
        flow.request.headers["Proxy-Authorization"] = "Basic " + base64.b64encode(b"ann:secret").decode()
        addon.requestheaders(flow)
        assert flow.response is None, "proxyauth refused the test's login"
        assert proxyauth.accepted_login(flow) == ("ann", "secret")
        proxyauth.replace_accepted_password(flow, "fingerprint")
        assert proxyauth.accepted_login(flow) == ("ann", "fingerprint")
        assert proxyauth.accepted_login(tflow.tflow()) is None


class Listener:
    """Listens to the registry's changes as mitmweb does."""

    def __init__(self) -> None:
        self.told: list = []

    def changed(self, view_) -> None:
        self.told.append(view_)


def test_a_view_of_the_mirror_is_removed_and_the_registry_told():
    view_, listener = VIEWS[0], Listener()
    contentviews.add(view_)
    contentviews.registry.on_change.connect(listener.changed)
    try:
        with seam("contentviews.remove_view"):
            assert view_.name.lower() in contentviews.registry
            remove_view(view_)
            assert view_.name.lower() not in contentviews.registry
            assert view_.name.lower() not in contentviews.registry.available_views()
            assert listener.told == [view_]
    finally:
        contentviews.registry.on_change.disconnect(listener.changed)
