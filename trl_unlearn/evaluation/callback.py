"""`UnlearningEvalCallback`: probe forgetting and utility on small QA sets (and lm-eval tasks) while a trainer runs.

Every `eval_steps` optimizer steps (and, by default, when training begins and ends) the callback scores a small
forget probe set and a small retain probe set with one batched `score_answers` call and logs, through the trainer's
loggers (console, TensorBoard, W&B, ... and `trainer.state.log_history`):

* ``probe/forget_probability``, ``probe/retain_probability``: mean `exp(-avg_nll)` of the ground-truth answers
  (TOFU's "Probability", `method.md` §4);
* with ``rouge=True``: ``probe/forget_rougeL_recall``, ``probe/retain_rougeL_recall`` of greedy answers (slower);
* with ``harness_tasks``: ``probe/harness/{task}/{metric}`` (``probe/harness/mmlu/acc``, ...) of lm-eval tasks run on
  the first ``harness_limit`` documents of each task (`evaluate_harness`, the ``lm-eval`` extra).

It can stop training early when the retain probability or a harness metric (utility) falls below a threshold,
absolute or relative to its value when training began, and it keeps ``trainer.evaluation_summary`` set to the last
probe numbers, so they are written into the model card.

Usage::

    probe = UnlearningEvalCallback(forget_rows[:32], retain_rows[:32], eval_steps=10, min_retain_probability=0.5,
                                   relative=True)
    trainer = SimNPOTrainer(model=..., args=..., forget_dataset=..., retain_dataset=..., processing_class=tokenizer)
    probe.attach(trainer)          # = trainer.add_callback(probe) + keep a reference to the trainer
    trainer.train()

    # MMLU (8 questions of each of its 57 subjects) as a guard: stop when accuracy falls below 90% of its start
    guard = UnlearningEvalCallback(harness_tasks="mmlu", harness_limit=8, min_harness_metrics={"mmlu/acc": 0.9},
                                   relative=True, eval_steps=50)
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from accelerate.utils import extract_model_from_parallel
from transformers import Trainer, TrainerCallback

from ..data.formats import PromptFormat
from .lm_eval import HarnessRunner, task_list
from .probes import probe_metrics, qa_pairs
from .scoring import eval_mode

__all__ = ["UnlearningEvalCallback"]

logger = logging.getLogger(__name__)


def _broadcast_from_main(obj):
    """Under `torch.distributed`, every rank gets rank 0's `obj` (all ranks call this at the same steps)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if torch.distributed.get_world_size() > 1:
            box = [obj]
            torch.distributed.broadcast_object_list(box, src=0)
            return box[0]
    return obj


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
        raise ValueError(f"harness_batch_size must be an int >= 1, got {batch_size!r}")
    if limit is not None and (isinstance(limit, bool) or limit <= 0):
        raise ValueError(f"harness_limit must be > 0 (documents, or a fraction < 1) or None, got {limit}")
    own = sorted({"tasks", "include_path", "include_defaults", "limit", "batch_size", "num_fewshot"} & kwargs.keys())
    if own:
        raise ValueError("harness_kwargs: pass " + ", ".join(f"{k} as harness_{k}" for k in own))
    for key, value in minimums.items():
        task, _, metric = key.partition("/")
        if task not in names or not metric:
            raise ValueError(f"min_harness_metrics key {key!r}: use '{{task}}/{{metric}}' with a task of harness_tasks "
                             f"{names} (e.g. '{names[0]}/acc')")  # fmt: skip
        if value < 0:
            raise ValueError(f"min_harness_metrics[{key!r}] must be >= 0, got {value}")


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


class UnlearningEvalCallback(TrainerCallback):
    """Probe forget / retain probability (and lm-eval tasks) every `eval_steps` steps; optional early stop on lost
    utility.

    Args:
        forget_rows, retain_rows: small probe sets (tens of rows): TOFU-layout rows (``question``, ``answer``; extra
            keys ignored; a `datasets.Dataset` with these columns works) or (question, answer) pairs. Either may be
            None; early stopping on the retain probability needs `retain_rows`.
        trainer: the trainer to log through; or call `attach(trainer)`. Without one, the numbers only go to
            `state.log_history` (not to the reporting integrations) and `evaluation_summary` is not set.
        tokenizer: default: the trainer's `processing_class`.
        eval_steps: probe when `state.global_step` is a multiple of it.
        eval_on_train_begin, eval_on_train_end: also probe before the first step (logged at the starting step) and
            after the last one (unless that step was just probed).
        rouge: also greedy-generate answers (`max_new_tokens`) and log ROUGE-L recall (off by default: slower).
        prompt_format, batch_size, max_length: as in `score_answers`. Use the format the model is trained with
            (``"plain"`` for ``"Question: ...\\nAnswer:"`` prompt-completion data, ``"chat"`` for conversational data).
        harness_tasks: lm-eval task or group names (a list or a comma-separated string, e.g. ``"mmlu"``), run with
            `evaluate_harness` at every probe; their metrics are logged as ``harness/{task}/{metric}`` (requested
            names only: ``mmlu/acc``, not its 57 subjects; a name lm-eval reports no metric for, such as a tag, logs
            its tasks'). At least one of `forget_rows`, `retain_rows`, `harness_tasks` is needed.
        harness_limit: documents per task (lm-eval's ``limit``: an int, or a fraction < 1; None: all). It applies to
            every task of a group: ``"mmlu"`` with 32 scores 57 x 32 questions.
        harness_include_path, harness_include_defaults: folder(s) of local task YAMLs; False indexes only those
            (skips the 6–9 s indexing of lm-eval's built-in tasks).
        harness_num_fewshot, harness_batch_size: as `evaluate_harness`'s `num_fewshot` and `batch_size` (an int:
            ``"auto"`` could pick different sizes on different ranks).
        harness_kwargs: other `evaluate_harness` keyword arguments (``hflm_kwargs``, ``apply_chat_template``,
            ``fewshot_random_seed``, ...).
        min_retain_probability: stop training (`control.should_training_stop`) at the first probe after a training
            step where the retain probability is below this value, or, with `relative=True`, below this fraction of
            its value at train begin (then the train-begin probe always runs).
        min_harness_metrics: the same for harness metrics: ``{"mmlu/acc": 0.9}`` (keys ``"{task}/{metric}"`` with a
            task of `harness_tasks`). `relative` applies to every threshold. Training stops when any one is not met.
        prefix: prefix of the logged keys.
        update_evaluation_summary: keep `trainer.evaluation_summary` (the model card's evaluation section) set to the
            last probe numbers; other keys already there are kept.

    After training: `history` holds every probe (``{"step": ..., metric: value}``), `baseline` the train-begin values
    of the thresholded metrics (`baseline_retain_probability` the retain probability's), `stopped_at` the step
    training was stopped at (None if it was not), `harness_report` the last probe's `HarnessReport` (per-document
    results; on the main process only).

    Each probe wraps the model in a new lm-eval ``HFLM`` whose log-likelihoods come from the backbone and the LM
    head's weight, as the QA probes' (`harness._backbone_lm`; equal to `evaluate_harness`'s plain forward up to float
    rounding); the tasks are indexed once (when the callback is built: unknown names fail then) and loaded once (at
    the first probe), then reused; lm-eval's survey of the environment (~1 s of subprocesses) is skipped. Every probe
    restores the model's train / eval mode and the ``random``, numpy and torch RNG states (lm-eval seeds them);
    lm-eval gets a copy of the tokenizer (it may add a pad token). lm-eval's own log messages are shown at the first
    probe only. Multiple-choice / log-likelihood tasks are what this is for; generation tasks call ``model.generate``
    (not tried under ZeRO-3).

    Distributed training: every rank runs the probe on its (unwrapped) model with the same inputs, so all ranks run
    the same forward passes and collectives (ZeRO-3 parameter gathering included), and rank 0's numbers are broadcast
    to the others, so every rank takes the same early-stop decision. lm-eval treats a model object it is given as a
    single process (``HFLM``: rank 0 of 1, no accelerator of its own), so each rank scores every document, in the
    same batches (hence no ``"auto"`` batch size); lm-eval 0.4.13 returns results on local rank 0 only
    (`harness_report` is None elsewhere; 0.4.10: on every rank). Checked on CPU with 2 processes under DDP and
    DeepSpeed ZeRO-3. Logging goes through `Trainer.log` on every rank as the trainer's own logging does; the
    reporting integrations write from the main process only. FSDP (whose unwrapped model cannot run a forward on its
    own) is not supported.
    """

    def __init__(
        self,
        forget_rows: Iterable | None = None,
        retain_rows: Iterable | None = None,
        *,
        trainer=None,
        tokenizer=None,
        eval_steps: int = 50,
        eval_on_train_begin: bool = True,
        eval_on_train_end: bool = True,
        rouge: bool = False,
        max_new_tokens: int = 64,
        prompt_format: str | PromptFormat = "auto",
        batch_size: int = 16,
        max_length: int = 512,
        harness_tasks: str | Sequence[str] | None = None,
        harness_limit: int | float | None = 32,
        harness_include_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
        harness_include_defaults: bool = True,
        harness_num_fewshot: int | None = None,
        harness_batch_size: int = 8,
        harness_kwargs: Mapping[str, Any] | None = None,
        min_retain_probability: float | None = None,
        min_harness_metrics: Mapping[str, float] | None = None,
        relative: bool = False,
        prefix: str = "probe/",
        update_evaluation_summary: bool = True,
    ):
        self.forget = qa_pairs(forget_rows, "forget probe") if forget_rows is not None else []
        self.retain = qa_pairs(retain_rows, "retain probe") if retain_rows is not None else []
        if not self.forget and not self.retain and harness_tasks is None:
            raise ValueError("UnlearningEvalCallback needs forget_rows and/or retain_rows, or harness_tasks")
        if eval_steps < 1:
            raise ValueError(f"eval_steps must be >= 1, got {eval_steps}")
        self.thresholds: dict[str, float] = {}  # metric (unprefixed key) -> minimum (a fraction with `relative`)
        if min_retain_probability is not None:
            if not self.retain:
                raise ValueError("min_retain_probability (early stopping on utility) needs retain_rows")
            if min_retain_probability < 0:
                raise ValueError(f"min_retain_probability must be >= 0, got {min_retain_probability}")
            self.thresholds["retain_probability"] = min_retain_probability
        self.harness = None
        if harness_tasks is not None:
            names = task_list(harness_tasks)
            _check_harness_args(names, harness_limit, harness_batch_size, harness_kwargs or {},
                                min_harness_metrics or {})
            self.harness = HarnessRunner(
                names, include_path=harness_include_path, include_defaults=harness_include_defaults,
                limit=harness_limit, batch_size=harness_batch_size, num_fewshot=harness_num_fewshot,
                backbone_forward=True, env_info=False, **dict(harness_kwargs or {}),
            )  # fmt: skip
            self.thresholds.update({"harness/" + k: v for k, v in (min_harness_metrics or {}).items()})
        elif min_harness_metrics:
            raise ValueError("min_harness_metrics needs harness_tasks")
        self.trainer = trainer
        self.tokenizer = tokenizer
        self.eval_steps = eval_steps
        self.eval_on_train_begin = eval_on_train_begin
        self.eval_on_train_end = eval_on_train_end
        self.rouge = rouge
        self.max_new_tokens = max_new_tokens
        self.prompt_format = prompt_format
        self.batch_size = batch_size
        self.max_length = max_length
        self.relative = relative
        self.prefix = prefix
        self.update_evaluation_summary = update_evaluation_summary
        self.history: list[dict[str, Any]] = []
        self.baseline: dict[str, float] = {}
        self.stopped_at: int | None = None
        self.harness_report = None
        self._harness_tokenizer = None
        self._last_step: int | None = None
        self._warned = False

    @property
    def baseline_retain_probability(self) -> float | None:
        return self.baseline.get("retain_probability")

    @property
    def min_retain_probability(self) -> float | None:
        """The retain-probability threshold, as held in `thresholds` (what the early stop reads)."""
        return self.thresholds.get("retain_probability")

    def attach(self, trainer) -> UnlearningEvalCallback:
        """`trainer.add_callback(self)` and log through `trainer` from now on. Returns self."""
        self.trainer = trainer
        trainer.add_callback(self)
        return self

    # ------------------------------------------------------------------------------------------------------ probe
    def probe(self, model, tokenizer) -> dict[str, float]:
        """The probe metrics of `model` now (unprefixed keys); the model's train / eval mode is left as it was."""
        model = extract_model_from_parallel(model)
        metrics = {}
        if self.forget or self.retain:
            with eval_mode(model):
                metrics, _ = probe_metrics(
                    model, tokenizer, self.forget, self.retain, prompt_format=self.prompt_format,
                    batch_size=self.batch_size, max_length=self.max_length, rouge=self.rouge,
                    max_new_tokens=self.max_new_tokens,
                )
        if self.harness is not None:
            if self._harness_tokenizer is None:
                self._harness_tokenizer = copy.deepcopy(tokenizer)
            quiet = bool(self.history)  # lm-eval's messages: at the first probe only
            with _quiet_lm_eval() if quiet else contextlib.nullcontext():
                report = self.harness(model, self._harness_tokenizer)
            if report is not None:  # None on processes with LOCAL_RANK > 0; rank 0's numbers are broadcast below
                self.harness_report = report
                metrics.update({"harness/" + k: v for k, v in _headline(report).items()})
        return _broadcast_from_main(metrics)

    def _tokenizer(self, kwargs):
        if self.tokenizer is not None:
            return self.tokenizer
        pc = kwargs.get("processing_class")
        if pc is None and self.trainer is not None:
            pc = self.trainer.processing_class
        if pc is None:
            raise ValueError("UnlearningEvalCallback: no tokenizer (pass tokenizer= or give the trainer one)")
        return getattr(pc, "tokenizer", pc)

    def _run(self, state, control, kwargs, check_stop: bool) -> dict[str, float]:
        step = state.global_step
        metrics = self.probe(kwargs["model"], self._tokenizer(kwargs))
        missing = [k for k in self.thresholds if metrics.get(k) is None]
        if missing:  # every rank has the same (broadcast) metrics: every rank raises
            raise ValueError(f"UnlearningEvalCallback: no value for {missing} to threshold; the probe gives "
                             f"{sorted(k for k, v in metrics.items() if v is not None)}")  # fmt: skip
        self._last_step = step
        self.history.append({"step": step, **metrics})
        logs = {self.prefix + k: v for k, v in metrics.items() if v is not None}
        if check_stop:
            for key, minimum in self.thresholds.items():
                threshold = minimum * self.baseline.get(key, 0.0) if self.relative else minimum
                if metrics[key] < threshold:
                    control.should_training_stop = True
                    self.stopped_at = step
                    logs[self.prefix + "early_stop"] = 1.0
                    logger.warning("UnlearningEvalCallback: %s %.4g < %.4g at step %d: stopping training",
                                   key, metrics[key], threshold, step)  # fmt: skip
        self._log(state, control, logs)
        return metrics

    def _log(self, state, control, logs: dict[str, float]) -> None:
        if self.trainer is None:
            if not self._warned:
                warnings.warn(
                    "UnlearningEvalCallback has no trainer to log through: the probe numbers go to "
                    "state.log_history only. Use `callback.attach(trainer)` (or pass trainer=).",
                    stacklevel=3,
                )
                self._warned = True
            state.log_history.append({**logs, "step": state.global_step})
            return
        # `Trainer.log`, not `trainer.log`: TRL trainers' `log` would also flush (and reset) the training metrics
        # collected since the last logging step into this entry. Its `on_log` event clears `should_log`, which would
        # make the trainer skip its own logging at this step: keep the flag as it was.
        should_log = control.should_log
        Trainer.log(self.trainer, dict(logs))
        control.should_log = self.trainer.control.should_log = should_log
        if self.update_evaluation_summary:
            previous = self.trainer.evaluation_summary or {}
            summary = {k: v for k, v in previous.items() if not k.startswith(self.prefix)}
            summary.update({k: v for k, v in logs.items() if k != self.prefix + "early_stop"})
            summary[self.prefix + "step"] = state.global_step
            if self.stopped_at is not None:
                summary[self.prefix + "early_stopped_at_step"] = self.stopped_at
            self.trainer.evaluation_summary = summary

    # ----------------------------------------------------------------------------------------------------- events
    def on_train_begin(self, args, state, control, **kwargs):
        self.stopped_at = None
        self._last_step = None
        self.baseline = {}
        if self.eval_on_train_begin or (self.relative and self.thresholds):
            metrics = self._run(state, control, kwargs, check_stop=False)
            self.baseline = {k: metrics[k] for k in self.thresholds}
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.eval_steps == 0 and state.global_step != self._last_step:
            self._run(state, control, kwargs, check_stop=True)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self.eval_on_train_end and state.global_step != self._last_step:
            self._run(state, control, kwargs, check_stop=False)
        return control
