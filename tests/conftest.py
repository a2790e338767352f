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


# `make test` runs the suite on two xdist workers (-n 2 --dist loadgroup --no-loadscope-reorder). The
# hook below keeps that correct and balanced:
# - one group per module, so a module-scoped fixture (a trained model, a served Prefect) is built once;
# - every module that uses `tiny_reference` in one group, so the shared build happens once;
# - the two longest units first, so they run side by side rather than one after the other.
SHARED_BUILD_GROUP = "tiny_reference"
LONGEST_FIRST = ("tests/integration/test_operations.py", SHARED_BUILD_GROUP)


def xdist_group_of(item: pytest.Item, shared_build_modules: set[str]) -> str:
    """The worker group of a test: the shared-build group or its module's path."""
    module = item.nodeid.split("::", 1)[0]
    return SHARED_BUILD_GROUP if module in shared_build_modules else module


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    shared = {it.nodeid.split("::", 1)[0] for it in items if SHARED_BUILD_GROUP in getattr(it, "fixturenames", ())}
    groups = {it.nodeid: xdist_group_of(it, shared) for it in items}
    for it in items:
        it.add_marker(pytest.mark.xdist_group(groups[it.nodeid]))

    def rank(it: pytest.Item) -> int:
        g = groups[it.nodeid]
        return LONGEST_FIRST.index(g) if g in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order inside a module is kept
