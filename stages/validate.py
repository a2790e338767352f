"""DVC stage `validate`: data/prepared + data/raw -> data/validation (result.json, summary.md).

The data gate: exits 1 (after writing both reports) when any expectation fails, so `dvc repro`
stops before training on bad data.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from lathe.data.params import IngestParams, ValidateParams
from lathe.data.validate import validate_prepared
from lathe.data.validate_report import raise_if_failed, write_report
from stages.common import parse_args, run, section

log = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(__doc__, argv, "prepared_dir", "raw_dir", "out_dir")

    def body() -> None:
        cfg = section(args, "validate", ValidateParams)
        # dvc.yaml declares ingest.image_size as a param dep: the arrays must have this size.
        image_size = section(args, "ingest", IngestParams).image_size
        report = validate_prepared(args.prepared_dir, args.raw_dir, cfg, image_size)
        result, summary = write_report(report, args.out_dir)  # written on pass and on fail
        st = report.statistics
        log.info("%d of %d expectations met over %d manifest rows; wrote %s and %s",
                 st["successful_expectations"], st["evaluated_expectations"], st["rows"], result, summary)
        raise_if_failed(report)

    run("validate", body)


if __name__ == "__main__":
    main()
