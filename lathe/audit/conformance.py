"""Offline checks that what a package states conforms: bound to the expected target and package id,
its variant the best under the target's selection policy, preprocessing.json within the contract's
schema and bounds, and the model graph within the allowed ops (parsed, never run)."""

from __future__ import annotations

from pathlib import Path

from lathe.audit.integrity import read_package_file
from lathe.audit.report import VerifyReport
from lathe.io import printable
from lathe.ship.contract import MODEL_FILE, PREPROCESSING_FILE, Manifest, Preprocessing, parse_json_file


def check_binding(manifest: Manifest, names: list[str], report: VerifyReport, target: str | None,
                  package_id: str | None) -> None:
    """The manifest's target against the folder/archive names and --target; its id against --package-id."""
    problems = []
    for name in names:
        if name != manifest.target.name:
            problems.append(f"the manifest says target {manifest.target.name!r} but the package is named "
                            f"{printable(name)!r} (renamed, or another target's package)")
    if target is not None and target != manifest.target.name:
        problems.append(f"expected target {printable(target)!r} (--target), the package is for {manifest.target.name!r}")
    if package_id is not None and package_id.lower() != manifest.package_id:
        problems.append(f"expected package {printable(package_id)} (--package-id), this is {manifest.package_id} "
                        "(an older or another build)")
    if problems:
        report.add("binding", "FAIL", "; ".join(problems))
        return
    pinned = f"package id {manifest.package_id} as pinned" if package_id else (
        "package id not pinned (pass --package-id from the deployment record to refuse older builds)")
    report.add("binding", "PASS", f"target {manifest.target.name} matches the package name"
                                  f"{' and --target' if target else ''}; {pinned}")


def check_selection(manifest: Manifest, report: VerifyReport) -> None:
    """The chosen variant is the best, under the target's selection policy, of the passing candidates listed."""
    from lathe.ship.gates import choice_problems, rank_rule

    with report.guard("selection"):
        policy, rows = manifest.target.selection, manifest.selection
        if policy is None or rows is None:
            why = ("the manifest names no selection policy (target.selection; built before policies existed)"
                   if policy is None else f"policy {policy}, but the manifest lists no candidates")
            report.add("selection", "SKIP", f"{why}: the choice of {manifest.variant} is not checked")
            return
        test = manifest.metrics.get("test")
        problems = choice_problems(policy, manifest.variant, [r.model_dump() for r in rows],
                                   test if isinstance(test, dict) else {})
        if problems:
            report.add("selection", "FAIL", printable("; ".join(problems), 600))
        else:
            passing = sum(r.passed for r in rows)
            report.add("selection", "PASS", f"{manifest.variant} is policy {policy}'s best ({rank_rule(policy)}) "
                                            f"of the {passing} listed candidates passing every gate")


def check_preprocessing(pkg: Path, report: VerifyReport) -> Preprocessing | None:
    with report.guard("preprocessing"):
        pre = parse_json_file(read_package_file(pkg, PREPROCESSING_FILE), PREPROCESSING_FILE, Preprocessing)
        report.add("preprocessing", "PASS", f"input {pre.input.shape}, {len(pre.class_names)} classes, threshold "
                                            f"{pre.decision.threshold:g}, all values within bounds")
        return pre
    return None


def check_model(pkg: Path, pre: Preprocessing | None, report: VerifyReport) -> None:
    from lathe.audit.selftest import check_model_graph

    if pre is None:
        report.add("model graph", "SKIP", f"needs a valid {PREPROCESSING_FILE}")
        return
    with report.guard("model graph"):
        summary = check_model_graph(read_package_file(pkg, MODEL_FILE), pre)
        report.add("model graph", "PASS", f"parsed, not run: {summary}")
