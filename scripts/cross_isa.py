"""Run scripts/numerics_probe.py here and on emulated CPUs of the other vendor and instruction sets
(qemu-user, `apt install qemu-user`), and compare every hash: the cross-machine evidence behind
README "Determinism". Emulated runs take 10-15 minutes each; they run side by side.

    python scripts/cross_isa.py                       # here + EPYC-Rome (AMD, AVX2) + Haswell (Intel, AVX2)
    python scripts/cross_isa.py --cpu EPYC-Milan --json reports/cross_isa.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
PROBE = ROOT / "scripts" / "numerics_probe.py"

from scripts.numerics_probe import HASHES as COMPARED  # noqa: E402
from scripts.numerics_probe import MUST_AGREE  # noqa: E402


def run(cpu: str | None) -> dict:
    cmd = [sys.executable, str(PROBE)] if cpu is None else ["qemu-x86_64", "-cpu", cpu, sys.executable, str(PROBE)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=7200)
    if res.returncode != 0:
        return {"error": res.stderr.strip().splitlines()[-1] if res.stderr.strip() else f"exit {res.returncode}"}
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="append", help="qemu CPU model (repeatable); default EPYC-Rome and Haswell")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    cpus = args.cpu or ["EPYC-Rome", "Haswell"]
    if shutil.which("qemu-x86_64") is None:
        print("qemu-x86_64 not found: apt install qemu-user", file=sys.stderr)
        return 2
    from lathe.determinism import cpu_model

    with ThreadPoolExecutor(max_workers=len(cpus) + 1) as pool:
        runs = dict(zip([f"native ({cpu_model()})"] + [f"qemu {c}" for c in cpus],
                        pool.map(run, [None, *cpus])))
    ref = next(iter(runs.values()))
    ok = True
    print(f"{'run':40} " + " ".join(f"{k:>16}" for k in COMPARED))
    for name, r in runs.items():
        if "error" in r:
            print(f"{name:40} ERROR {r['error']}")
            ok = False
            continue
        print(f"{name:40} " + " ".join(f"{r[k]:>16}" for k in COMPARED))
        ok &= all(r[k] == ref.get(k) for k in MUST_AGREE)
    print("identical on every run (" + ", ".join(MUST_AGREE) + ")" if ok else "DIFFERENT")
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "must_agree": MUST_AGREE, "identical": ok}, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
