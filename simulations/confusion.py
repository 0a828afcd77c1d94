"""An expression model's confusion matrix: counts as JSON and a plot as PNG, in a run directory.

Drawn with matplotlib's object API on its Agg canvas (no pyplot, no global state). Each row is
normalised to the true class's count (so the diagonal is each class's recall, readable even
for FER2013's 436-image disgust class) and every cell also shows its count.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fedface.common.evaluation import confusion_counts
from fedface.common.io import atomic_write_bytes, atomic_write_text

__all__ = ["confusion_png", "write_confusion"]


def confusion_png(counts: np.ndarray, class_names: Sequence[str], title: str) -> bytes:
    """A row-normalised confusion matrix with counts, as PNG bytes."""
    k = len(class_names)
    totals = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, totals, out=np.zeros(counts.shape, dtype=float), where=totals > 0)
    fig = Figure(figsize=(1.0 + 0.9 * k, 0.6 + 0.8 * k), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(share, vmin=0.0, vmax=1.0, cmap="Blues")
    ax.set_xticks(range(k), labels=list(class_names), rotation=40, ha="right")
    ax.set_yticks(range(k), labels=[f"{n} ({int(t)})" for n, t in zip(class_names, totals[:, 0], strict=True)])
    ax.set_xlabel("predicted expression")
    ax.set_ylabel("true expression (test images)")
    ax.set_title(title, fontsize=10)
    for i in range(k):
        for j in range(k):
            if totals[i, 0] == 0:
                continue
            colour = "white" if share[i, j] > 0.55 else "black"
            ax.text(j, i, f"{share[i, j]:.2f}\n{int(counts[i, j])}", ha="center", va="center", fontsize=7, color=colour)
    fig.colorbar(image, ax=ax, label="share of the true class")
    out = io.BytesIO()
    fig.savefig(out, format="png", metadata={"Software": None})
    return out.getvalue()


def write_confusion(run_dir: Path, labels: np.ndarray, pred: np.ndarray, class_names: Sequence[str], title: str) -> np.ndarray:
    """Write ``confusion.json`` (counts, rows true, columns predicted) and ``confusion.png``."""
    counts = confusion_counts(labels, pred, len(class_names))
    record = {"classes": list(class_names), "rows": "true class", "columns": "predicted class", "counts": counts.tolist()}
    atomic_write_text(run_dir / "confusion.json", json.dumps(record, indent=1) + "\n")
    atomic_write_bytes(run_dir / "confusion.png", confusion_png(counts, class_names, title))
    return counts
