"""Fixtures shared across test folders."""

from __future__ import annotations

from typing import Any

import pytest

from flows.env import apply_offline_env

# Before any test module imports prefect (which reads its settings once) or runs a tool: offline, no
# telemetry, also when pytest is run directly rather than through `make test`.
apply_offline_env()


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
# hooks below keep that correct and balanced:
# - one work unit per module, so a module-scoped fixture (a trained model, a served Prefect) is built once;
# - every module that uses `tiny_reference` in one unit, so the shared build happens once;
# - the two longest units first, so they run side by side rather than one after the other.
# xdist's own loadgroup (xdist_group marks) cannot do this with pytest 9.2: it renames `item._nodeid`,
# which pytest 9.2 no longer reads, so every test became its own unit and module fixtures were built
# on both workers. The grouping is therefore done by the scheduler itself, from the test ids.
SHARED_BUILD_GROUP = "tiny_reference"
SHARED_BUILD_MODULES = frozenset({
    "tests/flows/test_experiments.py",
    "tests/integration/test_kill.py",
    "tests/integration/test_pipeline.py",
    "tests/integration/test_reports.py",
})
LONGEST_FIRST = ("tests/integration/test_operations.py", SHARED_BUILD_GROUP)


def module_of(nodeid: str) -> str:
    """The module path of a test id ("tests/x/test_y.py::test_z" -> "tests/x/test_y.py")."""
    return nodeid.split("::", 1)[0]


def work_unit_of(nodeid: str) -> str:
    """The xdist work unit of a test id: the shared-build group or the test's module path."""
    module = module_of(nodeid)
    return SHARED_BUILD_GROUP if module in SHARED_BUILD_MODULES else module


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """With --dist loadgroup: xdist's scope scheduler, its scopes being `work_unit_of` each test id."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ModuleUnitScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit_of(nodeid)

    return ModuleUnitScheduling(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Refuse a `tiny_reference` user missing from SHARED_BUILD_MODULES (it would build the reference
    again on the other worker); put the longest units first (a stable sort: module order is kept)."""
    users = {module_of(it.nodeid) for it in items if SHARED_BUILD_GROUP in getattr(it, "fixturenames", ())}
    if users - SHARED_BUILD_MODULES:
        raise pytest.UsageError(f"tests/conftest.py: add {sorted(users - SHARED_BUILD_MODULES)} to SHARED_BUILD_MODULES")

    def rank(it: pytest.Item) -> int:
        unit = work_unit_of(it.nodeid)
        return LONGEST_FIRST.index(unit) if unit in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)
