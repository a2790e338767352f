"""DVC stage `plot_training`: reports/training/<variant>.csv (each training stage's history) ->
reports/training/<variant>.png, training loss and validation scores per epoch.

Usage: python -m stages.plot_training TRAINING_DIR VARIANT [VARIANT ...]
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from lathe.errors import LatheError
from lathe.io import write_bytes
from lathe.measure.plots import read_history, training_curves_png
from stages.common import run

log = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("training_dir", type=Path, help="folder holding <variant>.csv; the pictures go beside them")
    parser.add_argument("variants", nargs="+", help="trained variants, e.g. teacher pruned student")
    args = parser.parse_args(argv)

    def body() -> None:
        bad = [v for v in args.variants if not v or "/" in v or "\\" in v or v.startswith(".")]
        if bad:
            raise LatheError(f"variant names {bad} are not plain file names under {args.training_dir}")
        # every picture is drawn before the first is written: a bad history leaves none half-updated
        pictures = {v: training_curves_png(read_history(args.training_dir / f"{v}.csv"), v) for v in args.variants}
        for variant, png in pictures.items():
            write_bytes(args.training_dir / f"{variant}.png", png)
        log.info("%d training curves -> %s/{%s}.png", len(pictures), args.training_dir, ",".join(pictures))

    run("plot_training", body)


if __name__ == "__main__":
    main()
