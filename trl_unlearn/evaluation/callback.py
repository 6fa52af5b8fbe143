"""Probes that run while a trainer trains, every `eval_steps` optimizer steps (and, by default, when training begins
and ends), log through the trainer's loggers (console, TensorBoard, W&B, ... and `trainer.state.log_history`), keep
`trainer.evaluation_summary` (the model card's evaluation section) set to the last numbers, and can stop training
early when a metric (utility) falls below a threshold, absolute or relative to its value when training began.

- `UnlearningEvalCallback` (here): forget / retain probability (and ROUGE-L) on small QA probe sets.
- `LMEvalGuardCallback` (`lm_eval_callback.py`): lm-eval tasks (MMLU, WMDP, ...) on a few documents each.

Both are a `PeriodicEvalCallback`: the schedule, thresholds, logging and distributed agreement; a subclass defines
`measure(model, tokenizer) -> {metric: value}`.

Usage::

    probe = UnlearningEvalCallback(forget_rows[:32], retain_rows[:32], eval_steps=10, min_retain_probability=0.5,
                                   relative=True)
    trainer = SimNPOTrainer(model=..., args=..., forget_dataset=..., retain_dataset=..., processing_class=tokenizer)
    probe.attach(trainer)          # = trainer.add_callback(probe) + keep a reference to the trainer
    trainer.train()

Distributed training: every rank runs the probe on its (unwrapped) model with the same inputs, so all ranks run the
same forward passes and collectives (ZeRO-3 parameter gathering included), and rank 0's numbers are broadcast to the
others, so every rank takes the same early-stop decision. Logging goes through `Trainer.log` on every rank as the
trainer's own logging does; the reporting integrations write from the main process only. FSDP (whose unwrapped
model cannot run a forward on its own) is not supported.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from accelerate.utils import extract_model_from_parallel
from transformers import Trainer, TrainerCallback

from ..data.formats import PromptFormat
from .probes import probe_metrics, qa_pairs
from .scoring import eval_mode

__all__ = ["PeriodicEvalCallback", "UnlearningEvalCallback"]

logger = logging.getLogger(__name__)


def _broadcast_from_main(obj):
    """Under `torch.distributed`, every rank gets rank 0's `obj` (all ranks call this at the same steps)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if torch.distributed.get_world_size() > 1:
            box = [obj]
            torch.distributed.broadcast_object_list(box, src=0)
            return box[0]
    return obj


class PeriodicEvalCallback(TrainerCallback):
    """The schedule, thresholds, logging and distributed agreement of a probe (module docstring); a subclass defines
    `measure(model, tokenizer) -> {metric: value}` (unprefixed keys, None when not computable).

    Args:
        thresholds: `{metric: minimum}`: stop training (`control.should_training_stop`) at the first probe after a
            training step where a metric is below its minimum, or, with `relative=True`, below that fraction of its
            value at train begin (then the train-begin probe always runs).
        trainer: the trainer to log through; or call `attach(trainer)`. Without one, the numbers only go to
            `state.log_history` (not to the reporting integrations) and `evaluation_summary` is not set.
        tokenizer: default: the trainer's `processing_class`.
        eval_steps: probe when `state.global_step` is a multiple of it.
        eval_on_train_begin, eval_on_train_end: also probe before the first step (logged at the starting step) and
            after the last one (unless that step was just probed).
        prefix: prefix of the logged keys.
        update_evaluation_summary: keep `trainer.evaluation_summary` set to the last probe numbers; other keys
            already there are kept.

    After training: `history` holds every probe (``{"step": ..., metric: value}``), `baseline` the train-begin values
    of the thresholded metrics, `stopped_at` the step training was stopped at (None if it was not).
    """

    def __init__(
        self,
        *,
        thresholds: Mapping[str, float] | None = None,
        relative: bool = False,
        trainer=None,
        tokenizer=None,
        eval_steps: int = 50,
        eval_on_train_begin: bool = True,
        eval_on_train_end: bool = True,
        prefix: str = "probe/",
        update_evaluation_summary: bool = True,
    ):
        if eval_steps < 1:
            raise ValueError(f"eval_steps must be >= 1, got {eval_steps}")
        self.thresholds = dict(thresholds or {})
        self.relative = relative
        self.trainer = trainer
        self.tokenizer = tokenizer
        self.eval_steps = eval_steps
        self.eval_on_train_begin = eval_on_train_begin
        self.eval_on_train_end = eval_on_train_end
        self.prefix = prefix
        self.update_evaluation_summary = update_evaluation_summary
        self.history: list[dict[str, Any]] = []
        self.baseline: dict[str, float] = {}
        self.stopped_at: int | None = None
        self._last_step: int | None = None
        self._warned = False

    def attach(self, trainer):
        """`trainer.add_callback(self)` and log through `trainer` from now on. Returns self."""
        self.trainer = trainer
        trainer.add_callback(self)
        return self

    def probe(self, model, tokenizer) -> dict[str, float]:
        """The metrics of `model` now (unprefixed keys), rank 0's on every rank."""
        return _broadcast_from_main(self.measure(extract_model_from_parallel(model), tokenizer))

    def _tokenizer(self, kwargs):
        if self.tokenizer is not None:
            return self.tokenizer
        pc = kwargs.get("processing_class")
        if pc is None and self.trainer is not None:
            pc = self.trainer.processing_class
        if pc is None:
            raise ValueError(f"{type(self).__name__}: no tokenizer (pass tokenizer= or give the trainer one)")
        return getattr(pc, "tokenizer", pc)

    def _run(self, state, control, kwargs, check_stop: bool) -> dict[str, float]:
        step = state.global_step
        metrics = self.probe(kwargs["model"], self._tokenizer(kwargs))
        missing = [k for k in self.thresholds if metrics.get(k) is None]
        if missing:  # every rank has the same (broadcast) metrics: every rank raises
            raise ValueError(f"{type(self).__name__}: no value for {missing} to threshold; the probe gives "
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
                    logger.warning("%s: %s %.4g < %.4g at step %d: stopping training",
                                   type(self).__name__, key, metrics[key], threshold, step)  # fmt: skip
        self._log(state, control, logs)
        return metrics

    def _log(self, state, control, logs: dict[str, float]) -> None:
        if self.trainer is None:
            if not self._warned:
                warnings.warn(
                    f"{type(self).__name__} has no trainer to log through: the probe numbers go to "
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


class UnlearningEvalCallback(PeriodicEvalCallback):
    """Probe forget / retain probability every `eval_steps` steps (`PeriodicEvalCallback`); optional early stop on
    lost utility. Logs ``probe/forget_probability``, ``probe/retain_probability``: mean `exp(-avg_nll)` of the
    ground-truth answers (TOFU's "Probability", `method.md` §4); with ``rouge=True`` also
    ``probe/forget_rougeL_recall``, ``probe/retain_rougeL_recall`` of greedy answers (slower).

    Args:
        forget_rows, retain_rows: small probe sets (tens of rows): TOFU-layout rows (``question``, ``answer``; extra
            keys ignored; a `datasets.Dataset` with these columns works) or (question, answer) pairs. Either may be
            None, not both; early stopping on the retain probability needs `retain_rows`.
        rouge, max_new_tokens: also greedy-generate answers and log ROUGE-L recall (off by default: slower).
        prompt_format, batch_size, max_length: as in `score_answers`. Use the format the model is trained with
            (``"plain"`` for ``"Question: ...\\nAnswer:"`` prompt-completion data, ``"chat"`` for conversational data).
        min_retain_probability: the early-stop threshold of ``retain_probability`` (see `PeriodicEvalCallback`).
        relative, trainer, tokenizer, eval_steps, eval_on_train_begin, eval_on_train_end, prefix,
        update_evaluation_summary: as `PeriodicEvalCallback`'s.
    """

    def __init__(
        self,
        forget_rows: Iterable | None = None,
        retain_rows: Iterable | None = None,
        *,
        rouge: bool = False,
        max_new_tokens: int = 64,
        prompt_format: str | PromptFormat = "auto",
        batch_size: int = 16,
        max_length: int = 512,
        min_retain_probability: float | None = None,
        **schedule,
    ):
        self.forget = qa_pairs(forget_rows, "forget probe") if forget_rows is not None else []
        self.retain = qa_pairs(retain_rows, "retain probe") if retain_rows is not None else []
        if not self.forget and not self.retain:
            raise ValueError(
                "UnlearningEvalCallback needs forget_rows and/or retain_rows (for lm-eval tasks during "
                "training: LMEvalGuardCallback)"
            )
        thresholds = {}
        if min_retain_probability is not None:
            if not self.retain:
                raise ValueError("min_retain_probability (early stopping on utility) needs retain_rows")
            if min_retain_probability < 0:
                raise ValueError(f"min_retain_probability must be >= 0, got {min_retain_probability}")
            thresholds["retain_probability"] = min_retain_probability
        super().__init__(thresholds=thresholds, **schedule)
        self.rouge = rouge
        self.max_new_tokens = max_new_tokens
        self.prompt_format = prompt_format
        self.batch_size = batch_size
        self.max_length = max_length

    @property
    def baseline_retain_probability(self) -> float | None:
        return self.baseline.get("retain_probability")

    @property
    def min_retain_probability(self) -> float | None:
        """The retain-probability threshold, as held in `thresholds` (what the early stop reads)."""
        return self.thresholds.get("retain_probability")

    def measure(self, model, tokenizer) -> dict[str, float]:
        """The probe metrics of `model` now; the model's train / eval mode is left as it was."""
        with eval_mode(model):
            metrics, _ = probe_metrics(
                model,
                tokenizer,
                self.forget,
                self.retain,
                prompt_format=self.prompt_format,
                batch_size=self.batch_size,
                max_length=self.max_length,
                rouge=self.rouge,
                max_new_tokens=self.max_new_tokens,
            )
        return metrics
