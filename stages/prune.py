"""DVC stage `prune`: models/teacher + data/prepared -> models/pruned (weights, arch, ONNX, train.json,
prune.json) + the per-epoch fine-tune history CSV. Params section `prune`, or the one --section names
(the bench's 50%-channels baseline is a second dvc.yaml entry with its own section)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from lathe.compress.params import PruneParams
from lathe.compress.prune import prune_teacher
from lathe.compress.result import write_compressed
from lathe.data.ingest import load_split
from lathe.io import write_text
from lathe.model.teacher import history_csv
from stages.common import parse_args, run, section

log = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(__doc__, argv, "teacher_dir", "prepared_dir", "out_dir", "history_csv", section="prune")

    def body() -> None:
        cfg = section(args, args.section, PruneParams)

        def on_round(r: dict) -> None:
            log.info("round %d/%d: %.1f%% of channels removed -> %d MACs (%.1f%% of the teacher), %d params, "
                     "val acc before fine-tune %.4f", r["round"], cfg.steps, 100 * r["channels_removed"], r["macs"],
                     100 * r["macs_ratio"], r["params"], r["val_before_finetune"]["accuracy"])

        def progress(row: dict) -> None:
            log.info("round %d epoch %2d/%d  loss %.4f  val acc %.4f  bal %.4f  def-recall %.4f", row["round"],
                     row["round_epoch"], cfg.finetune.epochs, row["train_loss"], row["val_accuracy"],
                     row["val_balanced_accuracy"], row["val_defective_recall"])

        result = prune_teacher(args.teacher_dir, args.prepared_dir, cfg, progress, on_round)
        check = load_split(args.prepared_dir, "val")["images"][:16]
        write_compressed(args.out_dir, result, check)
        write_text(args.history_csv, history_csv(result.fit.history))
        rec = result.record
        log.info("MACs %d -> %d (%.1f%% removed), params %d -> %d, val acc %.4f -> %.4f -> %s", rec["teacher"]["macs"],
                 rec["pruned"]["macs"], 100 * rec["macs_removed"], rec["teacher"]["params"], rec["pruned"]["params"],
                 rec["teacher"]["val"]["accuracy"], rec["pruned"]["val"]["accuracy"], args.out_dir)

    run(args.section, body)


if __name__ == "__main__":
    main()
