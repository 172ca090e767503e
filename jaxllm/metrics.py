"""`metrics.jsonl`, the per-step metrics log of a run, and the loss figure drawn from it.

Each line is one JSON object with an integer `step` and namespaced keys (`train/loss`,
`val/loss`, ...). Non-finite floats are written as null, because JSON has no inf or NaN.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)



def _json_value(value: Any) -> Any:
    # JSON has no inf or NaN, so null marks a non-finite value (an overflowed float16 step).
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLog:
    """`metrics.jsonl`: one JSON object per line with `step` and namespaced metric keys."""

    def __init__(self, path: Path):
        self.path = path
        self._stream = None

    def rows(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        rows = []
        lines = self.path.read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                # A process killed while writing leaves a torn last line.
                logger.warning("dropping unreadable line %d of %s", number, self.path)
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                rows.append(row)
        return rows

    def truncate_after(self, step: int) -> None:
        """Drop the rows of steps after `step` (they belong to a run that was interrupted)."""
        if not self.path.exists():
            return
        rows = self.rows()
        earlier = [row for row in rows if row["step"] <= step]
        lines = [line for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if len(earlier) == len(lines):
            return
        temporary = self.path.with_name(f".{self.path.name}.tmp")
        temporary.write_text("".join(json.dumps(row) + "\n" for row in earlier), encoding="utf-8")
        os.replace(temporary, self.path)
        if len(earlier) < len(rows):
            logger.info("dropped %d rows after step %d from %s", len(rows) - len(earlier), step,
                        self.path)

    def append(self, row: dict[str, Any]) -> None:
        if self._stream is None:
            self._stream = self.path.open("a", encoding="utf-8")
        self._stream.write(json.dumps({key: _json_value(value) for key, value in row.items()}) + "\n")
        self._stream.flush()

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None


def plot_losses(rows: list[dict[str, Any]], unigram_entropy: float, path: Path) -> Path:
    """Save train and validation loss against step, with the unigram entropy as a line."""
    # The object API with an Agg canvas leaves pyplot's global backend untouched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for key, label, style in (("train/loss", "train", "-"), ("val/loss", "validation", "o-")):
        points = [(row["step"], row[key]) for row in rows if row.get(key) is not None]
        if points:
            steps, losses = zip(*points)
            axes.plot(steps, losses, style, label=label, markersize=4)
    axes.axhline(unigram_entropy, color="gray", linestyle="--",
                 label=f"unigram entropy ({unigram_entropy:.2f})")
    axes.set_xlabel("step")
    axes.set_ylabel("cross-entropy (nats per token)")
    axes.legend()
    axes.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    return path
