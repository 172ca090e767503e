"""Figure C of the decode benchmark: tokens/s without and with the KV cache, jaxllm beside torchref."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from matplotlib.patches import Patch  # noqa: E402

# Bars per group, left to right, with their colours.
BARS = (
    ("jaxllm-uncached", "jaxllm, no cache", "#9ecae1"),
    ("jaxllm-cached", "jaxllm, KV cache", "#3182bd"),
    ("torchref-uncached", "torchref, no cache", "#fdae6b"),
    ("torchref-cached", "torchref, KV cache", "#e6550d"),
)
DPI = 110


def plot_figure_c(results: list[dict], title: str, path: Path) -> Path | None:
    """Plot batch-1 tokens/s per new-token count, one panel per dtype; returns the PNG path.

    Returns None when no batch-1 result exists. Projected uncached speeds are hatched.
    """
    rows = [row for row in results if row["batch"] == 1]
    if not rows:
        return None
    dtypes = sorted({row["dtype"] for row in rows}, key=lambda name: name != "float32")
    figure, axes = plt.subplots(1, len(dtypes), figsize=(5.2 * len(dtypes), 4.2), squeeze=False)
    width = 0.8 / len(BARS)

    for axis, dtype in zip(axes[0], dtypes):
        lengths = sorted({row["new_tokens"] for row in rows if row["dtype"] == dtype})
        lookup = {(row["new_tokens"], row["contender"]): row for row in rows if row["dtype"] == dtype}
        for offset, (name, label, colour) in enumerate(BARS):
            for position, length in enumerate(lengths):
                row = lookup.get((length, name))
                if row is None:
                    continue
                x = position + (offset - (len(BARS) - 1) / 2) * width
                hatch = "//" if row["timing"] == "projected" else None
                axis.bar(x, row["tokens_per_s"], width, color=colour, hatch=hatch,
                         edgecolor="black", linewidth=0.4)
                axis.text(x, row["tokens_per_s"] * 1.08, f"{row['tokens_per_s']:.3g}",
                          ha="center", va="bottom", fontsize=7, rotation=90)
        axis.set_yscale("log")
        axis.set_xticks(range(len(lengths)), [f"{n} new tokens" for n in lengths])
        axis.set_ylabel("tokens/s (log scale)")
        axis.set_title(f"{dtype}, batch 1", fontsize=10)
        top = max(row["tokens_per_s"] for row in lookup.values())
        axis.set_ylim(top=top * 4)
        axis.grid(axis="y", which="major", linewidth=0.3)

    handles = [Patch(facecolor=colour, edgecolor="black", linewidth=0.4, label=label)
               for _, label, colour in BARS]
    handles.append(Patch(facecolor="white", edgecolor="black", hatch="//", linewidth=0.4,
                         label="projected from step times"))
    figure.legend(handles=handles, loc="lower center", ncol=3, fontsize=7, frameon=False)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout(rect=(0, 0.1, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI)
    plt.close(figure)
    return path
