"""The pipeline's pictures, drawn offline with matplotlib's Agg canvas into byte-stable PNGs.

Training curves (one per trained variant, from its `reports/training/<variant>.csv` history) and
confusion matrices (one per evaluated variant) here; the Pareto front (all variants) is
lathe.measure.compare.pareto_png, drawn with the same helpers (`style`, `figure`, `png_bytes`). Every figure is
drawn on its own `Figure` (no pyplot, no global backend state), with a fixed size, DPI and font
(matplotlib's bundled DejaVu Sans), and saved without a Software tag; PNG from Agg holds no
timestamp, so the same input gives the same bytes run to run. `dvc plots show` copies them into its
HTML page as they are: no vega, no network.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lathe.errors import LatheError

DPI = 100  # curves and confusion matrices; the Pareto plot (lathe.measure.compare.pareto_png) takes compare.plot_dpi
HISTORY_X = "epoch"
HISTORY_LOSS = "train_loss"
HISTORY_VAL = ("val_accuracy", "val_balanced_accuracy", "val_defective_recall")  # fractions in [0, 1]
HISTORY_ROUND = "round"  # present in prune histories: one fine-tune round per pruning step


@contextlib.contextmanager
def style() -> Iterator[None]:
    """matplotlib's own defaults (DejaVu Sans, bundled) whatever a matplotlibrc says, for this block only."""
    try:
        import matplotlib.style
    except ImportError as exc:  # the lock file installs it; a bare environment may not have it
        raise LatheError("matplotlib is not installed, cannot draw the report pictures "
                         "(install the locked requirements: make setup)") from exc
    with matplotlib.style.context("default"):
        yield


def figure(width: float, height: float, dpi: int) -> Any:
    """A detached figure on its own Agg canvas (no pyplot, no global backend); call inside `style`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def png_bytes(fig: Any, dpi: int) -> bytes:
    """The figure as PNG bytes: no Software tag (it names the matplotlib version), no timestamp."""
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# Training curves


def read_history(path: Path) -> dict[str, list[float]]:
    """A training history CSV (one row per epoch) as {column: values}; errors name the file.

    Needs `epoch` and `train_loss`; every cell must be a number.
    """
    path = Path(path)
    if not path.is_file():
        raise LatheError(f"{path}: training history not found (the training stage writes it)")
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        raise LatheError(f"{path}: the training history has no rows")
    columns = list(rows[0])
    missing = [c for c in (HISTORY_X, HISTORY_LOSS) if c not in columns]
    if missing:
        raise LatheError(f"{path}: the training history lacks columns {missing} (has {columns})")
    out: dict[str, list[float]] = {c: [] for c in columns}
    for line, row in enumerate(rows, start=2):
        for c in columns:
            try:
                value = float(row[c])
            except (TypeError, ValueError) as exc:
                raise LatheError(f"{path}: line {line}, column {c!r}: {row[c]!r} is not a number") from exc
            if not math.isfinite(value):
                raise LatheError(f"{path}: line {line}, column {c!r} is {value}")
            out[c].append(value)
    return out


def training_curves_png(history: Mapping[str, Sequence[float]], title: str, dpi: int = DPI) -> bytes:
    """Two panels against epoch: the training loss, and the validation scores (%) the stage selects on.

    In a prune history, dotted vertical lines mark where a new prune + fine-tune round starts.
    """
    with style():
        fig = figure(10, 3.8, dpi)
        epochs = list(history[HISTORY_X])
        loss_ax = fig.add_subplot(1, 2, 1)
        loss_ax.plot(epochs, history[HISTORY_LOSS], marker="o", markersize=3, color="tab:red", linewidth=1.2)
        loss_ax.set_ylabel("training loss")
        val_ax = fig.add_subplot(1, 2, 2)
        for key, color in zip(HISTORY_VAL, ("tab:blue", "tab:green", "tab:orange"), strict=True):
            if key in history:
                val_ax.plot(epochs, [100 * v for v in history[key]], marker="o", markersize=3, linewidth=1.2,
                            color=color, label=key.removeprefix("val_").replace("_", " "))
        val_ax.set_ylabel("validation split (%)")
        val_ax.set_ylim(-2, 102)
        if val_ax.get_legend_handles_labels()[0]:
            val_ax.legend(loc="lower right", fontsize=8)
        rounds = history.get(HISTORY_ROUND)
        starts = [epochs[i] - 0.5 for i in range(1, len(epochs)) if rounds and rounds[i] != rounds[i - 1]]
        for ax in (loss_ax, val_ax):
            for x in starts:
                ax.axvline(x, color="tab:gray", linestyle=":", linewidth=1)
            ax.set_xlabel("epoch" + (" (dotted: next prune round)" if starts else ""))
            ax.grid(True, linewidth=0.3, alpha=0.5)
            ax.xaxis.get_major_locator().set_params(integer=True)
        fig.suptitle(f"training: {title}", fontsize=10)
        return png_bytes(fig, dpi)


# ---------------------------------------------------------------------------------------------
# Confusion matrix


def confusion_png(cm: np.ndarray, title: str, classes: Sequence[str] | None = None,
                  defective: Sequence[int] = (), dpi: int = DPI) -> bytes:
    """Counts per (true class, predicted class); colour is the row's share (recall on the diagonal).

    Ticks carry the class names when given; the defective classes' names are red.
    """
    cm = np.asarray(cm, dtype=np.int64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] == 0:
        raise LatheError(f"confusion matrix for {title} has shape {cm.shape}; expected (K, K)")
    k = cm.shape[0]
    support = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, support, out=np.zeros(cm.shape), where=support > 0)
    with style():
        fig = figure(4.8, 4.2, dpi)
        ax = fig.add_subplot(1, 1, 1)
        image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
        for i in range(k):
            for j in range(k):
                ax.text(j, i, f"{cm[i, j]}\n{100 * share[i, j]:.0f}%", ha="center", va="center", fontsize=8,
                        color="white" if share[i, j] > 0.6 else "black")
        names = list(classes) if classes is not None and len(classes) == k else [str(i) for i in range(k)]
        ax.set_xticks(range(k), names, rotation=30 if max(map(len, names)) > 3 else 0, ha="right", fontsize=7)
        ax.set_yticks(range(k), names, fontsize=7)
        for ticks in (ax.get_xticklabels(), ax.get_yticklabels()):
            for i, label in enumerate(ticks):
                if i in defective:
                    label.set_color("tab:red")
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class (row total = 100%)")
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
        suffix = "; red: defective classes" if len(defective) else ""
        ax.set_title(f"{title}\ntest split, n={int(cm.sum())}{suffix}", fontsize=9)
        return png_bytes(fig, dpi)


# ---------------------------------------------------------------------------------------------
# Precision-recall curve of the defect score


def pr_curve_png(recall: np.ndarray, precision: np.ndarray, title: str, auc: float, ap: float,
                 dpi: int = DPI) -> bytes:
    """Precision against recall of "defective" as the threshold on p_defective falls (one step per
    distinct score); the ROC AUC and average precision in the title."""
    with style():
        fig = figure(4.8, 4.2, dpi)
        ax = fig.add_subplot(1, 1, 1)
        ax.step(np.r_[0.0, recall], np.r_[precision[:1] if len(precision) else [1.0], precision], where="post")
        ax.set_xlim(0.0, 1.0)
        ax.set_ylim(0.0, 1.02)
        ax.set_xlabel("defective recall (1 - escape rate)")
        ax.set_ylabel("precision of the defect flag")
        ax.grid(True, alpha=0.3)
        ax.set_title(f"{title}\ntest split: ROC AUC {auc:.3f}, average precision {ap:.3f}", fontsize=9)
        return png_bytes(fig, dpi)
