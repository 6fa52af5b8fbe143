"""Relearning attack (`method.md` §6): how quickly does forgotten knowledge come back?

`relearning_attack` fine-tunes a COPY of an unlearned model with plain NLL on a small, seeded random subset of the
forget set, and re-evaluates the WHOLE forget set before training (step 0) and every `eval_every` steps. A robust
unlearning method keeps its forget metrics near the retain model's for longer. Three parts:

- `RelearnConfig`: the attack's settings (which rows, how long, the optimizer, the prompt format, evaluation sizes);
- `relearn_loop(model, tokenizer, pairs, config, evaluate)`: the training loop on a copy, calling `evaluate(copy)` at
  the checkpoints;
- `relearn_evaluator(...)`: what is scored at each checkpoint (TOFU, the QA probe, or a user function);

and `relearning_attack`, which puts them together and returns a `RelearnCurve` (`relearn_curve.py`).

Why a minimal training loop and not `SFTTrainer`: the loop encodes every (question, answer) pair with the same
`PromptFormat` the scorer uses (`prompt_ids + answer_ids + EOS`, the loss on the answer tokens and the EOS), so the
NLL the attack lowers is exactly the one `score_answers` measures, whatever the prompt format (plain or chat
template); it needs no output folder, writes no checkpoint, leaves Accelerate's global state and the caller's RNG
alone, and evaluates in-loop at exact steps. The LM head is applied to the scored positions only
(`trl_unlearn.modeling.forward_logps`), so no `(B, T, V)` logits tensor is built.

Command line: `trl-unlearn relearn --help` (`cli/relearn.py`).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from accelerate.utils import is_peft_model
from tqdm.auto import tqdm

import trl_unlearn.evaluation.metrics as M

from ..data.formats import PromptFormat, resolve_prompt_format
from ..data.tokenize import encode_pairs, pad_batch
from ..modeling import forward_logps
from .probes import probe_metrics, qa_pairs
from .relearn_curve import RelearnCurve
from .report import EvalReport, package_version
from .scoring import eval_mode, model_device, pad_id

__all__ = ["RelearnConfig", "relearn_evaluator", "relearn_loop", "relearning_attack", "select_relearn_indices"]

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------------------ rows


def select_relearn_indices(num_rows: int, fraction: float, seed: int = 0) -> list[int]:
    """The forget rows the attack relearns: ``k = max(1, round_half_up(fraction * num_rows))`` distinct indices drawn
    with `random.Random(seed)` (the same on every platform and Python version), sorted."""
    if num_rows < 1:
        raise ValueError(f"num_rows must be >= 1, got {num_rows}")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    k = min(num_rows, max(1, math.floor(fraction * num_rows + 0.5)))
    return sorted(random.Random(seed).sample(range(num_rows), k))


@dataclass
class RelearnConfig:
    """Settings of a relearning attack.

    Rows: `indices` (positions in the forget rows; default `select_relearn_indices(n, fraction, seed)`).
    Training: `steps` optimizer steps (default `ceil(epochs * batches per epoch)`) of AdamW (`learning_rate`
    constant, `weight_decay`, gradients clipped to `max_grad_norm`; None or 0: no clipping) on plain token-mean NLL of
    the answer tokens (and EOS) given the question, in `prompt_format` (as `score_answers` scores them), batches of
    `batch_size` rows, epochs over the subset in seeded random orders; `gradient_checkpointing` for large models.
    Evaluation at step 0, every `eval_every` steps (default `max(1, steps // 5)`) and at the last step: sizes
    `eval_batch_size`, `max_length`, `max_new_tokens`; `rouge=False` skips the probe's greedy answers.
    """

    fraction: float = 0.1
    indices: Sequence[int] | None = None
    steps: int | None = None
    epochs: float = 5.0
    eval_every: int | None = None
    learning_rate: float = 1e-5
    batch_size: int = 8
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    seed: int = 0
    prompt_format: str | PromptFormat = "auto"
    max_length: int = 512
    max_new_tokens: int = 200
    eval_batch_size: int = 16
    rouge: bool = True
    gradient_checkpointing: bool = False
    progress: bool | None = None

    def resolved(self, num_rows: int) -> RelearnConfig:
        """A copy with `indices`, `fraction`, `steps` and `eval_every` filled in for `num_rows` forget rows; checks
        every value."""
        if self.indices is None:
            indices = select_relearn_indices(num_rows, self.fraction, self.seed)
            fraction = self.fraction
        else:
            indices = sorted({int(i) for i in self.indices})
            if not indices or indices[0] < 0 or indices[-1] >= num_rows:
                raise ValueError(f"indices must be a non-empty set of positions in [0, {num_rows})")
            fraction = len(indices) / num_rows
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.learning_rate < 0:
            raise ValueError(f"learning_rate must be >= 0, got {self.learning_rate}")
        steps = self.steps
        if steps is None:
            if self.epochs <= 0:
                raise ValueError(f"epochs must be > 0, got {self.epochs}")
            steps = max(1, math.ceil(self.epochs * math.ceil(len(indices) / self.batch_size)))
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        eval_every = max(1, steps // 5) if self.eval_every is None else self.eval_every
        if eval_every < 1:
            raise ValueError(f"eval_every must be >= 1, got {eval_every}")
        return dataclasses.replace(self, indices=indices, fraction=fraction, steps=steps, eval_every=eval_every)


# ------------------------------------------------------------------------------------------------------ evaluation


def _split_means(values: np.ndarray, indices: Sequence[int]) -> dict[str, float]:
    """Mean forget probability on the relearned rows and on the others (when there are any)."""
    chosen = np.zeros(len(values), dtype=bool)
    chosen[list(indices)] = True
    out = {"forget_probability_relearned": float(values[chosen].mean())}
    if (~chosen).any():
        out["forget_probability_unseen"] = float(values[~chosen].mean())
    return out


def relearn_evaluator(
    tokenizer,
    pairs: Sequence[tuple[str, str]],
    config: RelearnConfig,
    *,
    fmt: PromptFormat,
    data_dir=None,
    split=None,
    retain_report=None,
    retain_pairs: Sequence[tuple[str, str]] = (),
    evaluate: Callable[[Any], Mapping[str, Any]] | None = None,
    model_path: str | None = None,
) -> tuple[str, Callable[[Any], dict[str, Any]]]:
    """`(kind, evaluate(model) -> metrics)` for the checkpoints of an attack on `pairs` with `config` (resolved):

    * `evaluate` given (kind "custom"): only that.
    * `data_dir` and `split` (kind "tofu"): `evaluate_tofu` (all its metrics; forget quality with `retain_report`),
      plus `forget_probability_relearned` / `forget_probability_unseen` when the relearned rows are in the TOFU
      forget set.
    * otherwise (kind "probe"): `forget_probability` of the whole forget set, its relearned / unseen split,
      `forget_rougeL_recall` of greedy answers (unless `config.rouge` is False), and `retain_probability` (and
      `retain_rougeL_recall`) when `retain_pairs` are given.
    """
    subset = [pairs[i] for i in config.indices]
    sizes = dict(
        batch_size=config.eval_batch_size,
        max_length=config.max_length,
        max_new_tokens=config.max_new_tokens,
        progress=config.progress,
    )
    if evaluate is not None:
        return "custom", lambda m: dict(evaluate(m))
    if data_dir is not None:
        from .tofu import evaluate_tofu, load_tofu_eval_sets

        tofu_forget = qa_pairs(load_tofu_eval_sets(data_dir, split)["forget"][0], "TOFU forget")
        where = {}
        for j, p in enumerate(tofu_forget):
            where.setdefault(p, j)
        positions = [where[p] for p in subset] if all(p in where for p in subset) else None

        def tofu(m):
            report = evaluate_tofu(
                m,
                tokenizer,
                data_dir,
                split,
                retain_report=retain_report,
                prompt_format=fmt,
                model_path=model_path,
                **sizes,
            )
            out = dict(report.metrics)
            if positions is not None:
                out.update(_split_means(M.probability(report.per_item["forget"]["avg_nll_answer"]), positions))
            return out

        return "tofu", tofu

    def probe(m):
        out, forget_prob = probe_metrics(
            m, tokenizer, pairs, retain_pairs, prompt_format=fmt, rouge=config.rouge, **sizes
        )
        out.update(_split_means(forget_prob, config.indices))
        return out

    return "probe", probe


# ---------------------------------------------------------------------------------------------------- the attack


def _attack_copy(model):
    """A trainable copy of `model`: PEFT adapters merged into the weights (the attacker fine-tunes the full model),
    every floating-point parameter trainable, no gradients carried over."""
    attacked = copy.deepcopy(model)
    if is_peft_model(attacked):
        attacked = attacked.merge_and_unload()
    for p in attacked.parameters():
        p.grad = None
        if p.is_floating_point():
            p.requires_grad_(True)
    return attacked


def _batch_schedule(num_rows: int, batch_size: int, steps: int, rng: random.Random) -> list[list[int]]:
    """`steps` batches: epochs over the rows, each in a fresh seeded order, cut into `batch_size` chunks (the last
    chunk of an epoch may be smaller)."""
    out: list[list[int]] = []
    while len(out) < steps:
        order = list(range(num_rows))
        rng.shuffle(order)
        out.extend(order[i : i + batch_size] for i in range(0, num_rows, batch_size))
    return out[:steps]


def _checkpoints(steps: int, eval_every: int) -> list[int]:
    return sorted({0, steps, *range(eval_every, steps + 1, eval_every)})


def relearn_loop(
    model, tokenizer, pairs: Sequence[tuple[str, str]], config: RelearnConfig, evaluate: Callable[[Any], dict[str, Any]]
) -> tuple[list[int], list[dict], list[float]]:
    """Train a copy of `model` on the rows `config.indices` of `pairs` (`config` resolved) and call `evaluate` on
    the copy (in eval mode, no gradients) at the checkpoints. Returns `(steps evaluated, their metrics, the NLL of
    each step's batch)`. The caller's `model` and RNG state are left as they were; the copy is freed at the end."""
    fmt = resolve_prompt_format(tokenizer, config.prompt_format)
    subset = [pairs[i] for i in config.indices]
    sequences, starts = encode_pairs(
        tokenizer,
        fmt,
        [q for q, _ in subset],
        [a for _, a in subset],
        config.max_length,
        names=[f"forget row {i}" for i in range(len(subset))],
    )
    device = model_device(model)
    checkpoints = _checkpoints(config.steps, config.eval_every)
    steps_done: list[int] = []
    results: list[dict] = []
    losses: list[float] = []
    rng_devices = [device] if device.type == "cuda" else []
    attacked = _attack_copy(model)
    params: list = []
    optimizer = None
    try:
        with torch.random.fork_rng(devices=rng_devices):
            torch.manual_seed(config.seed)
            rng = random.Random(f"trl_unlearn.relearn:{config.seed}")
            schedule = _batch_schedule(len(sequences), config.batch_size, config.steps, rng)
            if config.gradient_checkpointing:
                enable = getattr(attacked, "activation_checkpointing_enable", None)  # transformers >= 5 name
                (enable or attacked.gradient_checkpointing_enable)()
                if hasattr(attacked.config, "use_cache"):
                    attacked.config.use_cache = False
            params = [p for p in attacked.parameters() if p.requires_grad]
            optimizer = (
                torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
                if config.steps
                else None
            )
            pad = pad_id(tokenizer)
            disable = None if config.progress is None else not config.progress
            with tqdm(total=config.steps, desc="relearning", disable=disable, leave=False) as bar:
                step = 0
                while True:
                    if step in checkpoints:
                        with eval_mode(attacked):
                            metrics = evaluate(attacked)
                        steps_done.append(step)
                        results.append(metrics)
                        logger.info("relearning step %d: %s", step, metrics)
                    if step == config.steps:
                        break
                    attacked.train()
                    batch = schedule[step]
                    ids, attn, labels = pad_batch(
                        [sequences[i] for i in batch], [starts[i] for i in batch], pad, model_device(attacked)
                    )
                    logps = forward_logps(attacked, ids, attention_mask=attn, labels=labels).token_logps
                    mask = labels[:, 1:] != -100
                    loss = -(logps * mask).sum() / mask.sum()
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if config.max_grad_norm is not None and config.max_grad_norm > 0:
                        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                    optimizer.step()
                    losses.append(float(loss.detach()))
                    step += 1
                    bar.update(1)
    finally:
        attacked = optimizer = params = None  # free the copy and the optimizer states before emptying the cache
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return steps_done, results, losses


def relearning_attack(
    model,
    tokenizer,
    forget_rows: Iterable | None = None,
    *,
    data_dir: str | os.PathLike | None = None,
    split: str | None = None,
    retain_report: EvalReport | str | os.PathLike | None = None,
    retain_rows: Iterable | None = None,
    evaluate: Callable[[Any], Mapping[str, Any]] | None = None,
    model_path: str | None = None,
    config: RelearnConfig | None = None,
    **settings,
) -> RelearnCurve:
    """Fine-tune a copy of `model` on a few forget rows and track the forget metrics of the whole forget set.

    The caller's `model` is never modified (a deep copy is trained; a PEFT model's adapters are merged into the
    copy's weights and the whole copy is trained). Needs memory for a second model plus AdamW states.

    Data: `forget_rows` are TOFU-layout rows (``question``, ``answer``; a `datasets.Dataset` with these columns
    works) or (question, answer) pairs. Without them, `data_dir` and `split` give TOFU's ``{split}_perturbed.json``
    rows. What is scored: `relearn_evaluator` (TOFU with `data_dir`/`split` and `retain_report`; the QA probe with
    `retain_rows`; or `evaluate(model) -> dict`). Settings: `config` (a `RelearnConfig`), or its fields as keyword
    arguments (`fraction=0.1, steps=20, learning_rate=1e-5, ...`).

    Returns a `RelearnCurve`.
    """
    if config is not None and settings:
        raise ValueError(f"give `config` or its fields as keyword arguments, not both (got {sorted(settings)})")
    unknown = sorted(set(settings) - {f.name for f in dataclasses.fields(RelearnConfig)})
    if unknown:
        raise TypeError(f"relearning_attack got unknown settings {unknown}: see `RelearnConfig` for the fields.")
    if (data_dir is None) != (split is None):
        raise ValueError("give both data_dir and split (TOFU evaluation), or neither")
    if retain_report is not None and data_dir is None:
        raise ValueError("retain_report needs data_dir and split (forget quality comes from evaluate_tofu)")
    if forget_rows is not None:
        pairs = qa_pairs(forget_rows, "forget")
    elif data_dir is not None:
        from .tofu import load_tofu_eval_sets

        pairs = qa_pairs(load_tofu_eval_sets(data_dir, split)["forget"][0], "TOFU forget")
    else:
        raise ValueError("give forget_rows, or data_dir and split to read the forget set from")
    retain_pairs = qa_pairs(retain_rows, "retain") if retain_rows is not None else []
    config = (config or RelearnConfig(**settings)).resolved(len(pairs))
    fmt = resolve_prompt_format(tokenizer, config.prompt_format)
    config = dataclasses.replace(config, prompt_format=fmt)
    kind, score = relearn_evaluator(
        tokenizer,
        pairs,
        config,
        fmt=fmt,
        data_dir=data_dir,
        split=split,
        retain_report=retain_report,
        retain_pairs=retain_pairs,
        evaluate=evaluate,
        model_path=model_path,
    )
    steps, metrics, losses = relearn_loop(model, tokenizer, pairs, config, score)
    settings = {
        "model": model_path if model_path is not None else getattr(model, "name_or_path", None) or None,
        "evaluation": kind,
        "data_dir": os.fspath(data_dir) if data_dir is not None else None,
        "split": split,
        "prompt_format": fmt.name,
        "answer_prefix": fmt.answer_prefix,
        "steps": config.steps,
        "eval_every": config.eval_every,
        "batch_size": config.batch_size,
        "optimizer": "adamw",
        "weight_decay": config.weight_decay,
        "max_grad_norm": config.max_grad_norm,
        "max_length": config.max_length,
        "max_new_tokens": config.max_new_tokens,
        "rouge": config.rouge if kind == "probe" else None,
        "retain_report": (
            os.fspath(retain_report)
            if isinstance(retain_report, (str, os.PathLike))
            else "in memory"
            if retain_report is not None
            else None
        ),
        "num_retain_rows": len(retain_pairs),
        "package_version": package_version(),
    }
    return RelearnCurve(
        steps=steps,
        metrics=metrics,
        fraction=config.fraction,
        learning_rate=config.learning_rate,
        seed=config.seed,
        indices=list(config.indices),
        num_forget_rows=len(pairs),
        train_loss=losses,
        settings=settings,
    )
