"""Which classes the model gets wrong, from the selected model's confusion matrix on the report split (test, or
valid without one): the worst classes, the most-confused pairs with example files, and a confusion-matrix
heatmap that stays readable for 133 classes. The job writes them to metrics.json (`classes`) and as PNGs beside
it, for people who do not open HTML; the profiler report shows the same.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

from imgclf import atomic

WORST = 20  # classes in the worst-classes table and plot
PAIRS = 10  # most-confused pairs
EXAMPLES = 3  # example files per pair


@dataclass
class ClassResults:
    split: str
    names: list[str]
    confusion: list[list[int]]  # [true][predicted] counts, in `names` order
    worst: list[dict]
    most_confused: list[dict]

    def to_json(self) -> dict:
        return {"split": self.split, "worst": self.worst, "most_confused": self.most_confused}

    @cached_property
    def plots(self) -> dict[str, bytes]:
        """The PNGs, rendered once for the files beside metrics.json and the profiler report: name -> bytes."""
        return {"confusion_matrix": png(heatmap(self)), "worst_classes": png(worst_figure(self))}


def analyse(split: str, names: Sequence[str], confusion: Sequence[Sequence[int]],
            samples: Sequence[tuple[str, int]] | None = None,
            predictions: Sequence[int] | None = None) -> ClassResults:
    """Worst classes (lowest accuracy; more images first on ties) and most-confused pairs (most images of the
    true class predicted as the other). `samples` (path, label) and `predictions` in the same order name up to
    EXAMPLES files per pair as class-folder/file-name."""
    matrix = [list(map(int, row)) for row in confusion]
    totals = [sum(row) for row in matrix]
    ranked = sorted((matrix[i][i] / totals[i], -totals[i], names[i], i) for i in range(len(names)) if totals[i])
    worst = [{"class": name, "accuracy": round(accuracy, 6), "images": totals[i]}
             for accuracy, _, name, i in ranked[:WORST]]
    pairs = sorted(((matrix[t][p], t, p) for t in range(len(names)) for p in range(len(names))
                    if t != p and matrix[t][p]), key=lambda c: (-c[0], names[c[1]], names[c[2]]))[:PAIRS]
    examples: dict[tuple[int, int], list[str]] = {(t, p): [] for _, t, p in pairs}
    if samples is not None and predictions is not None:
        for (path, label), predicted in zip(samples, predictions):
            found = examples.get((label, predicted))
            if found is not None and len(found) < EXAMPLES:
                found.append(f"{Path(path).parent.name}/{Path(path).name}")
    confused = [{"true": names[t], "predicted": names[p], "count": count, "share": round(count / totals[t], 6),
                 "examples": examples[(t, p)]} for count, t, p in pairs]
    return ClassResults(split, list(names), matrix, worst, confused)


def heatmap(results: ClassResults) -> Figure:
    """Rows normalised (the share of each true class predicted as each class), classes in name order on both
    axes (dogImages' 001.Affenpinscher ... 133.Yorkshire_terrier), every class labelled; the figure grows with
    the number of classes so that 133 labels stay legible."""
    n = len(results.names)
    order = sorted(range(n), key=lambda i: results.names[i])
    rows = [[results.confusion[t][p] / max(1, sum(results.confusion[t])) for p in order] for t in order]
    side = max(5.0, 1.5 + 0.16 * n)  # 11.5 pt per class
    fig = Figure(figsize=(side + 1.2, side))
    ax = fig.subplots()
    image = ax.imshow(rows, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    labels = [results.names[i] for i in order]
    size = max(5.5, min(9.0, 700 / max(n, 1)))
    ax.set_xticks(range(n), labels, rotation=90, fontsize=size)
    ax.set_yticks(range(n), labels, fontsize=size)
    ax.set(xlabel="predicted class", ylabel="true class",
           title=f"confusion matrix ({results.split} split): share of each true class")
    fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02)
    fig.tight_layout()
    return fig


def worst_figure(results: ClassResults) -> Figure:
    worst = results.worst
    fig = Figure(figsize=(8, max(2.0, 0.8 + 0.3 * len(worst))))
    ax = fig.subplots()
    ax.barh(range(len(worst)), [c["accuracy"] for c in worst], color="tab:red")
    ax.set_yticks(range(len(worst)), [f"{c['class']} ({c['images']} images)" for c in worst], fontsize=8)
    ax.invert_yaxis()  # the worst on top
    ax.set(xlim=(0, 1), xlabel="accuracy",
           title=f"the {len(worst)} classes with the lowest accuracy ({results.split} split)")
    ax.grid(axis="x", alpha=.3)
    fig.tight_layout()
    return fig


def png(fig: Figure, dpi: int = 110) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return buffer.getvalue()


def write_pngs(folder: Path, results: ClassResults) -> list[Path]:
    """confusion_matrix_<split>.png and worst_classes_<split>.png in `folder` (output/data: reports/ in local mode)."""
    written = []
    for name, data in results.plots.items():
        path = folder / f"{name}_{results.split}.png"
        atomic.write_bytes(path, data)
        written.append(path)
    return written
