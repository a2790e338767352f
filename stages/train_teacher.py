"""DVC stage `train_teacher`: data/prepared -> models/teacher (weights, arch, ONNX) + history CSV."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from lathe.data.ingest import load_split
from lathe.io import write_text
from lathe.model.params import TrainParams
from lathe.model.teacher import history_csv, train_teacher, write_model_dir
from stages.common import EpochClock, parse_args, run, section

log = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(__doc__, argv, "prepared_dir", "out_dir", "history_csv")

    def body() -> None:
        cfg = section(args, "train_teacher", TrainParams)

        members = cfg.ensemble.members
        clock = EpochClock(cfg.epochs * members + ((cfg.ensemble.epochs or cfg.epochs) if members > 1 else 0))

        def progress(row: dict) -> None:
            who = "" if members == 1 else (f"member {row['member']}/{members}  " if row["member"] else "distilled  ")
            log.info("%sepoch %3d/%d  loss %.4f  val acc %.4f  bal %.4f  def-recall %.4f  %s", who, row["epoch"],
                     cfg.epochs, row["train_loss"], row["val_accuracy"], row["val_balanced_accuracy"],
                     row["val_defective_recall"], clock.tick())

        model, result, image_size = train_teacher(args.prepared_dir, cfg, progress)
        check = load_split(args.prepared_dir, "val")["images"][:16]
        summary = write_model_dir(args.out_dir, model, model.spec, image_size, result, check)
        write_text(args.history_csv, history_csv(result.history))
        log.info("best epoch %d, val %s, %d params -> %s", summary["best_epoch"], summary["best_val"], summary["params"], args.out_dir)

    run("train_teacher", body)


if __name__ == "__main__":
    main()
