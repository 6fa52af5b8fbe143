"""Multiple-choice benchmarks (WMDP, MMLU, any lm-eval task) through EleutherAI's lm-evaluation-harness.

`lm-eval` (0.4.x) is the engine: `evaluate_harness` wraps the model in lm-eval's ``HFLM``, runs
``lm_eval.simple_evaluate`` and turns its output into a `HarnessReport` (an `EvalReport` with ``benchmark="lm-eval"``):

* ``metrics``: ``"{task}/{metric}"`` -> value for every task and group lm-eval reports (``wmdp_bio/acc``,
  ``wmdp_bio/acc_stderr``, ``mmlu/acc``, ...); under a filter other than ``none``: ``"{task}/{metric},{filter}"``.
* ``per_item``: task -> ``doc_id``, ``target``, one column per per-document metric (``acc``, ``acc_norm``) and, for
  multiple-choice tasks, ``loglikelihoods`` (one list per document: the log-likelihood of each choice).
* ``settings``: the requested tasks, task versions, few-shot counts and seed, sample counts, the task configs, and the
  versions of lm-eval, transformers, torch and this package.

Install the extra: ``pip install "trl-unlearn[lm-eval]"``. See docs/wmdp.md.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..loading import load_model, load_tokenizer
from ._lm_eval_compat import backbone_lm_class, quiet_run, reusing_task_manager
from .report import AGGREGATES, EvalReport, package_version

# torch, transformers and lm-eval are imported where used: building the command line's parser stays light

__all__ = ["HarnessReport", "HarnessRunner", "evaluate_harness"]

BENCHMARK = "lm-eval"
LM_EVAL_URL = "https://github.com/EleutherAI/lm-evaluation-harness"
_INSTALL = 'pip install "trl-unlearn[lm-eval]"'
# `datasets` packaged builders: a task reading local files has one of these as its dataset_path
_LOCAL_BUILDERS = {"json", "csv", "parquet", "text", "arrow", "pandas"}
_PRETTY = {"wmdp": "WMDP", "wmdp_bio": "WMDP-Bio", "wmdp_cyber": "WMDP-Cyber", "wmdp_chem": "WMDP-Chem", "mmlu": "MMLU"}
_METRIC_NAMES = {"acc": "accuracy", "acc_norm": "normalized accuracy"}
# keys of an lm-eval logged sample that are not metric values (lm-eval < 0.4.7 has no "metrics" list to say which are)
_SAMPLE_KEYS = {"doc_id", "doc", "target", "arguments", "resps", "filtered_resps", "filter", "metrics", "doc_hash",
                "prompt_hash", "target_hash"}  # fmt: skip


def _import_lm_eval():
    """``(lm_eval, HFLM, TaskManager)``, or an ImportError that names the extra to install."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise ImportError(
            f"lm-eval evaluation needs EleutherAI's lm-evaluation-harness (0.4.x): {_INSTALL}  ({e})"
        ) from e
    return lm_eval, HFLM, TaskManager


def _direction(task: str) -> str:
    if task.startswith("wmdp"):
        return "lower after unlearning (chance 0.25)"
    if task.startswith("mmlu"):
        return "higher (chance 0.25)"
    return ""


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _number(x) -> float | None:
    """lm-eval's value as a float; ``"N/A"`` (no stderr) and other non-numbers become None."""
    if isinstance(x, bool) or not isinstance(x, (int, float, np.number)):
        return None
    return float(x)


def _jsonable(obj):
    """Round-trip through JSON (functions, numpy values and the like in lm-eval configs become strings/numbers)."""
    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


# ------------------------------------------------------------------------------------------------------ report


class HarnessReport(EvalReport):
    """An lm-eval run as an `EvalReport` (``benchmark="lm-eval"``); see the module docstring for the layout."""

    # ----------------------------------------------------------------------------------------- building
    @classmethod
    def from_results(cls, results: Mapping[str, Any], settings: Mapping[str, Any]) -> HarnessReport:
        """Build a report from the dict ``lm_eval.simple_evaluate`` returns and this run's `settings`."""
        metrics: dict[str, float | None] = {}
        for section in ("results", "groups"):
            for task, entries in (results.get(section) or {}).items():
                for key, value in entries.items():
                    if "," not in key:  # name, alias, sample_len
                        continue
                    metric, flt = key.split(",", 1)
                    metrics[f"{task}/{metric}" if flt == "none" else f"{task}/{metric},{flt}"] = _number(value)
        configs = _jsonable(results.get("configs", {}))
        per_item = {
            task: _per_item(samples, configs.get(task, {}).get("output_type"))
            for task, samples in (results.get("samples") or {}).items()
        }
        config = results.get("config", {})
        settings = {
            "benchmark": BENCHMARK,
            **settings,
            "versions": _jsonable(results.get("versions", {})),
            "n_shot": _jsonable(results.get("n-shot", {})),
            "n_samples": _jsonable(results.get("n-samples", {})),
            "higher_is_better": _jsonable(results.get("higher_is_better", {})),
            "group_subtasks": _jsonable(results.get("group_subtasks", {})),
            "fewshot_seed": config.get("fewshot_seed"),
            "bootstrap_iters": config.get("bootstrap_iters"),
            "task_hashes": _jsonable(results.get("task_hashes", {})),
            "configs": configs,
            "lm_eval_version": _version("lm_eval"),
            "transformers_version": _version("transformers"),
            "torch_version": _version("torch"),
            "package_version": package_version(),
        }
        return cls(benchmark=BENCHMARK, metrics=metrics, per_item=per_item, settings=settings)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "report") -> HarnessReport:
        if d.get("benchmark") != BENCHMARK:
            raise ValueError(f"{source}: not an lm-eval report (benchmark {d.get('benchmark')!r})")
        return super().from_dict(d, source=source)

    # ------------------------------------------------------------------------------------------- values
    @property
    def tasks(self) -> list[str]:
        """The task and group names the run was asked for."""
        return list(self.settings.get("tasks", []))

    def _children(self, name: str) -> list[str]:
        return list(self.settings.get("group_subtasks", {}).get(name) or [])

    def leaves(self, name: str) -> list[str]:
        kids = self._children(name)
        return [leaf for k in kids for leaf in self.leaves(k)] if kids else [name]

    def _num_docs(self, name: str) -> int | None:
        counts = [self.settings.get("n_samples", {}).get(t, {}).get("effective") for t in self.leaves(name)]
        return None if None in counts else sum(counts)

    def _num_fewshot(self, name: str) -> int | None:
        shots = {self.settings.get("n_shot", {}).get(t) for t in self.leaves(name)}
        return shots.pop() if len(shots) == 1 else None

    def recompute(self) -> dict[str, float | None]:
        """Each task's mean-aggregated metrics (``acc``, ``acc_norm``, ...) and their standard errors
        (``std(ddof=1) / sqrt(n)``, as lm-eval's ``mean_stderr``), derived again from `per_item`. Tasks only: groups
        (``mmlu``, ``wmdp``) are lm-eval's size-weighted means of these and are not recomputed."""
        out: dict[str, float | None] = {}
        with_stderr = self.settings.get("bootstrap_iters") != 0
        for task, cols in self.per_item.items():
            mean_metrics = _mean_metrics(self.settings.get("configs", {}).get(task, {}))
            for key, values in cols.items():
                metric, _, flt = key.partition(",")
                if metric not in mean_metrics:
                    continue
                x = np.asarray(values, dtype=float)
                suffix = f",{flt}" if flt else ""
                out[f"{task}/{metric}{suffix}"] = float(x.mean())
                if with_stderr:
                    stderr = float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else None
                    out[f"{task}/{metric}_stderr{suffix}"] = stderr
        return out

    # ------------------------------------------------------------------------------------------ display
    def _rows(self) -> list[tuple[str, int]]:
        """(name, depth): each requested task, then a group's direct subtasks / subgroups."""
        rows = []
        for t in self.tasks:
            rows.append((t, 0))
            rows.extend((k, 1) for k in self._children(t))
        return rows

    def table(self) -> str:
        """Requested tasks (and a group's direct members): version, shots, documents, acc and acc_norm ± stderr."""

        def pm(task, metric):
            v = self.metrics.get(f"{task}/{metric}")
            if v is None:
                return "-"
            se = self.metrics.get(f"{task}/{metric}_stderr")
            return f"{v:.4f}" if se is None else f"{v:.4f} ± {se:.4f}"

        rows = [("task", "version", "shots", "n", "acc", "acc_norm", "better")]
        for name, depth in self._rows():
            shots, n = self._num_fewshot(name), self._num_docs(name)
            rows.append((
                "  " * depth + name,
                str(self.settings.get("versions", {}).get(name, "")),
                "" if shots is None else str(shots),
                "" if n is None else str(n),
                pm(name, "acc"),
                pm(name, "acc_norm"),
                _direction(name) if depth == 0 else "",
            ))  # fmt: skip
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [f"lm-eval {self.settings.get('lm_eval_version')} evaluation of {self.settings.get('model')}"]
        for j, r in enumerate(rows):
            lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
            if j == 0:
                lines.append("  ".join("-" * w for w in widths))
        if self.settings.get("limit") is not None:
            lines.append(f"limit: {self.settings['limit']} documents per task (not the full benchmark)")
        return "\n".join(lines)

    # --------------------------------------------------------------------------------------- model card
    def eval_results(self, tasks: Sequence[str] | None = None) -> list:
        """`huggingface_hub.EvalResult` objects (``acc`` and ``acc_norm`` where present) for `tasks` (default: the
        requested ones): for ``ModelCardData(eval_results=..., model_name=...)``. Values are fractions (0-1).

        The dataset is the task's Hub ``dataset_path`` / ``dataset_name``; a task on local files names the Hub dataset
        it copies with ``metadata: {hub_dataset: ..., hub_config: ...}`` in its YAML, else the task name stands in."""
        from huggingface_hub import EvalResult

        out = []
        for name in self.tasks if tasks is None else tasks:
            if f"{name}/acc" not in self.metrics and f"{name}/acc_norm" not in self.metrics:
                raise ValueError(f"no accuracy for {name!r} in this report (tasks: {sorted(self._reported())})")
            leaves = [self.settings.get("configs", {}).get(t, {}) for t in self.leaves(name)]
            hub = [c.get("metadata") or {} for c in leaves]  # a local copy of a Hub dataset may name it there
            paths = {m.get("hub_dataset") or c.get("dataset_path") for c, m in zip(leaves, hub)}
            path = paths.pop() if len(paths) == 1 else None
            multiple_choice = all(c.get("output_type") == "multiple_choice" for c in leaves)
            splits = {c.get("test_split") for c in leaves}
            split = splits.pop() if len(splits) == 1 else None
            config = (hub[0].get("hub_config") or leaves[0].get("dataset_name")) if len(leaves) == 1 else None
            shots = self._num_fewshot(name)
            for metric in ("acc", "acc_norm"):
                value = self.metrics.get(f"{name}/{metric}")
                if value is None:
                    continue
                out.append(EvalResult(
                    task_type="multiple-choice" if multiple_choice else "text-generation",
                    task_name="Multiple Choice" if multiple_choice else "Text Generation",
                    dataset_type=path if path and path not in _LOCAL_BUILDERS else name,
                    dataset_name=_PRETTY.get(name, name),
                    dataset_config=config,
                    dataset_split=split,
                    dataset_args=None if shots is None else {"num_few_shot": shots},
                    metric_type=metric,
                    metric_name=_METRIC_NAMES[metric],
                    metric_value=round(value, 4),
                    source_name="lm-evaluation-harness",
                    source_url=LM_EVAL_URL,
                ))  # fmt: skip
        return out

    def model_index(self, model_name: str, tasks: Sequence[str] | None = None) -> list[dict]:
        """The results as the ``model-index`` list of a Hugging Face model card (task / dataset / metrics)."""
        from huggingface_hub.repocard_data import eval_results_to_model_index

        return eval_results_to_model_index(model_name, self.eval_results(tasks))

    def _reported(self) -> set[str]:
        return {k.split("/", 1)[0] for k in self.metrics}


def _mean_metrics(config: Mapping[str, Any]) -> set[str]:
    """Metrics of a task config aggregated by a plain mean (those `recompute` can derive from per-item values)."""
    listed = config.get("metric_list")
    if not listed:
        return {"acc", "acc_norm"} if config.get("output_type") == "multiple_choice" else set()
    return {m["metric"] for m in listed if m.get("aggregation", "mean") == "mean"}


def _per_item(samples: Sequence[Mapping[str, Any]], output_type: str | None) -> dict[str, list]:
    """Columns from lm-eval's logged samples: ``doc_id``, ``target``, one column per metric (suffixed
    ``,{filter}`` for filters other than ``none``) and ``loglikelihoods`` for multiple-choice tasks."""
    by_filter: dict[str, list] = {}
    for s in samples:
        by_filter.setdefault(s.get("filter", "none"), []).append(s)
    cols: dict[str, list] = {}
    for flt, rows in by_filter.items():
        rows = sorted(rows, key=lambda s: s["doc_id"])
        if not cols:
            cols["doc_id"] = [s["doc_id"] for s in rows]
            cols["target"] = _jsonable([s.get("target") for s in rows])
            if output_type == "multiple_choice":
                cols["loglikelihoods"] = [[float(r[0]) for r in s["filtered_resps"]] for s in rows]
        names = rows[0].get("metrics") or [k for k in rows[0] if k not in _SAMPLE_KEYS]
        for metric in names:
            cols[metric if flt == "none" else f"{metric},{flt}"] = _jsonable([s.get(metric) for s in rows])
    return cols


# ------------------------------------------------------------------------------------------------- running


def task_list(tasks: str | Sequence[str]) -> list[str]:
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks)]
    names = [t for t in names if t]
    if not names:
        raise ValueError("no task given (e.g. tasks='wmdp_bio,wmdp_cyber,mmlu')")
    return names


def _include_paths(include_path) -> list[str]:
    if include_path is None:
        return []
    single = isinstance(include_path, (str, os.PathLike))
    paths = [os.fspath(include_path)] if single else [os.fspath(p) for p in include_path]
    for p in paths:
        if not os.path.exists(p):
            raise FileNotFoundError(f"include_path not found: {p!r} (a folder of lm-eval task YAML files)")
    return [os.path.abspath(p) for p in paths]


class HarnessRunner:
    """lm-eval `tasks` made ready once (names checked, task files indexed, task data loaded at the first run), then run
    on any number of models or checkpoints: ``runner = HarnessRunner(["mmlu"], limit=32); runner(model, tokenizer)``
    returns a `HarnessReport` each time, as `evaluate_harness` would (which builds one and runs it once;
    `UnlearningEvalCallback` runs one at every probe). Arguments as `evaluate_harness`'s, plus `backbone_forward`:
    log-likelihoods from the backbone and the LM head's weight (`_lm_eval_compat.backbone_lm_class`, needed
    between ZeRO-3 training steps),
    and `env_info=False`, which skips lm-eval's survey of the environment at each run (torch's ``collect_env``: pip,
    nvidia-smi, ... subprocesses, ~1 s; not part of a `HarnessReport`). Calling returns None on a process lm-eval
    gives no results to (``LOCAL_RANK`` > 0)."""

    def __init__(self, tasks, *, include_path=None, include_defaults=True, limit=None, batch_size=8, num_fewshot=None,
                 log_samples=True, hflm_kwargs=None, backbone_forward=False, env_info=True,
                 **simple_evaluate_kwargs):  # fmt: skip
        _import_lm_eval()
        self.names = task_list(tasks)
        self.paths = _include_paths(include_path)
        reserved = {"model", "tasks", "task_manager", "limit", "batch_size", "num_fewshot", "log_samples"}
        if reserved & simple_evaluate_kwargs.keys():
            raise ValueError(f"pass {sorted(reserved & simple_evaluate_kwargs.keys())} as evaluate_harness arguments")
        if isinstance(batch_size, str) and not batch_size.startswith("auto"):
            raise ValueError(f"batch_size must be an int or 'auto', got {batch_size!r}")
        self.limit, self.batch_size, self.num_fewshot, self.log_samples = limit, batch_size, num_fewshot, log_samples
        self.hflm_kwargs = dict(hflm_kwargs or {})
        self.backbone_forward = backbone_forward
        self.env_info = env_info
        self.simple_evaluate_kwargs = simple_evaluate_kwargs
        self.task_manager = reusing_task_manager()(include_path=self.paths or None, include_defaults=include_defaults)
        all_tasks = self.task_manager.all_tasks
        unknown = [t for t in self.names if t not in all_tasks]
        if unknown:  # before loading a model
            import difflib

            hints = {t: difflib.get_close_matches(t, all_tasks, n=3) for t in unknown}
            raise ValueError(
                "unknown lm-eval task(s): "
                + "; ".join(f"{t!r}" + (f" (did you mean {', '.join(h)}?)" if h else "") for t, h in hints.items())
                + ("" if self.paths else " — local task YAMLs need include_path")
            )

    def __call__(self, model, tokenizer, model_name: str | None = None) -> HarnessReport | None:
        """The report of `model` now; None on a process lm-eval does not return results on (``LOCAL_RANK`` > 0)."""
        import lm_eval
        import lm_eval.evaluator
        import torch
        from lm_eval.models.huggingface import HFLM

        from .scoring import eval_mode

        rng = random.getstate(), np.random.get_state()
        cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
        lm_class = backbone_lm_class() if self.backbone_forward else HFLM
        with eval_mode(model), torch.random.fork_rng(devices=cuda), quiet_run(env_info=self.env_info):
            try:
                lm = lm_class(pretrained=model, tokenizer=tokenizer, batch_size=self.batch_size, **self.hflm_kwargs)
                results = lm_eval.simple_evaluate(
                    model=lm,
                    tasks=self.names,
                    task_manager=self.task_manager,
                    limit=self.limit,
                    num_fewshot=self.num_fewshot,
                    log_samples=self.log_samples,
                    **self.simple_evaluate_kwargs,
                )
            finally:
                random.setstate(rng[0])
                np.random.set_state(rng[1])
        if results is None:
            return None
        settings = {
            "model": model_name or getattr(model.config, "_name_or_path", "") or type(model).__name__,
            "tasks": self.names,
            "include_path": self.paths,
            "limit": self.limit,
            "batch_size": self.batch_size,
            "num_fewshot": self.num_fewshot,
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "device": str(next(model.parameters()).device),
            "hflm_kwargs": _jsonable(self.hflm_kwargs),
            "simple_evaluate_kwargs": _jsonable(self.simple_evaluate_kwargs),
        }
        return HarnessReport.from_results(results, settings)


def evaluate_harness(
    model,
    tokenizer=None,
    tasks: str | Sequence[str] = ("wmdp_bio", "wmdp_cyber", "mmlu"),
    *,
    include_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    include_defaults: bool = True,
    limit: int | float | None = None,
    batch_size: int | str = 8,
    num_fewshot: int | None = None,
    device: str | None = None,
    dtype: str = "auto",
    log_samples: bool = True,
    model_name: str | None = None,
    hflm_kwargs: Mapping[str, Any] | None = None,
    **simple_evaluate_kwargs,
) -> HarnessReport:
    """Run lm-eval `tasks` on a causal LM and return a `HarnessReport`.

    `model`: a loaded ``transformers`` causal LM (then `tokenizer` is required; `device` and `dtype` are ignored) or a
    model folder / Hub id (loaded with ``AutoModelForCausalLM`` on `device` in `dtype`, after the task names are
    checked). `tokenizer`: a tokenizer or its folder (default for a model folder: that folder). `tasks`: lm-eval task or
    group names, a list or a comma-separated string. `include_path`: folder(s) of extra task YAML files (local data:
    docs/wmdp.md); `include_defaults=False` indexes only those (skips lm-eval's ~14k built-in task files). `limit`:
    documents per task (an int, or a fraction < 1); for smoke tests only. `num_fewshot`: overrides the tasks' default
    (a task whose YAML sets 0, as WMDP's does, stays at 0 — lm-eval's rule). `hflm_kwargs` go to ``HFLM`` (e.g.
    ``max_length``, ``add_bos_token``), other keyword arguments to ``lm_eval.simple_evaluate`` (e.g.
    ``apply_chat_template``, ``system_instruction``, ``fewshot_random_seed``).

    The model is evaluated in eval mode without gradients; its train/eval mode and the caller's ``random``, numpy and
    torch RNG states are restored afterwards (lm-eval seeds them globally).
    """
    from_path = isinstance(model, (str, os.PathLike))
    if not from_path and tokenizer is None:
        _import_lm_eval()  # a missing extra is the first thing to report
        raise ValueError("evaluate_harness: pass the tokenizer with an in-memory model")
    harness = HarnessRunner(tasks, include_path=include_path, include_defaults=include_defaults, limit=limit,
                       batch_size=batch_size, num_fewshot=num_fewshot, log_samples=log_samples,
                       hflm_kwargs=hflm_kwargs, **simple_evaluate_kwargs)  # fmt: skip
    if isinstance(tokenizer, (str, os.PathLike)) or (from_path and tokenizer is None):
        tokenizer = load_tokenizer(os.fspath(model if tokenizer is None else tokenizer))
    if from_path:
        model_name = model_name or os.fspath(model)
        model = load_model(os.fspath(model), dtype, device)
    report = harness(model, tokenizer, model_name)
    if report is None:  # lm-eval returns None on processes other than the (local) main one
        raise RuntimeError("lm_eval.simple_evaluate returned no results (not the main process?)")
    return report


AGGREGATES[BENCHMARK] = lambda per_item, reference, settings: HarnessReport(
    BENCHMARK, {}, per_item, dict(settings), dict(reference)
).recompute()
