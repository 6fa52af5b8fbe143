"""`LMEvalGuardCallback`: lm-eval tasks (MMLU, WMDP, ...) on a few documents each while a trainer trains, as a
utility guard: logged as ``probe/harness/{task}/{metric}`` and, with `min_metrics`, an early stop when one falls
below its threshold (`PeriodicEvalCallback`, `callback.py`).

    # MMLU (8 questions of each of its 57 subjects) as a guard: stop when accuracy falls below 90% of its start
    guard = LMEvalGuardCallback("mmlu", limit=8, min_metrics={"mmlu/acc": 0.9}, relative=True, eval_steps=50)
    guard.attach(trainer)
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

from .callback import PeriodicEvalCallback
from .lm_eval import HarnessRunner, task_list

__all__ = ["LMEvalGuardCallback"]


def _headline(report) -> dict[str, float | None]:
    """The report's metrics of the requested tasks and groups (a group lm-eval does not aggregate: its tasks'), and of
    the tasks a requested tag stands for (reported tasks that are neither requested nor in a group)."""
    members = {t for kids in report.settings.get("group_subtasks", {}).values() for t in kids}
    shown = set()
    for name in report.tasks:
        own = [k for k in report.metrics if k.partition("/")[0] == name]
        shown |= {name} if own else set(report.leaves(name))
    shown |= {k.partition("/")[0] for k in report.metrics} - members - set(report.tasks)
    return {k: v for k, v in report.metrics.items() if k.partition("/")[0] in shown}


def _check_harness_args(names, limit, batch_size, kwargs, minimums) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if limit is not None and (isinstance(limit, bool) or limit <= 0):
        raise ValueError(f"limit must be > 0 (documents, or a fraction < 1) or None, got {limit}")
    own = sorted({"tasks", "include_path", "include_defaults", "limit", "batch_size", "num_fewshot"} & kwargs.keys())
    if own:
        raise ValueError("harness_kwargs: pass " + ", ".join(f"{k} as LMEvalGuardCallback's {k}" for k in own))
    for key, value in minimums.items():
        task, _, metric = key.partition("/")
        if task not in names or not metric:
            raise ValueError(f"min_metrics key {key!r}: use '{{task}}/{{metric}}' with a task of `tasks` "
                             f"{names} (e.g. '{names[0]}/acc')")  # fmt: skip
        if value < 0:
            raise ValueError(f"min_metrics[{key!r}] must be >= 0, got {value}")


@contextlib.contextmanager
def _quiet_lm_eval():
    """lm-eval's log messages below ERROR are dropped (every probe after the first repeats the first's)."""
    log = logging.getLogger("lm_eval")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


class LMEvalGuardCallback(PeriodicEvalCallback):
    """Run lm-eval `tasks` every `eval_steps` steps (`PeriodicEvalCallback`); optional early stop on lost utility.

    Args:
        tasks: lm-eval task or group names (a list or a comma-separated string, e.g. ``"mmlu"``), run with a
            `HarnessRunner` at every probe; their metrics are logged as ``harness/{task}/{metric}`` (requested names
            only: ``mmlu/acc``, not its 57 subjects; a name lm-eval reports no metric for, such as a tag, logs its
            tasks'). Unknown names fail when the callback is built.
        limit: documents per task (lm-eval's ``limit``: an int, or a fraction < 1; None: all). It applies to every
            task of a group: ``"mmlu"`` with 32 scores 57 x 32 questions.
        include_path, include_defaults: folder(s) of local task YAMLs; False indexes only those (skips the 6–9 s
            indexing of lm-eval's built-in tasks).
        num_fewshot, batch_size: as `evaluate_harness`'s (`batch_size` an int: ``"auto"`` could pick different sizes
            on different ranks).
        harness_kwargs: other `evaluate_harness` keyword arguments (``hflm_kwargs``, ``apply_chat_template``,
            ``fewshot_random_seed``, ...).
        min_metrics: ``{"mmlu/acc": 0.9}`` (keys ``"{task}/{metric}"`` with a task of `tasks`); training stops when
            any one is not met (`relative` as `PeriodicEvalCallback`'s).
        relative, trainer, tokenizer, eval_steps, eval_on_train_begin, eval_on_train_end, prefix,
        update_evaluation_summary: as `PeriodicEvalCallback`'s.

    `report` holds the last probe's `HarnessReport` (per-document results; on the main process only).

    Each probe wraps the model in a new lm-eval ``HFLM`` whose log-likelihoods come from the backbone and the LM
    head's weight, as the QA probes' (`_lm_eval_compat.backbone_lm_class`; equal to `evaluate_harness`'s plain forward
    up to float rounding); the tasks are indexed once (when the callback is built) and loaded once (at the first
    probe), then reused; lm-eval's survey of the environment (~1 s of subprocesses) is skipped. Every probe restores
    the model's train / eval mode and the ``random``, numpy and torch RNG states (lm-eval seeds them); lm-eval gets a
    copy of the tokenizer (it may add a pad token). lm-eval's own log messages are shown at the first probe only.
    Multiple-choice / log-likelihood tasks are what this is for; generation tasks call ``model.generate`` (not tried
    under ZeRO-3). lm-eval treats a model object it is given as a single process (rank 0 of 1), so each rank scores
    every document, in the same batches; lm-eval 0.4.13 returns results on local rank 0 only (`report` is None
    elsewhere; 0.4.10: on every rank). Checked on CPU with 2 processes under DDP and DeepSpeed ZeRO-3.
    """

    def __init__(
        self,
        tasks: str | Sequence[str],
        *,
        limit: int | float | None = 32,
        include_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
        include_defaults: bool = True,
        num_fewshot: int | None = None,
        batch_size: int = 8,
        harness_kwargs: Mapping[str, Any] | None = None,
        min_metrics: Mapping[str, float] | None = None,
        **schedule,
    ):
        names = task_list(tasks)
        _check_harness_args(names, limit, batch_size, harness_kwargs or {}, min_metrics or {})
        super().__init__(thresholds={"harness/" + k: v for k, v in (min_metrics or {}).items()}, **schedule)
        self.runner = HarnessRunner(
            names, include_path=include_path, include_defaults=include_defaults, limit=limit, batch_size=batch_size,
            num_fewshot=num_fewshot, backbone_forward=True, env_info=False, **dict(harness_kwargs or {}),
        )  # fmt: skip
        self.report = None
        self._tokenizer_copy = None

    def measure(self, model, tokenizer) -> dict[str, float]:
        """The requested tasks' metrics now (``harness/{task}/{metric}``); {} on processes lm-eval gives no results
        to (rank 0's are broadcast)."""
        if self._tokenizer_copy is None:
            self._tokenizer_copy = copy.deepcopy(tokenizer)
        quiet = bool(self.history)  # lm-eval's messages: at the first probe only
        with _quiet_lm_eval() if quiet else contextlib.nullcontext():
            report = self.runner(model, self._tokenizer_copy)
        if report is None:
            return {}
        self.report = report
        return {"harness/" + k: v for k, v in _headline(report).items()}
