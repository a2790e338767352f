"""Kill test: SIGKILL a stage at a random point, rerun `dvc repro`, compare with an uninterrupted run.

Claim under test (issue 5): "A run never leaves partial outputs: SIGKILL during any stage, rerun, and
every artifact is byte-identical to an uninterrupted run's, with no temporary files left behind."

Procedure (all in a scratch folder, on a tiny workspace from tests.tiny.make_workspace):

1. base: make_workspace(tiny_params()) -- a committed git + DVC repo with generated raw data.
2. reference: a copy of base, one uninterrupted `dvc repro`. Its stdout is read live; the time from
   a stage's "Running stage '<s>'" line to the next one (or to exit) is that stage's run time.
   Every file of every DVC out (outs, metrics, plots; files and folders) is hashed.
3. snapshots (--mode fresh, the default): a second copy of base run stage by stage
   (`dvc repro --single-item <s>` in `dvc stage list` order); before each selected stage the
   workspace is copied: "built up to the previous stage". (--mode built instead kills inside a
   copy of the fully built reference with DVC's run-cache dropped from the copy, so the rerun
   re-executes the killed stage and then only what its new outputs change: much cheaper.)
4. per kill: a fresh copy of the snapshot; `flows.recovery.recover_workspace` (what the flow's stage
   task does first: it keeps a copy of dvc.lock), then `dvc repro --single-item --force <s>` in its
   own process group; once DVC prints "Running stage '<s>'" wait U(0, run time) seconds (seeded) and
   SIGKILL the whole group. Then the rerun as the flow does it: `recover_workspace` (puts a dvc.lock
   the kill truncated back, removes the killed stage's scratch folder) and `dvc repro`; no other
   cleanup of any kind. Then:
   - every artifact's sha256 against the reference (timing-dependent files: see below),
   - `dvc status` must say up to date,
   - leftovers: files in the workspace that the reference does not have (outside .git and .dvc),
     lathe.io temp names (`.<name>.<8 chars>.tmp`, tempfile.mkstemp beside the destination),
     package staging folders (`.<target>.build-*`, `.<name>.old-*`), `*.tmp` in the DVC cache,
     files in .dvc/tmp the reference does not have, a non-empty rwlock, a scratch folder under
     .lathe/tmp (lathe.io.scratch_tempdir), and anything left in the run's private TMPDIR (stages
     point their temp files at their scratch folder, so nothing should reach it).

Timing-dependent artifacts (they embed measured latencies, so two uninterrupted runs differ too):
reports/**/metrics.json are compared without latency_p50_ms, latency_p95_ms, throughput_ips;
reports/compare.md, reports/compare.json, reports/pareto.png and models/packages/** are compared by
their set of file names only (no partial or extra files), and every package must pass `lathe verify`.

    python scripts/kill_test.py [--stages S ...] [--per-stage 3] [--seed 0] [--mode fresh|built]
                                [--run-cache keep|drop] [--jobs 1] [--json report.json] [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from flows.recovery import LAST_GOOD, LockfileBroken, recover_workspace  # noqa: E402
from lathe.measure.metrics import TIMING_KEYS  # noqa: E402
from tests.tiny import make_workspace, offline_env, tiny_params  # noqa: E402

# compared by file names only: their bytes embed latencies measured in this run
NAMES_ONLY = ("reports/compare.md", "reports/compare.json", "reports/pareto.png", "models/packages/")
# tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp") in lathe/io.py: 8 chars from [a-z0-9_]
IO_TEMP = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")
PACKAGE_STAGING = re.compile(r"^\..+\.(build|old)-[a-z0-9_]{8}$")
RUNNING = re.compile(r"Running stage '([^']+)'")
SKIP_DIRS = {".git", ".dvc"}
RECOVERY_STATE = {LAST_GOOD.as_posix()}  # the flow's own copy of dvc.lock: kept on purpose
KILL_START_TIMEOUT = 300.0  # s to wait for DVC to announce the stage


# --- small helpers -------------------------------------------------------------------------------


def env(tmpdir: Path | None = None) -> dict[str, str]:
    e = offline_env()
    e["PYTHONUNBUFFERED"] = "1"  # DVC's "Running stage" line arrives as it is printed
    if tmpdir is not None:
        tmpdir.mkdir(parents=True, exist_ok=True)
        e["TMPDIR"] = str(tmpdir)
    return e


def dvc(ws: Path, *args: str, tmpdir: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=ws, env=env(tmpdir), capture_output=True,
                          text=True)


def copy_ws(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest, symlinks=True)
    return dest


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def stage_list(ws: Path) -> list[str]:
    res = dvc(ws, "stage", "list", "--name-only")
    if res.returncode != 0:
        raise SystemExit(f"dvc stage list failed:\n{res.stderr}")
    return [line.strip() for line in res.stdout.splitlines() if line.strip()]


def out_paths(ws: Path) -> list[str]:
    """Every DVC out (outs, metrics, plots) of every stage and .dvc file, relative to the repo."""
    code = ("import json; from dvc.repo import Repo\n"
            "import os\n"
            "with Repo('.') as r:\n"
            "    print(json.dumps(sorted({os.path.relpath(o.fs_path, r.root_dir) for s in r.index.stages\n"
            "                             for o in s.outs})))")
    res = subprocess.run([sys.executable, "-c", code], cwd=ws, env=env(), capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"reading DVC outs failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def names_only(rel: str) -> bool:
    return any(rel == p or (p.endswith("/") and rel.startswith(p)) for p in NAMES_ONLY)


def artifact_digest(ws: Path, outs: list[str]) -> dict[str, str]:
    """{relative file path: digest} of every file of every out; see the module doc for exceptions."""
    digest: dict[str, str] = {}
    for out in outs:
        top = ws / out
        files = [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file()) if top.is_dir() else []
        if not top.exists():
            digest[out] = "MISSING"
        for path in files:
            rel = path.relative_to(ws).as_posix()
            if names_only(rel):
                digest[rel] = "present"
            elif path.name == "metrics.json" and rel.startswith("reports/"):
                data = json.loads(path.read_text())
                data = {k: v for k, v in data.items() if k not in TIMING_KEYS}
                digest[rel] = "sha256-sans-timing:" + hashlib.sha256(
                    json.dumps(data, sort_keys=True).encode()).hexdigest()
            else:
                digest[rel] = sha256(path)
    return digest


def workspace_files(ws: Path) -> set[str]:
    files = set()
    for dirpath, dirnames, filenames in os.walk(ws):
        rel_dir = Path(dirpath).relative_to(ws)
        if rel_dir == Path("."):
            dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        files.update((rel_dir / f).as_posix() for f in filenames if (rel_dir / f).as_posix() not in RECOVERY_STATE)
        files.update((rel_dir / d).as_posix() + "/" for d in dirnames if not any(os.scandir(Path(dirpath) / d)))
    return files


def dvc_tmp_files(ws: Path) -> set[str]:
    tmp = ws / ".dvc" / "tmp"
    return {p.relative_to(ws).as_posix() for p in tmp.rglob("*") if p.is_file()} if tmp.is_dir() else set()


def leftovers(ws: Path, ref_files: set[str], ref_dvc_tmp: set[str], tmpdir: Path) -> tuple[list[str], list[str]]:
    """(leftovers, notes). Notes are not failures: entries of a dead pid in .dvc/tmp/rwlock (DVC drops
    them itself when a later command locks those paths)."""
    found = []
    notes = []
    for rel in sorted(workspace_files(ws) - ref_files):
        found.append(f"extra file: {rel}")
    for dirpath, dirnames, filenames in os.walk(ws):
        if ".git" in Path(dirpath).relative_to(ws).parts[:1]:
            continue
        for name in filenames + dirnames:
            rel = (Path(dirpath) / name).relative_to(ws).as_posix()
            if IO_TEMP.match(name) or PACKAGE_STAGING.match(name) or (
                    rel.startswith(".dvc/cache") and name.endswith(".tmp")):
                found.append(f"temp name: {rel}")
    for rel in sorted(dvc_tmp_files(ws) - ref_dvc_tmp):
        found.append(f"new in .dvc/tmp: {rel}")
    rwlock = ws / ".dvc" / "tmp" / "rwlock"
    if rwlock.is_file():
        try:
            lock = json.loads(rwlock.read_text() or "{}")
        except json.JSONDecodeError:
            lock = {"unreadable": rwlock.read_text()[:200]}
        holders = sorted({str(e.get("pid")) for mode in ("read", "write") for v in (lock.get(mode) or {}).values()
                          for e in (v if isinstance(v, list) else [v])} if "unreadable" not in lock else {"?"})
        paths = sum(len(lock.get(mode) or {}) for mode in ("read", "write"))
        if holders:
            notes.append(f".dvc/tmp/rwlock holds {paths} path(s) for dead pid(s) {', '.join(holders)}")
    if tmpdir.is_dir():
        # torchinductor_<user>: torch's compile cache, which uninterrupted runs create as well
        found += [f"left in TMPDIR: {p.relative_to(tmpdir).as_posix()}" for p in sorted(tmpdir.iterdir())
                  if not p.name.startswith("torchinductor_")]
    return sorted(set(found)), notes


# --- runs ----------------------------------------------------------------------------------------


def timed_repro(ws: Path, args: list[str]) -> tuple[int, str, str, list[tuple[str, float]], float]:
    """Run `dvc <args>` streaming stdout; (rc, stdout, stderr, [(stage, t_running_line)], t_end)."""
    proc = subprocess.Popen([sys.executable, "-m", "dvc", *args], cwd=ws, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, bufsize=1)
    start = time.monotonic()
    marks: list[tuple[str, float]] = []
    out: list[str] = []
    err: list[str] = []
    t = threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True)
    t.start()
    for line in proc.stdout:
        out.append(line)
        m = RUNNING.search(line)
        if m:
            marks.append((m.group(1), time.monotonic() - start))
    rc = proc.wait()
    t.join()
    return rc, "".join(out), "".join(err), marks, time.monotonic() - start


def durations(marks: list[tuple[str, float]], end: float) -> dict[str, float]:
    return {stage: (marks[i + 1][1] if i + 1 < len(marks) else end) - t for i, (stage, t) in enumerate(marks)}


def kill_during(ws: Path, stage: str, delay: float, tmpdir: Path) -> dict[str, Any]:
    """`dvc repro --single-item --force <stage>`; SIGKILL its process group `delay` s after DVC says
    "Running stage"."""
    proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "--single-item", "--force", stage], cwd=ws,
                            env=env(tmpdir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            start_new_session=True)
    started = threading.Event()
    lines: list[str] = []

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            if f"Running stage '{stage}'" in line:
                started.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    t0 = time.monotonic()
    announced = started.wait(KILL_START_TIMEOUT)
    t_run = time.monotonic()
    killed = False
    if announced:
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            killed = True
    else:
        os.killpg(proc.pid, signal.SIGKILL)
    rc = proc.wait()
    t_kill = time.monotonic()
    reader.join(5)
    # any straggler in the group; orphaned children are zombies until init reaps them, so poll a while
    survivors = True
    for _ in range(50):
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            survivors = False
            break
        time.sleep(0.1)
    return {"announced": announced, "killed": killed, "returncode": rc, "delay_s": round(delay, 3),
            "killed_after_running_s": round(t_kill - t_run, 3), "since_start_s": round(t_kill - t0, 3),
            "group_survivors": survivors, "output_tail": "".join(lines)[-600:]}


def rerun_status(stdout: str, stage: str) -> str:
    if re.search(rf"Stage '{re.escape(stage)}' is cached - skipping run", stdout):
        return "restored from cache"  # "is cached - skipping run": run-cache or dvc.lock + object cache
    if f"Running stage '{stage}'" in stdout:
        return "re-executed"
    if f"Stage '{stage}' didn't change" in stdout:
        return "unchanged (skipped)"
    return "not mentioned"


def recovery_kind(message: str) -> str:
    """A short name for one recover_workspace message (they hold per-kill paths)."""
    if message.startswith("FAILED"):
        return "dvc.lock broken, no copy"
    return "dvc.lock restored" if "was broken" in message else "scratch folder removed"


def same_tree(a: Path, b: Path) -> bool:
    """Whether folders `a` and `b` hold the same relative file names with the same bytes."""
    def files(root: Path) -> dict[str, str]:
        return {p.relative_to(root).as_posix(): sha256(p) for p in sorted(root.rglob("*")) if p.is_file()}
    return b.is_dir() and files(a) == files(b)


def verify_packages(ws: Path, unchanged_from: Path | None = None) -> list[str]:
    """`lathe verify` every package in `ws`; with `unchanged_from` (the reference, verified once in
    `build`), skip packages byte-identical to the reference's (the rerun did not rebuild them)."""
    problems = []
    for pkg in sorted((ws / "models" / "packages").glob("*")):
        if unchanged_from is not None and same_tree(pkg, unchanged_from / pkg.relative_to(ws)):
            continue
        if pkg.is_dir() and not pkg.name.startswith("."):
            res = subprocess.run([str(Path(sys.executable).parent / "lathe"), "verify", str(pkg.relative_to(ws))],
                                 cwd=ws, env=env(), capture_output=True, text=True)
            if res.returncode != 0:
                problems.append(f"lathe verify {pkg.name} failed: {(res.stdout + res.stderr)[-400:]}")
    return problems


def one_kill(snapshot: Path, dest: Path, stage: str, delay: float, ref: dict[str, Any],
             drop_run_cache: bool = False) -> dict[str, Any]:
    ws = copy_ws(snapshot, dest / "repo")
    if drop_run_cache:  # else the rerun may restore the killed stage from DVC's run-cache instead of running it
        shutil.rmtree(ws / ".dvc" / "cache" / "runs", ignore_errors=True)
    tmpdir = dest / "tmp"
    shutil.rmtree(tmpdir, ignore_errors=True)
    rec: dict[str, Any] = {"stage": stage}
    recover_workspace(ws)  # as the flow's stage task does before `dvc repro`: keeps a copy of dvc.lock
    rec["kill"] = kill_during(ws, stage, delay, tmpdir)
    rec["after_kill_leftovers"], rec["after_kill_notes"] = leftovers(ws, ref["files"], ref["dvc_tmp"], tmpdir)
    shutil.rmtree(tmpdir, ignore_errors=True)  # the rerun's own TMPDIR starts empty
    t0 = time.monotonic()
    try:
        recovered = recover_workspace(ws)
    except LockfileBroken as exc:
        recovered = [f"FAILED: {exc}"]
    res = dvc(ws, "repro", tmpdir=tmpdir)
    rec["rerun"] = {"returncode": res.returncode, "seconds": round(time.monotonic() - t0, 1),
                    "recovered": recovered,
                    "stage_status": rerun_status(res.stdout, stage),
                    "ran": RUNNING.findall(res.stdout),
                    "stale_lock_warnings": len(re.findall(r"had been killed\. Auto removed it", res.stderr))}
    problems: list[str] = []
    if res.returncode != 0:
        rec["rerun"]["output_tail"] = (res.stdout + res.stderr)[-1500:]
        problems.append(f"rerun `dvc repro` exited {res.returncode}")
    else:
        digest = artifact_digest(ws, ref["outs"])
        for rel in sorted(set(digest) | set(ref["digest"])):
            a, b = ref["digest"].get(rel), digest.get(rel)
            if a != b:
                problems.append(f"differs: {rel} ({'missing' if b is None else 'extra' if a is None else 'content'})")
        status = dvc(ws, "status")
        if "up to date" not in status.stdout:
            problems.append(f"dvc status not clean: {status.stdout[-400:]}")
        problems += verify_packages(ws, unchanged_from=ref["ws"])
    after, rec["notes"] = leftovers(ws, ref["files"], ref["dvc_tmp"], tmpdir)
    problems += [f"leftover after rerun: {x}" for x in after]
    # the rerun never removes what the killed run left in the system temp folder
    problems += [f"leftover from the kill: {x}" for x in rec["after_kill_leftovers"] if x.startswith("left in TMPDIR")]
    rec["problems"] = problems
    rec["outcome"] = ("pass" if not problems else "fail") if rec["kill"]["killed"] else (
        "not killed (stage finished first)" if not problems else "fail (not killed)")
    return rec


# --- main ----------------------------------------------------------------------------------------


def build(workdir: Path, log) -> dict[str, Any]:
    t0 = time.monotonic()
    base = make_workspace(workdir / "base", tiny_params())
    log(f"base workspace in {time.monotonic() - t0:.1f} s")
    ref_ws = copy_ws(base, workdir / "reference")
    rc, out, err, marks, end = timed_repro(ref_ws, ["repro"])
    if rc != 0:
        raise SystemExit(f"reference dvc repro failed:\n{out[-2000:]}\n{err[-2000:]}")
    log(f"reference dvc repro: {end:.1f} s, {len(marks)} stages")
    bad = verify_packages(ref_ws)
    if bad:
        raise SystemExit("reference packages do not verify:\n" + "\n".join(bad))
    outs = out_paths(ref_ws)
    return {"base": base, "ws": ref_ws, "seconds": round(end, 1), "durations": durations(marks, end), "outs": outs,
            "ran": [stage for stage, _ in marks], "stdout": out,
            "digest": artifact_digest(ref_ws, outs), "files": workspace_files(ref_ws),
            "dvc_tmp": dvc_tmp_files(ref_ws)}


def snapshots(ref: dict[str, Any], order: list[str], wanted: list[str], workdir: Path, log) -> dict[str, Path]:
    """Copies of base built stage by stage, one taken before each wanted stage."""
    ws = copy_ws(ref["base"], workdir / "stepwise")
    snaps: dict[str, Path] = {}
    last = max(order.index(s) for s in wanted)
    for stage in order[: last + 1]:
        if stage in wanted:
            snaps[stage] = copy_ws(ws, workdir / "snapshots" / stage.replace("@", "_").replace("/", "_"))
        res = dvc(ws, "repro", "--single-item", stage)
        if res.returncode != 0:
            raise SystemExit(f"stepwise build failed at {stage}:\n{res.stdout[-1500:]}\n{res.stderr[-1500:]}")
    log(f"snapshots for {len(snaps)} stages")
    return snaps


def run(stages: list[str] | None, per_stage: int, seed: int, mode: str, workdir: Path, log=print,
        run_cache: str | None = None, ref: dict[str, Any] | None = None, jobs: int = 1) -> dict[str, Any]:
    """run_cache: keep | drop the copy's .dvc/cache/runs before each kill (default: drop in built mode,
    so the rerun re-executes the killed stage; keep in fresh mode, where it holds only upstream stages).
    ref: a reference `build` already made (the tests share one); it is only read and copied.
    jobs: kills run side by side (each in its own copy; 2 on this 2-core machine halves the time)."""
    run_cache = run_cache or ("drop" if mode == "built" else "keep")
    t_all = time.monotonic()
    ref = ref or build(workdir, log)
    order = stage_list(ref["ws"])
    wanted = order if not stages else stages
    unknown = [s for s in wanted if s not in order]
    if unknown:
        raise SystemExit(f"unknown stages {unknown}; `dvc stage list` has {order}")
    wanted = [s for s in order if s in wanted]
    snaps = snapshots(ref, order, wanted, workdir, log) if mode == "fresh" else {s: ref["ws"] for s in wanted}
    drop = run_cache == "drop"

    def kill_one(item: tuple[str, int]) -> dict[str, Any]:
        stage, i = item
        run_time = ref["durations"].get(stage, 0.0)
        rng = random.Random(f"{seed}:{stage}:{i}")  # per kill: the same points whatever --jobs is
        delay = rng.uniform(0.0, run_time)
        dest = workdir / "kills" / f"{stage.replace('@', '_').replace('/', '_')}-{i}"
        rec = one_kill(snaps[stage], dest, stage, delay, ref, drop_run_cache=drop)
        if not rec["kill"]["killed"] and rec["kill"]["announced"]:
            # the stage ran faster than in the reference (which may have shared the CPU): draw again
            # inside the duration just observed, in a fresh copy
            actual = rec["kill"]["killed_after_running_s"]
            shutil.rmtree(dest, ignore_errors=True)
            rec = one_kill(snaps[stage], dest, stage, rng.uniform(0.0, 0.9 * actual), ref, drop_run_cache=drop)
            rec["redrawn_after_finishing_in_s"] = actual
        rec["index"], rec["stage_run_time_s"] = i, round(run_time, 2)
        log(f"{stage} #{i}: kill at {rec['kill']['delay_s']:.2f}/{run_time:.2f} s -> {rec['outcome']}; rerun "
            f"{rec['rerun']['returncode']} ({rec['rerun']['stage_status']}, {rec['rerun']['seconds']} s, "
            f"{rec['rerun']['stale_lock_warnings']} stale-lock warnings)"
            + "".join(f"\n    recovered: {m}" for m in rec["rerun"]["recovered"])
            + "".join(f"\n    {p}" for p in rec["problems"])
            + "".join(f"\n    after kill: {p}" for p in rec["after_kill_leftovers"])
            + "".join(f"\n    note after rerun: {p}" for p in rec["notes"]))
        shutil.rmtree(dest / "repo", ignore_errors=True)
        return rec

    # each kill works in its own copy, so they may run side by side (--jobs); results keep stage order
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        kills = list(pool.map(kill_one, [(stage, i) for stage in wanted for i in range(per_stage)]))
    summary = {}
    for stage in wanted:
        recs = [k for k in kills if k["stage"] == stage]
        summary[stage] = {"kills": sum(k["kill"]["killed"] for k in recs), "runs": len(recs),
                          "pass": sum(k["outcome"] == "pass" for k in recs),
                          "fail": sum(k["outcome"].startswith("fail") for k in recs),
                          "recovered": sorted({recovery_kind(m) for k in recs for m in k["rerun"]["recovered"]}),
                          "leftovers_after_kill": sorted({re.sub(r"-\d+(/|$)", r"-<pid>\1", x) for k in recs
                                                          for x in k["after_kill_leftovers"]})}
    return {"mode": mode, "run_cache": run_cache, "seed": seed, "per_stage": per_stage, "jobs": jobs, "reference_repro_s": ref["seconds"],
            "stage_run_times_s": {k: round(v, 2) for k, v in ref["durations"].items()},
            "excluded_timing": {"metrics_keys": list(TIMING_KEYS), "names_only": list(NAMES_ONLY)},
            "summary": summary, "kills": kills, "ok": all(k["outcome"] != "fail" and not k["outcome"].startswith("fail")
                                                          for k in kills),
            "seconds": round(time.monotonic() - t_all, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stages", nargs="+", default=None, help="stages to kill (default: every `dvc stage list` entry)")
    p.add_argument("--per-stage", type=int, default=3, help="kills per stage (default 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mode", choices=["fresh", "built"], default="fresh",
                   help="fresh: kill in a workspace built up to the previous stage (default); built: in a "
                        "fully built one (cheaper)")
    p.add_argument("--run-cache", choices=["keep", "drop"], default=None,
                   help="keep or drop DVC's run-cache in each kill copy (default: drop in built mode, keep in fresh)")
    p.add_argument("--jobs", type=int, default=1, help="kills run side by side (default 1)")
    p.add_argument("--json", type=Path, default=None, help="write the full report here")
    p.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a new temp folder)")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = p.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="lathe-kill-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        report = run(args.stages, args.per_stage, args.seed, args.mode, workdir, run_cache=args.run_cache,
                     jobs=args.jobs)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    print(f"\n{'stage':28} kills pass fail  recovered by the rerun; leftovers right after the kill")
    for stage, s in report["summary"].items():
        print(f"{stage:28} {s['kills']}/{s['runs']:<3} {s['pass']:4} {s['fail']:4}  {', '.join(s['recovered']) or '-'}; "
              f"{'; '.join(s['leftovers_after_kill']) or '-'}")
    print(f"{'OK' if report['ok'] else 'FAILED'} in {report['seconds']} s (reference repro {report['reference_repro_s']} s)")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
