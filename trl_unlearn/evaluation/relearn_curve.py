"""The result of a relearning attack (`relearn.py`): `RelearnCurve` (steps, metrics per step, settings, the
relearned rows), its JSON form and table, and `plot_relearn_curves` (several methods on one figure, matplotlib)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .report import json_safe, load_json, save_json

__all__ = ["RELEARN_FORMAT_VERSION", "RelearnCurve", "plot_relearn_curves"]

RELEARN_FORMAT_VERSION = 1

# Columns `RelearnCurve.table()` shows by default, when present (a custom evaluation shows all its keys).
_TABLE_KEYS = (
    "forget_probability",
    "forget_probability_relearned",
    "forget_probability_unseen",
    "forget_rougeL_recall",
    "forget_truth_ratio",
    "forget_quality",
    "retain_probability",
    "model_utility",
)


@dataclass
class RelearnCurve:
    """Result of `relearning_attack`.

    `steps[j]` is the number of optimizer steps taken before evaluation `j` (0 = the unlearned model as given) and
    `metrics[j]` the metrics then (name -> value; None when not computable). `train_loss[s]` is the NLL of step
    `s + 1`'s batch. `indices` are the forget rows relearned (positions in the forget rows), chosen by `seed`.
    `settings` records everything else (prompt format, batch size, evaluation kind, data folder and split, ...).
    """

    steps: list[int]
    metrics: list[dict[str, float | None]]
    fraction: float
    learning_rate: float
    seed: int
    indices: list[int]
    num_forget_rows: int
    train_loss: list[float] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    format_version: int = RELEARN_FORMAT_VERSION

    def series(self, name: str) -> list[float | None]:
        """One metric over the checkpoints (None where a checkpoint lacks it)."""
        return [m.get(name) for m in self.metrics]

    # ---------------------------------------------------------------------------------------------------- JSON
    def to_dict(self) -> dict:
        return json_safe(asdict(self))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "relearning curve") -> RelearnCurve:
        missing = [k for k in ("steps", "metrics", "fraction", "learning_rate", "seed", "indices") if k not in d]
        if missing:
            raise ValueError(f"{source}: not a relearning curve (missing {', '.join(missing)})")
        version = d.get("format_version", RELEARN_FORMAT_VERSION)
        if version > RELEARN_FORMAT_VERSION:
            raise ValueError(f"{source}: relearning curve format {version} is newer than this package reads")
        if len(d["steps"]) != len(d["metrics"]):
            raise ValueError(f"{source}: {len(d['steps'])} steps but {len(d['metrics'])} metric entries")
        return cls(
            steps=[int(s) for s in d["steps"]],
            metrics=[dict(m) for m in d["metrics"]],
            fraction=float(d["fraction"]),
            learning_rate=float(d["learning_rate"]),
            seed=int(d["seed"]),
            indices=[int(i) for i in d["indices"]],
            num_forget_rows=int(d.get("num_forget_rows", 0)),
            train_loss=list(d.get("train_loss") or []),
            settings=dict(d.get("settings") or {}),
            format_version=version,
        )

    def save(self, path: str | os.PathLike) -> None:
        """Write the curve as JSON (parent folders are created; non-finite numbers become null)."""
        save_json(self.to_dict(), path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> RelearnCurve:
        return cls.from_dict(load_json(path, "relearning curve"), source=os.fspath(path))

    # ------------------------------------------------------------------------------------------------- display
    def table(self, keys: Sequence[str] | None = None) -> str:
        """A plain-text table, one row per checkpoint: the step, then `keys` (default: the main forget / utility
        metrics present; every metric for a custom evaluation); then the settings."""
        present = list(dict.fromkeys(k for m in self.metrics for k in m))
        if keys is None:
            keys = [k for k in _TABLE_KEYS if k in present] or present
        rows = [["step", *keys]]
        for step, m in zip(self.steps, self.metrics):
            rows.append([str(step), *(_fmt(m.get(k)) for k in keys)])
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [
            f"Relearning attack: {len(self.indices)} of {self.num_forget_rows} forget rows "
            f"(fraction {self.fraction:g}, seed {self.seed}), learning rate {self.learning_rate:g}"
        ]
        for j, r in enumerate(rows):
            lines.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip())
            if j == 0:
                lines.append("  ".join("-" * w for w in widths))
        for k in ("model", "evaluation", "data_dir", "split", "prompt_format", "batch_size"):
            if self.settings.get(k) is not None:
                v = self.settings[k]
                lines.append(f"{k}: {v!r}" if k == "prompt_format" else f"{k}: {v}")
        return "\n".join(lines)

    def plot(self, metric: str = "forget_probability", **kwargs):
        """`plot_relearn_curves(self, metric, **kwargs)`."""
        return plot_relearn_curves(self, metric, **kwargs)


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.3g}" if v != 0 and abs(v) < 1e-3 else f"{v:.4f}"
    return str(v)


def plot_relearn_curves(
    curves: RelearnCurve | Mapping[str, RelearnCurve] | Sequence[RelearnCurve],
    metric: str = "forget_probability",
    *,
    ax=None,
    path: str | os.PathLike | None = None,
    reference: float | None = None,
    reference_label: str = "retain model",
    title: str | None = None,
):
    """Plot `metric` against relearning steps for one curve, a list, or a mapping label -> curve (one line each);
    `reference` draws a horizontal line (e.g. the retain model's forget probability). Saves to `path` when given.
    Returns the matplotlib `Axes`. Needs matplotlib (``pip install matplotlib``)."""
    try:
        import matplotlib

        if ax is None and path is not None:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("plot_relearn_curves needs matplotlib: pip install matplotlib") from e
    if isinstance(curves, RelearnCurve):
        curves = {curves.settings.get("model") or "model": curves}
    elif not isinstance(curves, Mapping):
        curves = {c.settings.get("model") or f"curve {i}": c for i, c in enumerate(curves)}
    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(5, 3.5))
    for label, c in curves.items():
        pts = [(s, v) for s, v in zip(c.steps, c.series(metric)) if v is not None]
        if not pts:
            raise ValueError(f"curve {label!r} has no values for {metric!r}")
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o", label=str(label))
    if reference is not None:
        ax.axhline(reference, color="gray", linestyle="--", label=reference_label)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    ax.set_xlabel("relearning steps")
    ax.set_ylabel(metric)
    ax.set_title(title if title is not None else f"Relearning attack: {metric.replace('_', ' ')}")
    ax.legend()
    if path is not None:
        (fig or ax.figure).savefig(os.fspath(path), bbox_inches="tight")
    return ax
