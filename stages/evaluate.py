"""DVC stage `evaluate` (foreach variant): models/<variant> + data/prepared -> reports/<variant>
(metrics.json headline figures, detail.json, predictions.csv, confusion.png)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from lathe.data.contract import read_task
from lathe.measure.evaluate import evaluate_model
from lathe.measure.params import EvaluateParams
from lathe.measure.plots import confusion_png
from lathe.measure.reports import detail_record, predictions_csv, write_reports
from stages.common import parse_args, run, section

log = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(__doc__, argv, "model_dir", "prepared_dir", "out_dir")

    def body() -> None:
        cfg = section(args, "evaluate", EvaluateParams)
        r = evaluate_model(args.model_dir, args.prepared_dir, cfg)
        task = read_task(args.prepared_dir)
        picture = confusion_png(r.confusion, args.model_dir.as_posix(), task.classes, task.defective_indices)
        write_reports(args.out_dir, r.metrics, detail_record(r.metrics, r.confusion, r.timing_method),
                      predictions_csv(r.sample_ids, r.labels, r.predicted, r.p_defective), picture)
        m = r.metrics
        log.info("%s: acc %.4f  bal %.4f  def-recall %.4f  escape %.4f | %d B, %d params, %d MACs, "
                 "p50 %.3f ms, %.0f img/s -> %s", args.model_dir, m["accuracy"], m["balanced_accuracy"],
                 m["defective_recall"], m["escape_rate"], m["size_bytes"], m["params"], m["macs"],
                 m["latency_p50_ms"], m["throughput_ips"], args.out_dir)

    run("evaluate", body)


if __name__ == "__main__":
    main()
