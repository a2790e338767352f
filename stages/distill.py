"""DVC stages `distill` and `distill_control` (params section `distill`).

  python -m stages.distill TEACHER_DIR PREPARED_DIR OUT_DIR HISTORY_CSV [--init-dir PRUNED_DIR]
  python -m stages.distill --control PREPARED_DIR OUT_DIR HISTORY_CSV [--init-dir PRUNED_DIR]

Writes OUT_DIR (weights, arch, ONNX, train.json, distill.json) and the per-epoch HISTORY_CSV.
The control takes no teacher: the same student, seed and budget trained on the labels alone.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from lathe.compress.distill import control_student, distill_student
from lathe.compress.params import DistillParams
from lathe.compress.result import write_compressed
from lathe.data.ingest import load_split
from lathe.io import write_text
from lathe.model.teacher import history_csv
from stages.common import PARAMS_FILE, epoch_progress, run, section

log = logging.getLogger(__name__)


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """Paths from dvc.yaml; the teacher positional exists only without --control."""
    control = "--control" in (sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--control", action="store_true", help="train the student without the teacher")
    if not control:
        parser.add_argument("teacher_dir", type=Path)
    for name in ("prepared_dir", "out_dir", "history_csv"):
        parser.add_argument(name, type=Path)
    parser.add_argument("--init-dir", type=Path, default=None, help="the pruned model folder (used when distill.init is 'pruned')")
    parser.add_argument("--params", type=Path, default=PARAMS_FILE)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse(argv)
    stage = "distill_control" if args.control else "distill"

    def body() -> None:
        cfg = section(args, "distill", DistillParams)
        progress = epoch_progress(log, cfg.epochs)
        if args.control:
            result = control_student(args.prepared_dir, cfg, args.init_dir, progress)
        else:
            result = distill_student(args.teacher_dir, args.prepared_dir, cfg, args.init_dir, progress)
        check = load_split(args.prepared_dir, "val")["images"][:16]
        record = write_compressed(args.out_dir, result, check)
        write_text(args.history_csv, history_csv(result.fit.history))
        log.info("%s: best epoch %d, val %s, %d params (teacher %s) -> %s", record["mode"], record["best_epoch"],
                 record["best_val"], record["student_params"], record["teacher_params"], args.out_dir)

    run(stage, body)


if __name__ == "__main__":
    main()
