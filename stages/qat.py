"""DVC stage `qat` (params section `qat`): quantization-aware fine-tuning of a trained float model into INT8.

  python -m stages.qat MODEL_DIR PREPARED_DIR OUT_DIR HISTORY_CSV [--teacher-dir TEACHER_DIR]

Writes OUT_DIR/model.onnx (INT8 QDQ, one self-contained file, as the quantize stage's) and OUT_DIR/qat.json
(settings, the float model's and teacher's weight hashes, what got quantized, onnxruntime against torch on
val), and the per-epoch HISTORY_CSV. With --teacher-dir and qat.alpha > 0 the fine-tune distils from the teacher.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from lathe.compress.params import QatParams
from lathe.compress.qat import qat_finetune, write_qat
from lathe.io import write_text
from lathe.model.teacher import history_csv
from stages.common import PARAMS_FILE, epoch_progress, run, section

log = logging.getLogger(__name__)


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in ("model_dir", "prepared_dir", "out_dir", "history_csv"):
        parser.add_argument(name, type=Path)
    parser.add_argument("--teacher-dir", type=Path, default=None, help="distil from this teacher (qat.alpha > 0)")
    parser.add_argument("--params", type=Path, default=PARAMS_FILE)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse(argv)

    def body() -> None:
        cfg = section(args, "qat", QatParams)
        log.info("%s: %d epochs of quantization-aware fine-tuning (lr %g, %s)", args.model_dir, cfg.epochs, cfg.lr,
                 f"distilled from {args.teacher_dir}, alpha {cfg.alpha:g}, T {cfg.temperature:g}"
                 if args.teacher_dir is not None and cfg.alpha > 0 else "on the labels alone")
        result = qat_finetune(args.model_dir, args.prepared_dir, cfg, args.teacher_dir, epoch_progress(log, cfg.epochs))
        write_qat(args.out_dir, result)
        write_text(args.history_csv, history_csv(result.fit.history))
        r = result.record
        log.info("best epoch %d, val %s; %d B, %d Q / %d DQ nodes, %d compute nodes left float; onnxruntime vs "
                 "torch on val: argmax agreement %.4f, max |dlogit| %.4f -> %s", r["best_epoch"], r["best_val"],
                 r["size_bytes"], r["node_types"].get("QuantizeLinear", 0), r["node_types"].get("DequantizeLinear", 0),
                 len(r["float_compute_nodes"]), r["check_vs_torch"]["argmax_agreement"],
                 r["check_vs_torch"]["max_abs_logit_diff"], args.out_dir)

    run("qat", body)


if __name__ == "__main__":
    main()
