"""DVC stage `lowrank`: models/teacher + data/prepared -> models/lowrank (weights, arch with ranks, ONNX,
train.json, lowrank.json) + the per-epoch fine-tune history CSV. Params section `lowrank`."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from lathe.compress.lowrank import lowrank_teacher
from lathe.compress.params import LowRankParams
from lathe.compress.result import write_compressed
from lathe.data.ingest import load_split
from lathe.io import write_text
from lathe.model.teacher import history_csv
from stages.common import parse_args, run, section

log = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(__doc__, argv, "teacher_dir", "prepared_dir", "out_dir", "history_csv")

    def body() -> None:
        cfg = section(args, "lowrank", LowRankParams)

        def progress(row: dict) -> None:
            log.info("epoch %2d/%d  loss %.4f  val acc %.4f  bal %.4f  def-recall %.4f", row["epoch"], cfg.finetune.epochs,
                     row["train_loss"], row["val_accuracy"], row["val_balanced_accuracy"], row["val_defective_recall"])

        result = lowrank_teacher(args.teacher_dir, args.prepared_dir, cfg, progress)
        check = load_split(args.prepared_dir, "val")["images"][:16]
        write_compressed(args.out_dir, result, check)
        write_text(args.history_csv, history_csv(result.fit.history))
        rec = result.record
        log.info("%d layers factorised; params %d -> %d, MACs %d -> %d, val acc %.4f -> %.4f (%.4f before fine-tune) -> %s",
                 len(rec["ranks"]), rec["teacher"]["params"], rec["lowrank"]["params"], rec["teacher"]["macs"],
                 rec["lowrank"]["macs"], rec["teacher"]["val"]["accuracy"], rec["lowrank"]["val"]["accuracy"],
                 rec["lowrank"]["val_before_finetune"]["accuracy"], args.out_dir)

    run("lowrank", body)


if __name__ == "__main__":
    main()
