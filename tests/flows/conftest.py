"""The one temporary Prefect server every flow test shares (10-20 s to start here).

One fixture definition for the whole session: an alias of it in several modules would make pytest
start one server per module, with the settings of the last one started pointing everything there.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from flows.env import apply_offline_env

apply_offline_env()  # before prefect reads its settings: no telemetry, no network

from prefect.testing.utilities import prefect_test_harness  # noqa: E402


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[None]:
    with prefect_test_harness(server_startup_timeout=120):
        yield
