"""The one list of environment settings that keep every tool Lathe runs offline and telemetry-free.

Used by the flows (flows/env.py adds its Prefect settings), by the subprocesses the core starts
(lathe.audit.rebuild, lathe.audit.history) and by the tests; the Makefile exports the same values for
the shell (tests/test_offline_env.py keeps the two in step).
"""

from __future__ import annotations

from collections.abc import Mapping

OFFLINE_ENV: Mapping[str, str] = {
    "DVC_NO_ANALYTICS": "1",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "ORT_DISABLE_TELEMETRY": "1",
    "GX_ANALYTICS_ENABLED": "false",
}
