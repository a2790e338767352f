"""Packages built on other machines, kept in docs/evidence/ (its README says how to rebuild them there).

Each must still verify offline with today's `lathe verify` and the public key its build machine made
(docs/evidence/keys/<folder>.pub, which does not lie beside the package): the evidence has not been
altered, and the verifier still accepts the packages an auditor may hold.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EVIDENCE = ROOT / "docs" / "evidence"
ARCHIVES = sorted(EVIDENCE.glob("*/*.tar.gz"))
LATHE = Path(sys.executable).parent / "lathe"


def test_there_is_evidence_from_another_machine():
    assert ARCHIVES, f"no package under {EVIDENCE}"


@pytest.mark.parametrize("archive", ARCHIVES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_a_package_built_elsewhere_verifies_with_its_build_machines_key(archive: Path):
    key = EVIDENCE / "keys" / f"{archive.parent.name}.pub"
    expected = Path(f"{archive}.sha256").read_text().split()[0]
    with tarfile.open(archive) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("/manifest.json"))
        manifest = json.loads(tar.extractfile(member).read())  # type: ignore[union-attr]

    res = subprocess.run([str(LATHE), "verify", str(archive), "--public-key", str(key), "--json"],
                         capture_output=True, text=True, timeout=300)

    assert hashlib.sha256(archive.read_bytes()).hexdigest() == expected
    assert res.returncode == 0, res.stdout + res.stderr
    report = json.loads(res.stdout)
    assert report["ok"] and {c["name"]: c["status"] for c in report["checks"]}["signature"] == "PASS"
    assert manifest["build"]["machine"]["cpu"] and manifest["git"]["commit"]
    # the commit it was built at is in this repository's history (a rebuild starts there)
    assert subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", f"{manifest['git']['commit']}^{{commit}}"],
                          capture_output=True).returncode == 0
