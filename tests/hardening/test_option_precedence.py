"""Issue 17, item 7: every option given on the command line wins over mitm.conf.

mitmproxy applies ``--set`` before the addon reads mitm.conf, and afterwards
an option set to its default value looks exactly like one never set: the file
used to win then (``--set block_global=true`` on a public forward proxy,
``--set http2=true``, ``--set tcp_timeout=600`` were all silently replaced by
mitm.conf's values). Here one real mitmdump gets every key of the repository's
mitm.conf on its command line, each set to its default (mitmproxy's, or the
addon's for ``hub_*`` options), with a config file that sets each of them to
something else; a small extra script reports the options as the running
process has them.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from mitmproxy import options

from hubrewrite.addon import HubRewrite
from hubrewrite.config_file import read_config
from hubrewrite.config_file import DEFAULT_CONFIG
from tests.support.mirror import Mirror

REPORT_OPTIONS = '''
import json, os
from mitmproxy import ctx


def running():
    keys = os.environ["HUB_TEST_KEYS"].split(",")
    with open(os.environ["HUB_TEST_REPORT"], "w") as f:
        json.dump({k: getattr(ctx.options, k) for k in keys}, f)
'''

# For keys whose value in mitm.conf is the default (the addon's hub_* options mostly): another
# value for the file, so that a command line setting the default has something to win against.
OTHER_VALUES = {
    "flow_detail": 0,
    "hub_public_url": "https://from-the-file.example",
    "hub_official_prefix": "fromfile",
    "hub_allow_push": True,
    "hub_upstream_timeout": 7,
    "hub_upstreams": ["docker.io=https://registry-1.docker.io", "quay.io", "file.example"],
    "hub_registry_name": "quay.io",
    "hub_host_map": ["file.mirror.example=quay.io"],
    "hub_log_format": "json",
}


def defaults() -> dict[str, object]:
    """Every option's default in a mitmdump with the addon loaded."""
    async def make():
        from mitmproxy.tools.dump import DumpMaster

        master = DumpMaster(options.Options(), with_termlog=False)
        master.addons.add(HubRewrite())
        return master

    opts = asyncio.run(make()).options
    return {k: opts.default(k) for k in opts.keys()}


def set_to(key: str, value: object) -> list[str]:
    """``--set`` arguments that give ``key`` the value ``value`` (mitmproxy's --set syntax)."""
    if value is None or value == []:
        return ["--set", key]  # a value left out: None for strings and integers, empty for sequences
    if isinstance(value, bool):
        return ["--set", f"{key}={'true' if value else 'false'}"]
    if isinstance(value, list):
        return [arg for item in value for arg in ("--set", f"{key}={item}")]
    return ["--set", f"{key}={value}"]


def test_the_command_line_wins_even_with_default_values(upstream, tmp_path: Path):
    shipped = read_config(DEFAULT_CONFIG)
    default = defaults()
    file_values = {k: OTHER_VALUES.get(k, v) if v == default[k] else v for k, v in shipped.items()}
    still_default = sorted(k for k, v in file_values.items() if v == default[k])
    assert still_default == [], f"give these keys a non-default value in OTHER_VALUES: {still_default}"
    conf = tmp_path / "mitm.conf"
    conf.write_text(json.dumps(file_values))  # JSON is YAML
    script = tmp_path / "report_options.py"
    script.write_text(REPORT_OPTIONS)
    report = tmp_path / "options.json"
    args = ["--set", f"hub_config={conf}", "-s", str(script)]
    for key in shipped:
        args += set_to(key, default[key])
    mirror = Mirror(tmp_path / "m", upstream, extra_args=args,
                    env={"HUB_TEST_KEYS": ",".join(shipped), "HUB_TEST_REPORT": str(report)})
    with mirror:
        assert "options loaded from" in mirror.log_text(), mirror.log_text()[-2000:]
        effective = json.loads(report.read_text())
    lost = {k: f"file's {file_values[k]!r} instead of {default[k]!r}" for k in shipped if effective[k] != default[k]}
    assert lost == {}, f"options given on the command line lost to the config file: {lost}"


@pytest.mark.parametrize("key", ["http2", "tcp_timeout"])
def test_the_file_still_applies_where_the_command_line_is_silent(upstream, tmp_path: Path, key):
    shipped = read_config(DEFAULT_CONFIG)
    script = tmp_path / "report_options.py"
    script.write_text(REPORT_OPTIONS)
    report = tmp_path / "options.json"
    mirror = Mirror(tmp_path / "m", upstream, extra_args=["-s", str(script)],
                    env={"HUB_TEST_KEYS": key, "HUB_TEST_REPORT": str(report)})
    with mirror:
        effective = json.loads(report.read_text())
    assert effective[key] == shipped[key]
