"""The offline settings have one home (lathe.offline); the Makefile's shell copy must say the same."""

from __future__ import annotations

import re
from pathlib import Path

from flows.env import FLOW_ENV
from lathe.offline import OFFLINE_ENV

ROOT = Path(__file__).resolve().parents[1]


def makefile_exports() -> dict[str, str]:
    """`export NAME := value` lines of the Makefile."""
    text = (ROOT / "Makefile").read_text()
    return dict(re.findall(r"^export (\w+) := (.*)$", text, flags=re.M))


def test_the_makefile_exports_every_offline_setting_with_the_same_value():
    exported = makefile_exports()
    assert {k: exported.get(k) for k in OFFLINE_ENV} == dict(OFFLINE_ENV)


def test_the_flows_keep_every_offline_setting():
    assert {k: FLOW_ENV[k] for k in OFFLINE_ENV} == dict(OFFLINE_ENV)
