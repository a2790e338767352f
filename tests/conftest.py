"""Fixtures shared across test folders."""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture(scope="session")
def tiny_reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One tiny workspace (tests.tiny) built by one uninterrupted, timed `dvc repro`
    (scripts/kill_test.build): {"ws", "ran", "durations", "digest", ...}.

    Shared by the slow tests, which only read it: copy `ws` (shutil.copytree(..., symlinks=True))
    before changing anything in it. Building it takes 1.5-2 minutes here.
    """
    from scripts.kill_test import build

    return build(tmp_path_factory.mktemp("tiny-reference"), log=lambda *_: None)
