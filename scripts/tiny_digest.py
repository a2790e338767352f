"""The tiny pipeline's identity digest: sha256 of every file of every data/ and models/ output.

`make test` rebuilds the tiny pipeline (tests.tiny, scripts/kill_test.build) and compares its digest
with the committed one, tests/tiny_digest.json, on whatever machine it runs: this is the
cross-machine check of "bit for bit on any x86-64 machine with AVX2" (README "Determinism").
Packages are left out (their signature is randomised ECDSA and they carry measured latency;
`lathe verify --rebuild` compares those), and so are reports/ (they hold latency).

    python scripts/tiny_digest.py            # build the tiny pipeline here and compare
    python scripts/tiny_digest.py --write    # ... and write tests/tiny_digest.json (after a deliberate change)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

COMMITTED = ROOT / "tests" / "tiny_digest.json"
IDENTITY_ROOTS = ("data/", "models/")
NOT_IDENTITY = ("models/packages/",)


def identity_digest(digest: dict[str, str]) -> dict[str, str]:
    """The data/ and models/ entries of a scripts/kill_test.artifact_digest, packages excepted."""
    return {k: v for k, v in sorted(digest.items())
            if k.startswith(IDENTITY_ROOTS) and not k.startswith(NOT_IDENTITY)}


def differences(expected: dict[str, str], got: dict[str, str]) -> list[str]:
    """One line per path that is missing, extra or different."""
    return [f"{p}: {'missing' if p not in got else 'extra' if p not in expected else 'differs'}"
            for p in sorted(set(expected) | set(got)) if expected.get(p) != got.get(p)]


def document(digest: dict[str, str]) -> dict[str, Any]:
    from lathe.determinism import machine_record, numerics_record

    return {"about": "sha256 of every data/ and models/ output file of the tiny pipeline (scripts/tiny_digest.py)",
            "numerics": numerics_record(), "made_on": machine_record(), "files": identity_digest(digest)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"write {COMMITTED.relative_to(ROOT)}")
    args = parser.parse_args(argv)
    from scripts.kill_test import build

    with tempfile.TemporaryDirectory(prefix="lathe-tiny-digest-") as tmp:
        ref = build(Path(tmp), log=lambda msg: print(msg, file=sys.stderr))
    doc = document(ref["digest"])
    if args.write:
        COMMITTED.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        print(f"wrote {COMMITTED} ({len(doc['files'])} files)")
        return 0
    expected = json.loads(COMMITTED.read_text())
    diffs = differences(expected["files"], doc["files"])
    print(f"{len(doc['files'])} files; made on {expected['made_on']['cpu']}, here {doc['made_on']['cpu']}: "
          + ("identical" if not diffs else f"{len(diffs)} differ:\n  " + "\n  ".join(diffs)))
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
