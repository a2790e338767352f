"""One pipeline run at a time: the Prefect global concurrency limit `ops.concurrency_limit` (one slot).

A whole run holds the slot, so two runs never interleave; a second run waits, and after
`ops.concurrency_timeout_seconds` is refused with PipelineBusy. DVC's own repo lock is the second
line. Prefect is imported only inside the functions (after the caller set the offline environment).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class PipelineBusy(RuntimeError):
    """Another Lathe run held the pipeline's concurrency slot for longer than the timeout."""

    def __init__(self, limit: str, timeout: float | None) -> None:
        super().__init__(limit, timeout)
        self.limit, self.timeout = limit, timeout

    def __str__(self) -> str:
        return (f"refused: another Lathe pipeline run holds the '{self.limit}' concurrency slot and did not "
                f"finish within {self.timeout or 0:g} s (params ops.concurrency_timeout_seconds); nothing was run")


def ensure_concurrency_limit(name: str) -> None:
    """Create the one-slot global concurrency limit `name` on the Prefect server (or reset it to 1).

    Prefect's upsert reads, then creates: two runs starting together can both find no limit, and
    the later create fails with ObjectAlreadyExists. The other run created it, so upsert again
    (it now reads the limit and only resets it to 1 if needed).
    """
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client:
        try:
            client.upsert_global_concurrency_limit_by_name(name, 1)
        except ObjectAlreadyExists:
            client.upsert_global_concurrency_limit_by_name(name, 1)


@contextlib.contextmanager
def pipeline_slot(name: str, timeout: float | None) -> Iterator[None]:
    """Hold the one slot of `name` for the block; PipelineBusy after `timeout` seconds of waiting."""
    from prefect.concurrency.sync import concurrency

    ensure_concurrency_limit(name)
    with contextlib.ExitStack() as stack:
        try:  # AcquireConcurrencySlotTimeoutError is a TimeoutError; only the wait is guarded
            stack.enter_context(concurrency(name, occupy=1, timeout_seconds=timeout, strict=True))
        except TimeoutError as exc:
            raise PipelineBusy(name, timeout) from exc
        yield
