"""DVC stage `compare`: reports/<variant>/{metrics,detail}.json for each listed variant -> reports/compare.json,
reports/compare.md and reports/pareto.png.

Usage: python -m stages.compare REPORTS_DIR VARIANT [VARIANT ...] [--reference NAME] [--params FILE]
The reference (ratios are taken against it) is --reference, or else the first variant listed.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from lathe.io import write_bytes, write_json, write_text
from lathe.measure.compare import build_comparison, compare_markdown, load_rows, pareto_png
from lathe.measure.params import CompareParams
from stages.common import PARAMS_FILE, run, section

log = logging.getLogger(__name__)
OUTPUTS = ("compare.json", "compare.md", "pareto.png")  # written inside REPORTS_DIR


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reports_dir", type=Path,
                        help="folder holding <variant>/{metrics,detail}.json; outputs go here")
    parser.add_argument("variants", nargs="+", help="variant names, e.g. teacher pruned quantized/student")
    parser.add_argument("--reference", default=None, help="variant the ratios are taken against (default: first)")
    parser.add_argument("--params", type=Path, default=PARAMS_FILE)
    args = parser.parse_args(argv)

    def body() -> None:
        cfg = section(args, "compare", CompareParams)
        rows = load_rows(args.reports_dir, args.variants)
        comparison = build_comparison(rows, args.reference or args.variants[0], cfg.pareto_metric)
        png = pareto_png(comparison, cfg.plot_dpi)  # everything is computed before the first write
        write_bytes(args.reports_dir / "pareto.png", png)
        write_text(args.reports_dir / "compare.md", compare_markdown(comparison))
        write_json(args.reports_dir / "compare.json", comparison)
        front = [n for n in comparison["order"] if comparison["variants"][n]["pareto_size"]]
        log.info("%d variants against %s; Pareto (size vs %s): %s -> %s/{%s}", len(rows), comparison["reference"],
                 cfg.pareto_metric, ", ".join(front), args.reports_dir, ",".join(OUTPUTS))

    run("compare", body)


if __name__ == "__main__":
    main()
