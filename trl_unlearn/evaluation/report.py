"""`EvalReport`: the result of an evaluation run, as one JSON file.

A report holds the aggregate metrics, the per-item values they are computed from (per-item mean NLL of every
answer, truth ratios, ROUGE scores, generations, membership scores), the settings used (prompt format, max lengths,
decoding, model path, split, package version, data fingerprints) and the reference values taken from a retain /
retrained model (its per-item forget truth ratios for TOFU forget quality, its AUC for MUSE PrivLeak).
`recompute()` derives the aggregates again from the per-item values alone.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from ..metric_directions import direction

__all__ = ["EvalReport", "REPORT_FORMAT_VERSION", "check_same_settings", "direction", "package_version"]

REPORT_FORMAT_VERSION = 1


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("trl-unlearn")
    except PackageNotFoundError:
        return "unknown"


def _finite_or_none(x):
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


@dataclass
class EvalReport:
    """One evaluation run. `benchmark` is ``"tofu"`` or ``"muse"``.

    `metrics`: aggregate name -> value (None when it could not be computed, e.g. forget quality without a retain
    model). `per_item`: set name -> column name -> list with one entry per item. `settings`: how the run was made.
    `reference`: values taken from a retain / retrained model (and where they came from).
    """

    benchmark: str
    metrics: dict[str, float | None]
    per_item: dict[str, dict[str, list]]
    settings: dict[str, Any]
    reference: dict[str, Any] = field(default_factory=dict)
    format_version: int = REPORT_FORMAT_VERSION

    # ------------------------------------------------------------------------------------------------ JSON
    def to_dict(self) -> dict:
        d = asdict(self)
        d["metrics"] = {k: _finite_or_none(v) for k, v in self.metrics.items()}
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "report") -> EvalReport:
        missing = [k for k in ("benchmark", "metrics", "per_item", "settings") if k not in d]
        if missing:
            raise ValueError(f"{source}: not an evaluation report (missing {', '.join(missing)})")
        version = d.get("format_version", REPORT_FORMAT_VERSION)
        if version > REPORT_FORMAT_VERSION:
            raise ValueError(f"{source}: report format {version} is newer than this package reads")
        return cls(
            benchmark=d["benchmark"],
            metrics=dict(d["metrics"]),
            per_item={k: dict(v) for k, v in d["per_item"].items()},
            settings=dict(d["settings"]),
            reference=dict(d.get("reference") or {}),
            format_version=version,
        )

    def save(self, path: str | os.PathLike) -> None:
        """Write the report as JSON (parent folders are created). Non-finite numbers are written as null."""
        save_json(self.to_dict(), path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> EvalReport:
        return cls.from_dict(load_json(path, "report"), source=os.fspath(path))

    # ----------------------------------------------------------------------------------------- aggregates
    def recompute(self) -> dict[str, float | None]:
        """The aggregate metrics, derived again from `per_item`, `reference` and `settings` only."""
        if self.benchmark not in AGGREGATES:
            raise ValueError(f"unknown benchmark {self.benchmark!r} (known: {sorted(AGGREGATES)})")
        return AGGREGATES[self.benchmark](self.per_item, self.reference, self.settings)

    # ------------------------------------------------------------------------------------------- display
    def table(self) -> str:
        """A plain-text table: metric, value, which direction is better; then the main settings."""
        rows = [("metric", "value", "better")]
        for name, value in self.metrics.items():
            shown = "n/a" if value is None else f"{value:.4g}" if abs(value) < 1e-3 and value != 0 else f"{value:.4f}"
            rows.append((name, shown, direction(name)))
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = [f"{self.benchmark.upper()} evaluation"]
        for j, r in enumerate(rows):
            lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
            if j == 0:
                lines.append("  ".join("-" * w for w in widths))
        shown_settings = [
            k
            for k in ("model", "split", "prompt_format", "max_length", "max_new_tokens", "decoding", "data_dir")
            if k in self.settings
        ]
        for k in shown_settings:
            lines.append(f"{k}: {self.settings[k]!r}" if k == "prompt_format" else f"{k}: {self.settings[k]}")
        if self.reference.get("source"):
            lines.append(f"reference: {self.reference['source']}")
        return "\n".join(lines)

    def print_table(self, file=None) -> None:
        print(self.table(), file=file)


AGGREGATES: dict = {}
"""benchmark name -> `aggregates(per_item, reference, settings) -> metrics`; each benchmark module registers its own."""


def save_json(obj, path: str | os.PathLike) -> None:
    """Write `obj` as strict JSON (non-finite numbers become null; parent folders are created)."""
    path = os.fspath(path)
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(json_safe(obj), f, ensure_ascii=False, indent=1, allow_nan=False)
        f.write("\n")


def load_json(path: str | os.PathLike, what: str = "file"):
    """Read a JSON file; a clear error when it is missing or not JSON."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path!r}")
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON: {e}") from e


def json_safe(obj):
    """Replace non-finite floats by None (strict JSON), recursively; numpy scalars become Python numbers."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


EVAL_OPTIONS = (
    "prompt_format",
    "max_length",
    "max_new_tokens",
    "split",
    "min_k",
    "knowmem_shots",
    "verbmem_max_new_tokens",
    "knowmem_max_new_tokens",
)
"""Settings that are options of the evaluation (`trl-unlearn eval --<name>`); the others describe the data."""


def _flag_value(key: str, value):
    """A recorded setting as its command-line option takes it (the recorded prompt formats by their names)."""
    if key == "prompt_format":
        from ..data.formats import PROMPT_TEMPLATE

        return {"chat_template": "chat", PROMPT_TEMPLATE: "plain"}.get(value, value)
    return value


def check_same_settings(
    reference: EvalReport, settings: Mapping[str, Any], keys: Iterable[str], what: str = "reference report"
) -> None:
    """Raise `ValueError` listing every key of `keys` whose value differs between `reference.settings` and
    `settings` (a value missing on either side counts as different), and the options that would match it."""
    diffs, fixes = [], []
    for k in keys:
        a = reference.settings.get(k, "<missing>")
        b = settings.get(k, "<missing>")
        if a != b:
            diffs.append(f"{k}: {a!r} there vs {b!r} here")
            if k in EVAL_OPTIONS and a != "<missing>":
                fixes.append(f"--{k} {_flag_value(k, a)!r}")
    if diffs:
        fix = (f"pass {' '.join(fixes)} (the same keyword arguments in Python) or " if fixes else "") + (
            f"make the {what} again with this run's settings and data"
        )
        raise ValueError(
            f"the {what} was made with different settings; refusing to compare: {'; '.join(diffs)}. To compare, {fix}."
        )
