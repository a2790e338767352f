"""dvc.yaml is the one source of paths: every stage depends on the code it runs."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def local_imports(path: Path) -> set[str]:
    """Modules of this project (lathe.*, stages.*) that a file imports at any depth."""
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return {n for n in names if n.split(".")[0] in ("lathe", "stages")}


def code_closure(module: str) -> set[str]:
    """Source files (relative paths) reached from `module` through project imports."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        mod = todo.pop()
        rel = mod.replace(".", "/") + ".py"
        if rel in seen or not (ROOT / rel).is_file():
            continue
        seen.add(rel)
        todo.extend(local_imports(ROOT / rel))
    return seen


def stage_entries() -> dict[str, dict]:
    """Stage name -> definition, with foreach bodies taken as their template."""
    doc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    return {name: stage.get("do", stage) for name, stage in doc["stages"].items()}


def test_every_stage_depends_on_all_code_it_imports():
    for name, stage in stage_entries().items():
        module = re.search(r"python -m (stages\.\w+)", stage["cmd"]).group(1)
        # importing stages.<x> runs stages/__init__.py first: it pins the numeric platform
        needed = (code_closure(module) | code_closure("stages.__init__")) - {"lathe/__init__.py", "lathe/errors.py"}
        missing = needed - set(stage["deps"])
        assert not missing, f"stage {name}: code it imports is not a dep: {sorted(missing)}"


def test_every_stage_reads_only_declared_params_sections():
    for name, stage in stage_entries().items():
        module = re.search(r"python -m stages\.(\w+)", stage["cmd"]).group(1)
        source = (ROOT / "stages" / f"{module}.py").read_text()
        sections = set(re.findall(r'section\(args, "(\w+)"', source))
        declared = {p.split(".")[0] for p in stage.get("params", [])}
        assert sections <= declared, f"stage {name} reads params {sections - declared} it does not declare"


def test_the_control_declares_every_distill_key_it_trains_with():
    """distill_control lists distill keys one by one (it must not rerun when only T or alpha
    change), so a new training field must be added there too, or DVC misses a change."""
    from lathe.compress.params import DistillParams

    declared = {p.removeprefix("distill.") for p in stage_entries()["distill_control"]["params"]}
    unused_by_the_control = {"temperature", "alpha"}
    missing = set(DistillParams.model_fields) - unused_by_the_control - declared
    assert not missing, f"distill_control does not declare distill.{sorted(missing)}"


def test_the_variant_list_is_written_out_only_where_dvc_templating_cannot_reach():
    """dvc.yaml `vars.variants` is the pipeline's variant list (each float variant, its PTQ INT8 twin, and
    the qat stage's outputs). DVC interpolates no lists into a cmd or
    a deps list, so the compare stage spells it out; ALL_VARIANTS (the package stage's default
    candidates, `lathe check`'s known names) must say the same."""
    from lathe.ship.params import ALL_VARIANTS

    doc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    lists = {k: v for entry in doc["vars"] for k, v in entry.items()}
    variants, floats = lists["variants"], lists["float_variants"]
    qat = [out.removeprefix("models/") for out in doc["stages"]["qat"]["outs"] if isinstance(out, str)]
    assert qat == ["qat/student"]
    assert variants == floats + [f"quantized/{v}" for v in floats] + qat
    compare = doc["stages"]["compare"]
    assert compare["cmd"].split()[4:] == variants
    for report in ("metrics.json", "detail.json", "predictions.csv"):
        assert [d for d in compare["deps"] if d.endswith(report)] == [f"reports/{v}/{report}" for v in variants]
    assert ALL_VARIANTS == variants
