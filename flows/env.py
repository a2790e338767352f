"""Offline, telemetry-free environment for flows and the DVC subprocesses they start.

Prefect reads its settings when it is first imported, so entry points call `apply_offline_env()`
before `import prefect`. Nothing here imports prefect or dvc.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from lathe.offline import OFFLINE_ENV

# No tool phones home (lathe.offline); the ephemeral Prefect server takes 10-20 s to start on this machine.
FLOW_ENV: Mapping[str, str] = {**OFFLINE_ENV, "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}


def apply_offline_env(prefect_home: Path | None = None) -> None:
    """Set the offline defaults in os.environ without overriding anything already set.

    `prefect_home`, when given, becomes the default PREFECT_HOME (Prefect state inside the project).
    """
    for key, value in FLOW_ENV.items():
        os.environ.setdefault(key, value)
    if prefect_home is not None:
        os.environ.setdefault("PREFECT_HOME", str(prefect_home))


def subprocess_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """os.environ plus the offline defaults (existing values win), plus `extra` (which wins)."""
    env = {**FLOW_ENV, **os.environ}
    env.update(extra or {})
    return env
