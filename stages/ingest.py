"""DVC stage `ingest`: data/raw -> data/prepared (split arrays, manifest.csv, task.json).

Reads params sections `ingest` and `data` (the task contract, lathe.data.contract)."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence

from lathe.data.contract import DataParams
from lathe.data.ingest import ingest, write_prepared
from lathe.data.params import IngestParams
from stages.common import parse_args, run, section

log = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(__doc__, argv, "raw_dir", "out_dir")

    def body() -> None:
        cfg, data = section(args, "ingest", IngestParams), section(args, "data", DataParams)
        rows, images, task = ingest(args.raw_dir, cfg, data)
        write_prepared(args.out_dir, rows, images, task)
        counts = Counter(r.split for r in rows)
        log.info("%d samples -> %s (%s)", len(rows), args.out_dir, ", ".join(f"{k}={v}" for k, v in sorted(counts.items())))

    run("ingest", body)


if __name__ == "__main__":
    main()
