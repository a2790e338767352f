"""DVC stage `package` (foreach target): the evaluated variants + lineage -> models/packages/<target>/
(model.onnx, preprocessing.json, manifest.json, model_card.md, selftest.npz, signature) and
models/packages/<target>.tar.gz (+ .sha256).

argv: TARGET REPORTS_DIR MODELS_DIR OUT_DIR ARCHIVE [--prepared DIR] [--validation DIR] [--raw-dvc FILE]
Reads params sections `targets` (its own entry) and `package`, the task from data/prepared/task.json, and records
the whole params file in the manifest. dvc.lock is read at run time: this stage runs after every stage
it walks back through, so their entries are fresh.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from lathe.config import load_params, parse_section
from lathe.errors import ConfigError
from lathe.ship.params import PackageParams, parse_targets
from stages.common import PARAMS_FILE, run

log = logging.getLogger(__name__)


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("target")
    for name in ("reports_dir", "models_dir", "out_dir", "archive"):
        p.add_argument(name, type=Path)
    p.add_argument("--prepared", type=Path, default=Path("data/prepared"))
    p.add_argument("--validation", type=Path, default=Path("data/validation"))
    p.add_argument("--raw-dvc", type=Path, default=Path("data/raw.dvc"))
    p.add_argument("--params", type=Path, default=PARAMS_FILE)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse(argv)

    def body() -> None:
        from lathe.ship.build import PackageInputs, build_package
        from lathe.ship.gates import measured_failures

        params = load_params(args.params)
        targets = parse_targets(params, str(args.params))
        if args.target not in targets:
            raise ConfigError(f"{args.params}: no target '{args.target}' under targets (have: {', '.join(targets)})")
        cfg = parse_section(params, "package", PackageParams, str(args.params))
        inputs = PackageInputs(root=Path.cwd(), reports_dir=args.reports_dir, models_dir=args.models_dir,
                               prepared_dir=args.prepared, validation_dir=args.validation, raw_dvc=args.raw_dvc)
        res = build_package(args.target, targets[args.target], cfg, params, inputs, args.out_dir, args.archive)
        log.info("%s: chose %s (package %s, manifest sha256 %s) -> %s, %s (sha256 %s)", args.target, res.variant,
                 res.package_id, res.manifest_sha256[:16], args.out_dir, args.archive, res.archive_sha256[:16])
        for failure in measured_failures(next(c for c in res.candidates if c.variant == res.variant)):
            log.warning("%s: %s fails %s on this machine (not the target device; the choice does not depend on it, "
                        "and the model card's measured section shows it)", args.target, res.variant, failure)

    run("package", body)


if __name__ == "__main__":
    main()
