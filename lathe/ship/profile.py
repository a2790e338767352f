"""Gate profiles: every variant judged against a set of target profiles without building a package.

A profile file holds a `targets:` mapping shaped like params.yaml's (lathe.ship.params.TargetParams);
`profiles/plant.yaml` keeps the gates a production line would run with. `lathe gates --profile FILE`
chooses each variant's threshold on val and judges it on test exactly as the package stage does
(lathe.ship.gates), and says per target which variants pass, or how far the closest falls short.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lathe.config import load_params
from lathe.data.contract import read_task
from lathe.ship.gates import (
    Candidate,
    evaluate_candidates,
    gate_table,
    load_gate_splits,
    measured_failures,
    passes_unmeasured_gates,
    select,
)
from lathe.ship.params import TargetParams, parse_targets


@dataclass(frozen=True)
class TargetVerdict:
    target: str
    profile: TargetParams
    candidates: list[Candidate]
    chosen: Candidate | None  # the package stage's choice under this profile; None when no variant passes
    # (latency apart: measured on this machine, it is reported but does not decide; lathe.ship.gates.select)


def load_profile(path: Path) -> dict[str, TargetParams]:
    """The `targets:` of a profile file (or of params.yaml); errors name the file and the key."""
    return parse_targets(load_params(Path(path)), source=str(path))


def judge_targets(targets: dict[str, TargetParams], variants: list[str], prepared_dir: Path, models_dir: Path,
                  reports_dir: Path, progress=lambda msg: None) -> list[TargetVerdict]:
    """Every variant against every target, with the package stage's threshold rule and gates."""
    task = read_task(prepared_dir)
    splits = load_gate_splits(prepared_dir)
    out = []
    for name, profile in targets.items():
        progress(f"{name}: {len(variants)} variants, threshold on val for defective recall "
                 f">= {profile.defective_recall_target}")
        candidates, _ = evaluate_candidates(variants, models_dir, reports_dir, splits, profile, task.defective_indices)
        out.append(TargetVerdict(name, profile, candidates, select(candidates, profile.selection)))
    return out


def _shortfalls(c: Candidate) -> list[str]:
    """'min_defective_recall 0.912 < 0.95' for each gate `c` fails."""
    return [f"{g['gate']} {g['value']:.3f} {'>' if g['gate'].startswith('max_') else '<'} {g['limit']}"
            for g in c.gates if not g["passed"]]


def closest(candidates: list[Candidate]) -> Candidate:
    """The candidate failing the fewest gates; ties to the lower test false-reject rate, then the name."""
    return min(candidates, key=lambda c: (sum(not g["passed"] for g in c.gates),
                                         c.threshold.test["false_reject_rate"], c.variant))


def verdict_line(v: TargetVerdict) -> str:
    """One line per target: the choice, or the closest variant and what it misses."""
    if v.chosen is not None:
        passing = [c.variant for c in v.candidates if passes_unmeasured_gates(c)]
        slow = measured_failures(v.chosen)
        return (f"{v.target}: PASS - {len(passing)} of {len(v.candidates)} variants pass every gate (latency apart); "
                f"policy {v.profile.selection} chooses {v.chosen.variant}"
                + (f"; measured on this machine it misses {'; '.join(slow)}" if slow else ""))
    best = closest(v.candidates)
    t = best.threshold.test
    return (f"{v.target}: FAIL - no variant passes every gate (latency apart); closest {best.variant} (threshold {best.threshold.value} "
            f"on val): test defective recall {t['defective_recall']:.3f} "
            f"({t.get('defective_recall_ci95_low', 0):.3f}-{t.get('defective_recall_ci95_high', 0):.3f}), "
            f"false-reject rate {t['false_reject_rate']:.3f} "
            f"({t.get('false_reject_rate_ci95_low', 0):.3f}-{t.get('false_reject_rate_ci95_high', 0):.3f}); "
            f"misses {'; '.join(_shortfalls(best))}")


def gates_report(verdicts: list[TargetVerdict], source: str) -> str:
    """Markdown: per target its recall target, the gate table of every variant, and the verdict line."""
    lines = [f"# Gates of {source}", ""]
    for v in verdicts:
        lines += [f"## {v.target}", "",
                  f"Threshold: the highest reaching defective recall >= {v.profile.defective_recall_target} on val; "
                  "every figure below is on test (95% bootstrap intervals).", "",
                  gate_table(v.target, v.candidates), "", verdict_line(v), ""]
    return "\n".join(lines)
