"""Typed settings of unattended operation (params.yaml `ops:`), read only by the flows.

They live here rather than in lathe/config.py on purpose: every DVC stage depends on
lathe/config.py, so a change to how runs are scheduled or retried would otherwise invalidate every
stage's lock entry and rebuild the whole pipeline for nothing.
"""

from __future__ import annotations

from pydantic import Field

from lathe.config import Section


class ServeParams(Section):
    """`lathe serve`: where the Prefect server listens when Lathe starts one itself."""

    host: str = Field("127.0.0.1", description="bind address of `prefect server start` (loopback by default)")
    port: int = Field(4200, ge=1, le=65535)
    startup_timeout_seconds: float = Field(120.0, gt=0, description="wait this long for the server's /api/health")


class WorkPoolParams(Section):
    """`python -m flows.workpool deploy`: the Prefect work pool the deployments are registered in."""

    name: str = Field("lathe", min_length=1, description="work pool name (created when missing)")
    type: str = Field("process", min_length=1,
                      description="worker type of a pool created here: process, docker, kubernetes, ...")


class OpsParams(Section):
    """Unattended operation (params.yaml `ops:`): retries, the run lock, schedules. Optional section;
    these defaults apply when params.yaml has none. Not a stage dependency: changing it reruns nothing."""

    retries: int = Field(2, ge=0, description="retries of a stage after a transient failure (killed process, held lock)")
    retry_delay_seconds: float = Field(30.0, ge=0, description="wait before each retry")
    concurrency_limit: str = Field("lathe-pipeline", min_length=1,
                                   description="Prefect global concurrency limit (1 slot) held for a whole run")
    concurrency_timeout_seconds: float | None = Field(
        3600.0, gt=0, description="a second run waits this long for the slot, then is refused; null waits forever")
    schedule: str = Field("0 2 * * *", min_length=9, description="cron of the scheduled pipeline deployment")
    timezone: str = Field("UTC", description="time zone of `schedule`")
    trigger_interval_minutes: float = Field(15.0, gt=0, description="how often the data-change trigger checks")
    serve: ServeParams = ServeParams()
    work_pool: WorkPoolParams = WorkPoolParams()
