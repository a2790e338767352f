"""Acceptance of `lathe serve`: the UI lists both deployments, and Ctrl-C stops everything.

Starts the installed `lathe serve --port N` on a repository (default: a throwaway git + DVC repo with
a one-stage toy pipeline, so a trigger run costs nothing), waits until the server's API lists both
deployments, loads http://127.0.0.1:N/deployments in headless Chromium (Debian's `chromium`; a
virtual-time budget lets the single-page app fetch and render), checks that the rendered page names
both deployments, saves a screenshot, then sends SIGINT (Ctrl-C) to `lathe serve` and checks that it
exited and that the server it started no longer answers. Exit 0 only if all of that holds.

    python scripts/ui_screenshot.py [--repo PATH] [--port N] [--out docs/img/serve-ui.png]
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flows.env import subprocess_env  # noqa: E402
from flows.serve import PIPELINE_DEPLOYMENT, TRIGGER_DEPLOYMENT, api_healthy  # noqa: E402

LATHE = Path(sys.executable).parent / "lathe"
TOY_STAGE = {"stages": {"hello": {"cmd": "python -c \"open('hello.txt', 'w').write('hello')\"", "outs": ["hello.txt"]}}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def toy_repo(dest: Path) -> Path:
    """A committed git + DVC repo with one trivial stage; ops keep the trigger quiet (daily)."""
    import yaml

    dest.mkdir(parents=True)
    (dest / "dvc.yaml").write_text(yaml.safe_dump(TOY_STAGE))
    (dest / "params.yaml").write_text(yaml.safe_dump({"ops": {"trigger_interval_minutes": 1440}}))
    env = subprocess_env()
    for cmd in (["git", "init", "-q"], ["git", "config", "user.email", "ui@lathe.invalid"],
                ["git", "config", "user.name", "lathe ui screenshot"], [sys.executable, "-m", "dvc", "init", "-q"],
                ["git", "add", "-A"], ["git", "commit", "-q", "-m", "toy pipeline"]):
        subprocess.run(cmd, cwd=dest, env=env, check=True, capture_output=True)
    return dest


def deployment_names(api_url: str) -> set[str]:
    """Names of the deployments the server holds (REST: POST /deployments/filter)."""
    req = urllib.request.Request(f"{api_url}/deployments/filter", data=b"{}", method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as res:  # noqa: S310 (loopback)
            return {d["name"] for d in json.loads(res.read())}
    except (OSError, ValueError):
        return set()


def chromium(browser: str, url: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--no-first-run", f"--user-data-dir={profile}", "--window-size=1400,900",
                           "--virtual-time-budget=20000", *args, url],
                          capture_output=True, text=True, timeout=180)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=None, help="repository to serve (default: a throwaway toy repo)")
    parser.add_argument("--port", type=int, default=None, help="server and UI port (default: a free one)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "serve-ui.png")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "chromium")
    parser.add_argument("--timeout", type=float, default=180, help="seconds to wait for the deployments")
    args = parser.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="lathe-ui-"))
    repo = args.repo.resolve() if args.repo else toy_repo(tmp / "repo")
    port = args.port or free_port()
    api_url, ui_url = f"http://127.0.0.1:{port}/api", f"http://127.0.0.1:{port}/deployments"
    env = subprocess_env({"PREFECT_HOME": str(tmp / "prefect-home")})  # a fresh database: only these deployments
    env.pop("PREFECT_API_URL", None)
    log = tmp / "serve.log"
    with open(log, "wb") as out:
        serve = subprocess.Popen([str(LATHE), "serve", "--port", str(port)], cwd=repo, env=env, stdout=out,
                                 stderr=subprocess.STDOUT)
    problems: list[str] = []
    try:
        want = {PIPELINE_DEPLOYMENT, TRIGGER_DEPLOYMENT}
        deadline = time.monotonic() + args.timeout
        while not want <= deployment_names(api_url):
            if serve.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"lathe serve: deployments not listed (exit {serve.returncode}):\n"
                                 f"{log.read_text()[-3000:]}")
            time.sleep(1)
        print(f"served on {api_url}: {sorted(deployment_names(api_url))}")
        dom = chromium(args.chromium, ui_url, tmp / "chromium", "--dump-dom")
        missing = [name for name in sorted(want) if name not in dom.stdout]
        if dom.returncode != 0 or missing:
            problems.append(f"the rendered {ui_url} does not name {missing} (chromium exit {dom.returncode}: "
                            f"{dom.stderr.strip()[-500:]})")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        shot = chromium(args.chromium, ui_url, tmp / "chromium", f"--screenshot={args.out.resolve()}")
        if shot.returncode != 0 or not args.out.is_file():
            problems.append(f"no screenshot (chromium exit {shot.returncode}): {shot.stderr.strip()[-500:]}")
        else:
            print(f"screenshot of {ui_url}: {args.out} ({args.out.stat().st_size} bytes)")
    finally:
        start = time.monotonic()
        serve.send_signal(signal.SIGINT)  # Ctrl-C
        try:
            serve.wait(60)
        except subprocess.TimeoutExpired:
            serve.kill()
            serve.wait()
            problems.append("lathe serve did not stop within 60 s of SIGINT (killed)")
    stopped = time.monotonic() - start
    if api_healthy(api_url):
        problems.append(f"the Prefect server on {api_url} still answers after lathe serve exited")
    print(f"SIGINT: lathe serve exited {serve.returncode} after {stopped:.1f} s; "
          f"server answers: {api_healthy(api_url)}")
    for p in problems:
        print(f"FAIL: {p}", file=sys.stderr)
    if not problems:
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        print(f"kept {tmp} (serve.log)", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
