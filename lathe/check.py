"""`lathe check`: every mistake in params.yaml and the raw data that would surface minutes into a run, at once.

One pass over every params section (the pydantic models of lathe.config), every target and its
gates, the raw-data contract (labels.csv rows and the files they list, by their headers) and the
facts that tie them together: the splits ingest will make (the same `stratified_split`, so the
counts are exact), calibration size against the train split, samples per class per split, class
counts against the architectures, package variants, the signing key. Every problem is one line
naming `params.yaml: <dotted.key>` or `<labels.csv>:<line> (<file>)`, with a did-you-mean
suggestion for unknown keys and names.

Fast by design (about a second on ELPV's 2,624 images): nothing here imports torch, onnxruntime
or great_expectations; images are checked by their headers, not decoded.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from lathe.compress.params import DistillParams, LowRankParams, PruneParams, QatParams, QuantizeParams
from lathe.config import Section, _field_names, did_you_mean, error_path, load_params, tag_message
from lathe.data.contract import DataParams
from lathe.data.params import IngestParams, ValidateParams
from lathe.errors import DataError, LatheError
from lathe.measure.params import BenchParams, CompareParams, EvaluateParams
from lathe.model.params import LiteSpec, TrainParams, arch_mismatches
from lathe.model.pretrained import check_weights_file, installed_weights, pretrained_source
from lathe.ship.params import ALL_VARIANTS, TARGET_NAME, PackageParams, TargetParams
from lathe.ship.signing import ENV_SIGNING_KEY, signing_key_path

PARAMS_FILE = "params.yaml"
PROJECT_FILE = "dvc.yaml"
INGEST_STAGE, INGEST_MODULE = "ingest", "stages.ingest"
ENV_ALLOW_DIRTY = "LATHE_ALLOW_DIRTY"

# Every params section a stage or `make bench` reads, and its model (targets are checked per entry).
SECTIONS: dict[str, type[Section]] = {
    "data": DataParams, "ingest": IngestParams, "validate": ValidateParams, "train_teacher": TrainParams,
    "prune": PruneParams,
    "prune_baseline": PruneParams, "distill": DistillParams, "lowrank": LowRankParams,
    "quantize": QuantizeParams, "qat": QatParams, "evaluate": EvaluateParams, "compare": CompareParams, "bench": BenchParams,
    "package": PackageParams,
}


@dataclass(frozen=True)
class Problem:
    """One finding: where (`params.yaml: quantize.calibration_size`, `data/raw/labels.csv:7 (x.png)`) and what."""

    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


@dataclass
class CheckReport:
    """Problems stop a run; warnings are facts that may fail it late (a dirty tree, a gate above its target)."""

    problems: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    facts: list[str] = field(default_factory=list)  # what was checked, for the OK summary
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        if self.ok:
            return f"OK: {'; '.join(self.facts)} ({self.seconds:.1f} s)"
        return f"{len(self.problems)} problem(s) found in {self.seconds:.1f} s; fix them before running the pipeline"


class CheckFailed(LatheError):
    """`lathe check` found problems; the message lists them, one per line."""


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class Parsed:
    """A section as far as it validates: the model (None if nothing usable) and the keys whose values
    were wrong and are left out (the model holds their defaults: cross-field checks must skip them)."""

    model: Section | None
    dropped: frozenset[str] = frozenset()


def model_problems(raw: Any, key: str, model: type[Section], source: str) -> tuple[Parsed, list[Problem]]:
    """Validate `raw` (the value at dotted `key`) against `model`: one problem per error, and the section
    parsed without its faulty keys, so the facts between sections are still checked on the rest."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        return Parsed(None), [Problem(f"{source}: {key}", f"must be a mapping of keys, got {type(raw).__name__}")]
    try:
        return Parsed(model.model_validate(raw)), []
    except ValidationError as exc:
        out = []
        for err in exc.errors():
            loc = error_path(model, err["loc"])[0]
            where = f"{source}: {'.'.join((key, *loc))}"
            if err["type"] == "extra_forbidden":
                allowed = sorted(_field_names(model, err["loc"][:-1]))
                out.append(Problem(where, f"unknown key{did_you_mean(loc[-1], allowed)}; "
                                          f"allowed: {', '.join(allowed)}"))
            elif err["type"] == "literal_error":
                text = str((err.get("ctx") or {}).get("expected", ""))  # "'a', 'b' or 'c'", or "1 or 3"
                expected = re.findall(r"'([^']*)'", text) or re.findall(r"[^\s,']+", text.replace(" or ", " "))
                out.append(Problem(where, f"{_short(err.get('input'))} is not one of {', '.join(expected)}"
                                          f"{did_you_mean(err.get('input'), expected)}"))
            elif err["type"] == "missing":
                out.append(Problem(where, "required key is missing"))
            elif (wrong_tag := tag_message(err)) is not None:
                out.append(Problem(where, wrong_tag))
            else:
                msg = err["msg"].removeprefix("Value error, ")
                got = f" (got {_short(err['input'])})" if "input" in err and not isinstance(err["input"], dict) else ""
                out.append(Problem(where, f"{msg}{got}"))
        return _without_faulty_keys(raw, model, exc), out


def _without_faulty_keys(raw: dict, model: type[Section], exc: ValidationError) -> Parsed:
    faulty = {str(err["loc"][0]) for err in exc.errors() if err["loc"]}
    if any(not err["loc"] for err in exc.errors()):
        return Parsed(None)  # a whole-section rule failed (e.g. val + test fraction): nothing to rely on
    try:
        return Parsed(model.model_validate({k: v for k, v in raw.items() if k not in faulty}), frozenset(faulty))
    except ValidationError:
        return Parsed(None)


def ingest_raw_dir(root: Path) -> Path | None:
    """The raw-data folder the `ingest` stage of root/dvc.yaml reads (its first path argument), or None
    when dvc.yaml has no such stage (not a Lathe pipeline). Paths come from dvc.yaml, never from code."""
    try:
        project = yaml.safe_load((Path(root) / PROJECT_FILE).read_text()) or {}
        cmd = project["stages"][INGEST_STAGE]["cmd"]
        args = shlex.split(cmd if isinstance(cmd, str) else " ".join(cmd))
        after = args[args.index(INGEST_MODULE) + 1 :]
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError):
        return None
    paths = [a for a in after if not a.startswith("-")]
    return Path(paths[0]) if paths else None


def _display(path: Path, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path(root).resolve()))
    except ValueError:
        return str(path)


def _relative_problem(line: str, raw: Path, shown: str) -> Problem:
    """A lathe.data.ingest problem line ("<raw>/labels.csv:7 (x.png): what") with the raw folder as `shown`."""
    where, _, what = line.replace(f"{raw}/", f"{shown}/").partition(": ")
    return Problem(where, " ".join(what.split()))


class _Checker:
    """The state of one check: parsed sections, data facts, and what was found."""

    def __init__(self, root: Path, params_path: Path, extra_sections: Mapping[str, type[Section]]) -> None:
        self.root, self.params_path = Path(root), Path(params_path)
        self.source = _display(self.params_path, self.root)
        self.extra = dict(extra_sections)
        self.report = CheckReport()
        self.cfg: dict[str, Parsed] = {}  # section name -> what validated of it
        self.targets: dict[str, Parsed] = {}

    def value(self, section: str, *path: str) -> Any:
        """params[section].<path> as validated, or None when the section or the key's value is faulty."""
        parsed = self.targets.get(section.removeprefix("targets.")) if section.startswith("targets.") \
            else self.cfg.get(section)
        if parsed is None or parsed.model is None or path[0] in parsed.dropped:
            return None
        value: Any = parsed.model
        for part in path:
            value = getattr(value, part)
        return value

    def problem(self, key: str, message: str) -> None:
        self.report.problems.append(Problem(f"{self.source}: {key}", message))

    def warn(self, key: str, message: str) -> None:
        self.report.warnings.append(Problem(f"{self.source}: {key}", message))

    # --- params ------------------------------------------------------------------------------------

    def sections(self, params: dict) -> None:
        known = [*SECTIONS, "targets", *self.extra]
        for name in params:
            if name not in known:
                self.problem(str(name), f"unknown section{did_you_mean(name, known)}; sections: {', '.join(known)}")
        for name, model in {**SECTIONS, **self.extra}.items():
            self.cfg[name], found = model_problems(params.get(name), name, model, self.source)
            self.report.problems += found
        self.target_entries(params.get("targets"))
        self.report.facts.append(f"{self.source}: {len(params)} sections, targets {', '.join(self.targets) or '-'}")

    def target_entries(self, raw: Any) -> None:
        if not isinstance(raw, dict) or not raw:
            self.problem("targets", "must be a non-empty mapping of target name -> device profile")
            return
        for name, profile in raw.items():
            if not isinstance(name, str) or not re.match(TARGET_NAME, name):
                self.problem(f"targets.{name}", f"target name must match {TARGET_NAME} (it names a folder)")
                continue
            self.targets[name], found = model_problems(profile, f"targets.{name}", TargetParams, self.source)
            self.report.problems += found

    def cross_params(self) -> None:
        """Facts between sections that no single model can see."""
        for i, v in enumerate(self.value("package", "variants") or []):
            if v not in ALL_VARIANTS:
                self.problem(f"package.variants[{i}]", f"{v!r} is not a variant the pipeline builds"
                             f"{did_you_mean(v, ALL_VARIANTS)}; known: {', '.join(ALL_VARIANTS)}")
        if self.value("package", "private_key") is not None:
            self.signing_key(self.value("package", "private_key"))
        self.architectures_fit_the_data()
        self.pretrained_teacher()
        for name in self.targets:
            gate = self.value(f"targets.{name}", "gates", "min_defective_recall")
            aim = self.value(f"targets.{name}", "defective_recall_target")
            if None not in (gate, aim) and gate > aim:
                self.warn(f"targets.{name}.gates.min_defective_recall",
                          f"{gate:g} is above defective_recall_target {aim:g}: the threshold aims at the target "
                          "on val, so this gate passes only if test recall comes out higher")

    def data_params(self) -> DataParams | None:
        """The `data` section as far as it validated, or None (its own problems are reported already)."""
        parsed = self.cfg.get("data")
        return parsed.model if parsed is not None and isinstance(parsed.model, DataParams) else None

    def architectures_fit_the_data(self) -> None:
        """Input channels and class count come from `data`; an explicit value in an arch must agree."""
        data = self.data_params()
        if data is None:
            return
        scratch = self.value("distill", "init") == "scratch"  # init: pruned takes the pruned teacher's arch
        for section, key in (("train_teacher", "arch"), *((("distill", "student"),) if scratch else ())):
            spec = self.value(section, key)
            for field_name, said, value, origin in (arch_mismatches(spec, data.channels, len(data.classes))
                                                    if spec is not None else []):
                self.problem(f"{section}.{key}.{field_name}", f"{said}, but the data has {value} ({origin}); "
                             "drop it: it comes from the data")

    def pretrained_teacher(self) -> None:
        """A teacher grown from ImageNet weights: the pinned file must be there and be the pinned one (checked by
        size and sha256, as train_teacher checks it, not read), and the one setting that does not take it is named."""
        spec = self.value("train_teacher", "arch")
        if not isinstance(spec, LiteSpec):
            return
        try:
            source = pretrained_source(spec.weights)
            path = installed_weights(source)
            check_weights_file(path, source)
        except LatheError as exc:
            self.problem("train_teacher.arch.weights", str(exc))
        else:
            self.report.facts.append(f"teacher weights {spec.weights} (sha256 {source.sha256[:12]}, {source.license})")
        if self.value("distill", "init") == "pruned":
            self.warn("distill.init", "pruned: the student starts from models/pruned, which an efficientnet_lite "
                      "teacher makes an EfficientNet; the distill stage takes resnet_like students only and will stop "
                      'there; use init: scratch (README "The teacher")')

    def signing_key(self, private_key: str) -> None:
        key = signing_key_path(private_key, self.root)
        if key.is_file():
            self.report.facts.append(f"signing key {_display(key, self.root)}")
            return
        origin = f"${ENV_SIGNING_KEY}" if os.environ.get(ENV_SIGNING_KEY) else "package.private_key"
        self.problem("package.private_key", f"signing key {_display(key, self.root)} (from {origin}) not found; "
                     "create the pair with `lathe keys init`, or point package.private_key at one")

    def dirty_tree(self) -> None:
        """The package stage refuses uncommitted changes (unless allowed): say so now, not after training."""
        if self.value("package", "allow_dirty") is not False or os.environ.get(ENV_ALLOW_DIRTY) in ("1", "true", "yes"):
            return
        from lathe.ship.lineage import dirty_paths  # light: yaml and git, no onnx

        try:  # `git status` first: the package stage's own rule (dirty_paths) parses dvc.lock, ~0.5 s on ELPV
            status = subprocess.run(["git", "status", "--porcelain=v1", "--untracked-files=all"], cwd=self.root,
                                    capture_output=True, text=True, timeout=30, check=True).stdout.splitlines()
            if all(line[3:] == "dvc.lock" or line.endswith(".gitignore") for line in status):
                return
            dirty = dirty_paths(self.root)
        except Exception:  # noqa: BLE001 - a warning only: not a git repo, or a dvc.yaml it cannot read
            return
        if dirty:
            shown = ", ".join(dirty[:5]) + (f" and {len(dirty) - 5} more" if len(dirty) > 5 else "")
            self.warn("package.allow_dirty", f"false, and the git tree has uncommitted changes ({shown}): the package "
                      "stage will refuse to build; commit them first (or set package.allow_dirty)")

    # --- data --------------------------------------------------------------------------------------

    def data(self, raw_dir: Path | None) -> None:
        from lathe.data.ingest import file_problems, scan_labels, split_samples

        if raw_dir is None:
            project = self.root / PROJECT_FILE
            what = (f"no '{INGEST_STAGE}' stage running {INGEST_MODULE} <raw dir> ..." if project.is_file()
                    else "not found (run lathe check inside the repository, or pass --raw)")
            self.report.problems.append(Problem(str(project), f"{what}: cannot tell where the raw data is"))
            return
        raw = raw_dir if raw_dir.is_absolute() else self.root / raw_dir
        shown = _display(raw, self.root)
        if not raw.is_dir():
            self.report.problems.append(Problem(shown, "raw-data folder not found (`dvc pull`, or `make data`)"))
            return
        data = self.data_params()
        if data is None:
            return
        try:
            scan = scan_labels(raw, data)
        except DataError as exc:  # no labels file, not UTF-8, a missing column: nothing more to read
            self.report.problems.append(_relative_problem(str(exc), raw, shown))
            return
        found = scan.problems + file_problems(raw, scan.rows, self.value("validate", "source_min_side") or 1,
                                              data.max_pixels)
        self.report.problems += [_relative_problem(p, raw, shown) for p in found]
        rows = [s for _, s in scan.rows]
        if not rows:
            if not found:
                self.report.problems.append(Problem(f"{shown}/labels.csv", "no samples listed"))
            return
        note = f" (of the {len(rows)} usable rows)" if found else ""
        fractions = [self.value("ingest", k) for k in ("val_fraction", "test_fraction", "seed")]
        if None in fractions:
            return
        labels = [data.classes.index(s.label) for s in rows]
        try:
            splits = split_samples(labels, [s.meta for s in rows], data, *fractions)
        except DataError as exc:  # a group column that cannot fill three splits
            self.problem("data.group", str(exc).split(": ", 1)[-1])
            return
        sizes = Counter(splits)
        self.report.facts.append(f"{shown}: {len(rows)} samples -> train {sizes['train']}, val {sizes['val']}, "
                                 f"test {sizes['test']}")
        self.split_facts(labels, splits, sizes, note)

    def split_facts(self, labels: list[int], splits: list[str], sizes: Counter, note: str) -> None:
        """What the splits ingest will make mean for the stages after it."""
        fractions = "ingest.val_fraction / test_fraction"
        if sizes["train"] < 2:
            self.problem("ingest.test_fraction", f"the train split would hold {sizes['train']} sample(s){note}; "
                         f"training needs at least 2: lower {fractions}")
        if sizes["val"] == 0:
            self.problem("ingest.val_fraction", f"the val split would be empty{note}; model selection needs it")
        calibration = self.value("quantize", "calibration_size")
        if calibration is not None and calibration > sizes["train"]:
            self.problem("quantize.calibration_size", f"{calibration} is larger than the train split ingest will "
                         f"make ({sizes['train']} samples{note}); lower it to at most {sizes['train']}")
        n = sum(sizes.values())
        for key, bad in (("min_rows", lambda v: n < v), ("max_rows", lambda v: n > v)):
            limit = self.value("validate", key)
            if limit is not None and bad(limit):
                self.problem(f"validate.{key}", f"{limit}, but the data has {n} rows{note}")
        classes = self.value("data", "classes") or []
        least = self.value("validate", "min_per_class_per_split")
        counts = Counter(zip(splits, labels))
        short = [f"{split}/{name}: {counts[(split, c)]}" for split in ("train", "val", "test")
                 for c, name in enumerate(classes) if least is not None and counts[(split, c)] < least]
        if short:
            listed = ", ".join(short[:6]) + (f" and {len(short) - 6} more" if len(short) > 6 else "")
            self.problem("validate.min_per_class_per_split", f"{least}, but the splits ingest will make{note} hold "
                         f"fewer: {listed}; lower it, or change {fractions}")


def check_repo(root: Path, params_path: Path | None = None, raw_dir: Path | None = None,
               extra_sections: Mapping[str, type[Section]] | None = None) -> CheckReport:
    """Check params (default root/params.yaml) and the raw data (default: what dvc.yaml's ingest stage
    reads) of the repo at `root`; every problem at once. `extra_sections` adds section models that
    live outside lathe (the flows' `ops`)."""
    start = time.monotonic()
    root = Path(root)
    checker = _Checker(root, params_path if params_path is not None else root / PARAMS_FILE, extra_sections or {})
    try:
        params = load_params(checker.params_path)
    except LatheError as exc:
        checker.report.problems.append(Problem(checker.source, " ".join(str(exc).split(": ", 1)[-1].split())))
        params = None
    if params is not None:
        checker.sections(params)
        checker.cross_params()
    checker.data(raw_dir if raw_dir is not None else ingest_raw_dir(root))
    if params is not None:
        checker.dirty_tree()
    checker.report.seconds = time.monotonic() - start
    return checker.report
