"""`lathe serve`: a Prefect server plus two served deployments, for unattended plant operation.

Server, in this order: `--api-url`, else PREFECT_API_URL (an existing, possibly shared, server),
else `prefect server start --host <ops.serve.host> --port <ops.serve.port>` started here with its
state (SQLite) under PREFECT_HOME (default <project>/.prefect); PREFECT_API_DATABASE_CONNECTION_URL
(or `--database-url`), e.g. postgresql+asyncpg://lathe:***@db:5432/prefect, points that server at
Postgres instead. Deployments, served from this process until Ctrl-C:

- `lathe-pipeline/lathe-scheduled`: run_pipeline(repo) on cron `ops.schedule` (default "0 2 * * *")
- `lathe-trigger/lathe-data-change`: run_if_data_changed(repo) every `ops.trigger_interval_minutes`

Nothing here imports prefect at module level: the server's address must be in the environment
before Prefect reads its settings.

    python -m flows.serve [--repo PATH] [--api-url URL] [--database-url URL] [--host H] [--port N]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from flows.env import apply_offline_env, subprocess_env

PROJECT_ROOT = Path(__file__).resolve().parents[1]  # the served flows are loaded from here
PIPELINE_DEPLOYMENT = "lathe-scheduled"
TRIGGER_DEPLOYMENT = "lathe-data-change"
DB_URL_ENV = "PREFECT_API_DATABASE_CONNECTION_URL"


class ServeError(RuntimeError):
    """The Prefect server could not be started or reached."""


def api_healthy(api_url: str, timeout: float = 2.0) -> bool:
    """True when GET <api_url>/health answers 200."""
    try:
        with urllib.request.urlopen(api_url.rstrip("/") + "/health", timeout=timeout) as resp:  # noqa: S310 (loopback/configured)
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _die_with_parent() -> None:
    """preexec_fn: the server gets SIGTERM when `lathe serve` dies, even by SIGKILL (Linux only)."""
    import ctypes
    import signal

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def start_server(home: Path, host: str, port: int, timeout: float,
                 database_url: str | None = None) -> tuple[subprocess.Popen, str]:
    """`prefect server start` with PREFECT_HOME=`home` (SQLite there unless `database_url`); waits for health.

    Returns (process, api url). The server's output goes to <home>/server.log.
    """
    home.mkdir(parents=True, exist_ok=True)
    api_url = f"http://{host}:{port}/api"
    if api_healthy(api_url):
        raise ServeError(f"something already answers on {api_url}; use it with PREFECT_API_URL={api_url} "
                         "or choose another port (ops.serve.port / --port)")
    # the UI is a browser app that calls the API at PREFECT_UI_API_URL (default: port 4200), so a server
    # started on another port must tell it, else the UI shows "Can't connect to Server API"
    extra = {"PREFECT_HOME": str(home), "PREFECT_UI_API_URL": api_url}
    if database_url:
        extra[DB_URL_ENV] = database_url
    env = subprocess_env(extra)
    env.pop("PREFECT_API_URL", None)  # the server itself must not point at another one
    log = open(home / "server.log", "ab")  # noqa: SIM115 (lives as long as the server)
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,  # noqa: PLW1509
        # Out of the terminal's process group: Ctrl-C reaches `lathe serve` only, whose runner shuts down
        # while the server still answers, then stops the server (it hung retrying a server killed first).
        start_new_session=True,
    )
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise ServeError(f"prefect server exited with {proc.returncode}; see {home / 'server.log'}")
            if api_healthy(api_url):
                return proc, api_url
            time.sleep(0.5)
        raise ServeError(f"prefect server did not answer on {api_url} within {timeout:g} s; see {home / 'server.log'}")
    except BaseException:  # Ctrl-C while waiting included: never leave the server behind
        stop_server(proc)
        raise


def stop_server(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def prefect_server(repo: Path, ops: Any, api_url: str | None = None, database_url: str | None = None,
                   host: str | None = None, port: int | None = None) -> Iterator[str]:
    """Yield the API url of the server to use: the given/configured one, or one started (and stopped) here."""
    url = api_url or os.environ.get("PREFECT_API_URL")
    if url:
        if not api_healthy(url, timeout=10):
            raise ServeError(f"no Prefect server answers on {url} (PREFECT_API_URL / --api-url)")
        yield url
        return
    home = Path(os.environ.get("PREFECT_HOME") or repo / ".prefect")
    proc, url = start_server(home, host or ops.serve.host, port or ops.serve.port,
                             ops.serve.startup_timeout_seconds, database_url or os.environ.get(DB_URL_ENV))
    try:
        yield url
    finally:
        stop_server(proc)


def build_deployments(repo: Path, ops: Any) -> list[Any]:
    """The scheduled pipeline and the data-change trigger as RunnerDeployments for `repo`."""
    from datetime import timedelta

    from prefect.schedules import Cron, Interval

    from flows.pipeline import run_pipeline
    from flows.trigger import run_if_data_changed

    params = {"repo": str(repo)}
    return [
        run_pipeline.to_deployment(
            name=PIPELINE_DEPLOYMENT, parameters=params, tags=["lathe"],
            schedule=Cron(ops.schedule, timezone=ops.timezone),
            description=f"Lathe pipeline on {repo}, cron '{ops.schedule}' ({ops.timezone})",
        ),
        run_if_data_changed.to_deployment(
            name=TRIGGER_DEPLOYMENT, parameters=params, tags=["lathe"],
            schedule=Interval(timedelta(minutes=ops.trigger_interval_minutes)),
            description=f"Lathe: run the pipeline on {repo} when data/raw.dvc or dvc status changed",
        ),
    ]


def serve(repo: Path | None = None, api_url: str | None = None, database_url: str | None = None,
          host: str | None = None, port: int | None = None, announce: Any = print) -> None:
    """Start or use a Prefect server, register both deployments and serve them until interrupted."""
    import signal
    import threading

    root = Path(repo if repo is not None else Path.cwd()).resolve()
    apply_offline_env(prefect_home=root / ".prefect")
    if threading.current_thread() is threading.main_thread():
        # SIGTERM (systemd, docker stop, kill) unwinds like Ctrl-C and stops a server started here;
        # once serving, Prefect's runner installs its own graceful SIGTERM handler.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    from flows.pipeline import load_ops  # noqa: I001  (imports prefect: only after the environment is set)

    ops = load_ops(root)
    with prefect_server(root, ops, api_url, database_url, host, port) as url:
        os.environ["PREFECT_API_URL"] = url  # for the flow-run subprocesses
        from prefect import serve as prefect_serve
        from prefect.settings import PREFECT_API_URL, temporary_settings

        from flows.concurrency import ensure_concurrency_limit

        with temporary_settings(updates={PREFECT_API_URL: url}), contextlib.chdir(PROJECT_ROOT):
            ensure_concurrency_limit(ops.concurrency_limit)
            deployments = build_deployments(root, ops)
            announce(f"Lathe: serving '{PIPELINE_DEPLOYMENT}' (cron '{ops.schedule}' {ops.timezone}) and "
                     f"'{TRIGGER_DEPLOYMENT}' (every {ops.trigger_interval_minutes:g} min) for {root}")
            announce(f"Lathe: Prefect API {url}; UI {url.removesuffix('/api')}")
            prefect_serve(*deployments, print_starting_message=False)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=None, help="DVC repo to run (default: current directory)")
    parser.add_argument("--api-url", default=None, help="use this Prefect server (default: $PREFECT_API_URL, else start one)")
    parser.add_argument("--database-url", default=None, help=f"database of a server started here (default: ${DB_URL_ENV}, else SQLite)")
    parser.add_argument("--host", default=None, help="bind address of a server started here (default: ops.serve.host)")
    parser.add_argument("--port", type=int, default=None, help="port of a server started here (default: ops.serve.port)")
    args = parser.parse_args(argv)
    try:
        serve(args.repo, args.api_url, args.database_url, args.host, args.port)
    except ServeError as exc:
        print(f"lathe serve: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
