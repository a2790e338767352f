"""DVC stage `evaluate` (foreach variant): models/<variant> + data/prepared -> reports/<variant>
(metrics.json headline figures, detail.json, predictions.csv, confusion.png, pr_curve.csv/.png)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from lathe.data.contract import read_task
from lathe.measure.evaluate import defect_pr_curve, evaluate_model
from lathe.measure.params import EvaluateParams
from lathe.measure.plots import confusion_png, pr_curve_png
from lathe.measure.reports import (
    CONFUSION_PNG,
    PR_CURVE_PNG,
    detail_record,
    pr_curve_csv,
    predictions_csv,
    write_reports,
)
from stages.common import parse_args, run, section

log = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(__doc__, argv, "model_dir", "prepared_dir", "out_dir")

    def body() -> None:
        cfg = section(args, "evaluate", EvaluateParams)
        r = evaluate_model(args.model_dir, args.prepared_dir, cfg)
        task = read_task(args.prepared_dir)
        title = args.model_dir.as_posix()
        recall, precision, threshold = defect_pr_curve(r, task)
        pictures = {
            CONFUSION_PNG: confusion_png(r.confusion, title, task.classes, task.defective_indices),
            PR_CURVE_PNG: pr_curve_png(recall, precision, title, r.metrics["defective_roc_auc"],
                                       r.metrics["defective_average_precision"]),
        }
        detail = detail_record(r.metrics, r.confusion, r.timing_method, task.defective_indices)
        write_reports(args.out_dir, r.metrics, detail,
                      predictions_csv(r.sample_ids, r.labels, r.predicted, r.p_defective), pictures,
                      pr_curve_csv(recall, precision, threshold))
        m = r.metrics
        log.info("%s: acc %.4f  bal %.4f  def-recall %.4f  escape %.4f | %d B, %d params, %d MACs, "
                 "p50 %.3f ms, %.0f img/s -> %s", args.model_dir, m["accuracy"], m["balanced_accuracy"],
                 m["defective_recall"], m["escape_rate"], m["size_bytes"], m["params"], m["macs"],
                 m["latency_p50_ms"], m["throughput_ips"], args.out_dir)

    run("evaluate", body)


if __name__ == "__main__":
    main()
