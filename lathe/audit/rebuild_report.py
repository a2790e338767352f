"""Rebuild archaeology, the verdict: the `rebuild`, `measured` and `rebuilt signature` lines of a verify
report, from the comparison of a package with its rebuild (lathe.audit.rebuild_compare)."""

from __future__ import annotations

from pathlib import Path

from lathe.audit.rebuild_compare import (
    compare_archives,
    compare_packages,
    equivalence,
    is_float_package,
    same_model,
)
from lathe.audit.report import VerifyReport
from lathe.audit.signature import check_signature
from lathe.audit.trust import Trust
from lathe.ship.contract import SIGNATURE_FILE


def report_rebuild(pkg: Path, archive: Path | None, rebuilt: Path, rebuilt_archive: Path, commit: str, scope: str,
                   pinned: bool, rebuild_trust: Trust, report: VerifyReport) -> None:
    """Compare the rebuilt package (and archive, when both exist) with the original and report the verdict:
    identical; equivalent (on a machine that cannot run the pinned kernels, or for a float model whose
    bytes are identical but whose onnxruntime outputs differ in the last bits); or different. The rebuilt
    package's signature is checked against `rebuild_trust`, the key the rebuild signed with
    (lathe.audit.trust.rebuild_key_trust)."""
    comparison = compare_packages(pkg, rebuilt)
    diffs = list(comparison.diffs)
    if archive is not None and rebuilt_archive.is_file():
        diffs += compare_archives(archive, rebuilt_archive, comparison.follows)
    float_model = pinned and is_float_package(pkg) and same_model(pkg, rebuilt)
    equivalent = equivalence(pkg, rebuilt) if diffs and (not pinned or float_model) else None
    if equivalent:
        why = ("the same model bytes, a float model: onnxruntime's float kernels differ in the last bits between "
               "instruction sets (AVX-512 or AVX2), so its self-test logits can too" if pinned
               else "on a machine without the pinned kernels")
        report.add("rebuild", "PASS", f"EQUIVALENT, NOT IDENTICAL: rebuilt at {commit[:12]} ({scope}); {why}; "
                                      f"{equivalent}; differs: " + "; ".join(diffs))
    elif diffs:
        report.add("rebuild", "FAIL", f"rebuilt at {commit[:12]} ({scope}); differs: " + "; ".join(diffs))
    else:
        names = sorted(p.name for p in rebuilt.iterdir() if p.name != SIGNATURE_FILE)
        exact = [n for n in names if n not in comparison.follows]
        also = " and the archive's members" if archive is not None and rebuilt_archive.is_file() else ""
        follows = (f"; {', '.join(sorted(comparison.follows))} identical but for measured values"
                   if comparison.follows else "")
        report.add("rebuild", "PASS", f"rebuilt at {commit[:12]} ({scope}): {len(exact)} of {len(names)} files "
                                    f"byte-identical ({', '.join(exact)}){also}{follows}; signature excluded: "
                                    f"ECDSA is randomised")
    if comparison.measured:
        report.add("measured", "INFO", "not identity, shown side by side (build machine vs here): "
                                       + "; ".join(comparison.measured))
    check_signature(rebuilt, rebuild_trust, report, name="rebuilt signature", fact=None)
