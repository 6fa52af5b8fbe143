"""Relearning attack (`method.md` §6): how quickly does forgotten knowledge come back?

`relearning_attack` fine-tunes a COPY of an unlearned model with plain NLL on a small, seeded random subset of the
forget set, and re-evaluates the WHOLE forget set before training (step 0) and every `eval_every` steps. A robust
unlearning method keeps its forget metrics near the retain model's for longer. The result is a `RelearnCurve`
(steps, metrics per step, settings, the relearned rows), saved as JSON; `plot_relearn_curves` draws curves of several
methods on one figure (matplotlib, optional).

Why a minimal training loop and not `SFTTrainer`: the loop encodes every (question, answer) pair with the same
`PromptFormat` the scorer uses (`prompt_ids + answer_ids + EOS`, the loss on the answer tokens and the EOS), so the
NLL the attack lowers is exactly the one `score_answers` measures, whatever the prompt format (plain or chat
template); it needs no output folder, writes no checkpoint, leaves Accelerate's global state and the caller's RNG
alone, and evaluates in-loop at exact steps. The LM head is applied to the scored positions only
(`trl_unlearn.modeling.forward_logps`), so no `(B, T, V)` logits tensor is built.

Command line (append `register_relearn` to `trl_unlearn.cli.COMMAND_GROUPS`, or run this module):

    trl-unlearn relearn --model runs/simnpo --data_dir data/tofu --split forget10 --output relearn_simnpo.json \\
        [--retain_report retain90.json] [--fraction 0.1] [--steps 25] [--eval_every 5] [--learning_rate 1e-5]
"""

from __future__ import annotations

import copy
import logging
import math
import os
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
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
from .report import EvalReport, json_safe, load_json, package_version, save_json
from .scoring import _model_device, _pad_id, eval_mode

__all__ = [
    "RELEARN_FORMAT_VERSION",
    "RelearnCurve",
    "plot_relearn_curves",
    "relearning_attack",
    "select_relearn_indices",
]

logger = logging.getLogger(__name__)

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


# -------------------------------------------------------------------------------------------------------- the curve


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


# ------------------------------------------------------------------------------------------------------ evaluation


def _split_means(values: np.ndarray, indices: Sequence[int]) -> dict[str, float]:
    """Mean forget probability on the relearned rows and on the others (when there are any)."""
    chosen = np.zeros(len(values), dtype=bool)
    chosen[list(indices)] = True
    out = {"forget_probability_relearned": float(values[chosen].mean())}
    if (~chosen).any():
        out["forget_probability_unseen"] = float(values[~chosen].mean())
    return out


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


def relearning_attack(
    model,
    tokenizer,
    forget_rows: Iterable | None = None,
    *,
    data_dir: str | os.PathLike | None = None,
    split: str | None = None,
    retain_report: EvalReport | str | os.PathLike | None = None,
    retain_rows: Iterable | None = None,
    fraction: float = 0.1,
    indices: Sequence[int] | None = None,
    steps: int | None = None,
    epochs: float = 5.0,
    eval_every: int | None = None,
    learning_rate: float = 1e-5,
    batch_size: int = 8,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = 1.0,
    seed: int = 0,
    evaluate: Callable[[Any], Mapping[str, Any]] | None = None,
    rouge: bool = True,
    prompt_format: str | PromptFormat = "auto",
    max_length: int = 512,
    max_new_tokens: int = 200,
    eval_batch_size: int = 16,
    gradient_checkpointing: bool = False,
    progress: bool | None = None,
    model_path: str | None = None,
) -> RelearnCurve:
    """Fine-tune a copy of `model` on a few forget rows and track the forget metrics of the whole forget set.

    The caller's `model` is never modified (a deep copy is trained; a PEFT model's adapters are merged into the
    copy's weights and the whole copy is trained). Needs memory for a second model plus AdamW states.

    Data: `forget_rows` are TOFU-layout rows (``question``, ``answer``; a `datasets.Dataset` with these columns
    works) or (question, answer) pairs. Without them, `data_dir` and `split` give TOFU's ``{split}_perturbed.json``
    rows. The attack trains on ``indices`` (default: `select_relearn_indices(len(forget_rows), fraction, seed)`).

    Training: AdamW (`learning_rate` constant, `weight_decay`, gradients clipped to `max_grad_norm`), plain token-mean
    NLL of the answer tokens (and EOS) given the question, in `prompt_format` (as `score_answers` scores them),
    batches of `batch_size` rows, epochs over the subset in seeded random orders. `steps` optimizer steps (default
    ``ceil(epochs * batches per epoch)``); seeded, and the caller's RNG state is left as it was.

    Evaluation, at step 0 and every `eval_every` steps (default ``max(1, steps // 5)``) and at the last step, with
    the copy in eval mode and no gradients:

    * `evaluate` given: ``evaluate(model) -> dict``, only that.
    * `data_dir` and `split` given: `evaluate_tofu` (all its metrics; forget quality with `retain_report`), plus
      ``forget_probability_relearned`` / ``forget_probability_unseen`` (forget probability of the relearned rows and
      of the others) when the relearned rows are in the TOFU forget set.
    * otherwise: ``forget_probability`` of the whole forget set (`score_answers`), its relearned / unseen split,
      ``forget_rougeL_recall`` of greedy answers (`generate_answers`, `max_new_tokens`; `rouge=False` skips it), and
      ``retain_probability`` (and ``retain_rougeL_recall``) when `retain_rows` are given.

    Returns a `RelearnCurve`.
    """
    if (data_dir is None) != (split is None):
        raise ValueError("give both data_dir and split (TOFU evaluation), or neither")
    if retain_report is not None and data_dir is None:
        raise ValueError("retain_report needs data_dir and split (forget quality comes from evaluate_tofu)")
    tofu_forget = None
    if data_dir is not None:
        from .tofu import load_tofu_eval_sets

        tofu_forget = qa_pairs(load_tofu_eval_sets(data_dir, split)["forget"][0], "TOFU forget")
    pairs = qa_pairs(forget_rows, "forget") if forget_rows is not None else tofu_forget
    if pairs is None:
        raise ValueError("give forget_rows, or data_dir and split to read the forget set from")
    retain_pairs = qa_pairs(retain_rows, "retain") if retain_rows is not None else []
    n = len(pairs)
    if indices is None:
        indices = select_relearn_indices(n, fraction, seed)
    else:
        indices = sorted({int(i) for i in indices})
        if not indices or indices[0] < 0 or indices[-1] >= n:
            raise ValueError(f"indices must be a non-empty set of positions in [0, {n})")
        fraction = len(indices) / n
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if learning_rate < 0:
        raise ValueError(f"learning_rate must be >= 0, got {learning_rate}")
    if steps is None:
        if epochs <= 0:
            raise ValueError(f"epochs must be > 0, got {epochs}")
        steps = max(1, math.ceil(epochs * math.ceil(len(indices) / batch_size)))
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if eval_every is None:
        eval_every = max(1, steps // 5)
    if eval_every < 1:
        raise ValueError(f"eval_every must be >= 1, got {eval_every}")

    fmt = resolve_prompt_format(tokenizer, prompt_format)
    subset = [pairs[i] for i in indices]
    sequences, starts = encode_pairs(tokenizer, fmt, [q for q, _ in subset], [a for _, a in subset], max_length,
                                     names=[f"forget row {i}" for i in range(len(subset))])  # before copying
    if evaluate is not None:
        kind = "custom"
    elif data_dir is not None:
        kind = "tofu"
    else:
        kind = "probe"

    # positions of the relearned rows in the TOFU forget set, for the relearned / unseen split of a TOFU evaluation
    tofu_positions = None
    if kind == "tofu":
        where = {}
        for j, p in enumerate(tofu_forget):
            where.setdefault(p, j)
        if all(p in where for p in subset):
            tofu_positions = [where[p] for p in subset]

    def run_eval(m) -> dict[str, Any]:
        with eval_mode(m):
            if kind == "custom":
                return dict(evaluate(m))
            if kind == "tofu":
                from .tofu import evaluate_tofu

                report = evaluate_tofu(m, tokenizer, data_dir, split, retain_report=retain_report, prompt_format=fmt,
                                       batch_size=eval_batch_size, max_length=max_length,
                                       max_new_tokens=max_new_tokens, progress=progress, model_path=model_path)
                out = dict(report.metrics)
                if tofu_positions is not None:
                    prob = M.probability(report.per_item["forget"]["avg_nll_answer"])
                    out.update(_split_means(prob, tofu_positions))
                return out
            out, forget_prob = probe_metrics(
                m, tokenizer, pairs, retain_pairs, prompt_format=fmt, batch_size=eval_batch_size,
                max_length=max_length, rouge=rouge, max_new_tokens=max_new_tokens, progress=progress,
            )
            out.update(_split_means(forget_prob, indices))
            return out

    settings = {
        "model": model_path if model_path is not None else getattr(model, "name_or_path", None) or None,
        "evaluation": kind,
        "data_dir": os.fspath(data_dir) if data_dir is not None else None,
        "split": split,
        "prompt_format": fmt.name,
        "answer_prefix": fmt.answer_prefix,
        "steps": steps,
        "eval_every": eval_every,
        "batch_size": batch_size,
        "optimizer": "adamw",
        "weight_decay": weight_decay,
        "max_grad_norm": max_grad_norm,
        "max_length": max_length,
        "max_new_tokens": max_new_tokens,
        "rouge": rouge if kind == "probe" else None,
        "retain_report": (os.fspath(retain_report) if isinstance(retain_report, (str, os.PathLike))
                          else "in memory" if retain_report is not None else None),
        "num_retain_rows": len(retain_pairs),
        "package_version": package_version(),
    }

    device = _model_device(model)
    checkpoints = _checkpoints(steps, eval_every)
    steps_done: list[int] = []
    results: list[dict] = []
    losses: list[float] = []
    rng_devices = [device] if device.type == "cuda" else []
    attacked = _attack_copy(model)
    params: list = []
    optimizer = None
    try:
        with torch.random.fork_rng(devices=rng_devices):
            torch.manual_seed(seed)
            rng = random.Random(f"trl_unlearn.relearn:{seed}")
            schedule = _batch_schedule(len(sequences), batch_size, steps, rng)
            if gradient_checkpointing:
                enable = getattr(attacked, "activation_checkpointing_enable", None)  # transformers >= 5 name
                (enable or attacked.gradient_checkpointing_enable)()
                if hasattr(attacked.config, "use_cache"):
                    attacked.config.use_cache = False
            params = [p for p in attacked.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay) if steps else None
            pad = _pad_id(tokenizer)
            bar = tqdm(total=steps, desc="relearning", disable=None if progress is None else not progress, leave=False)
            with bar:
                step = 0
                while True:
                    if step in checkpoints:
                        metrics = run_eval(attacked)
                        steps_done.append(step)
                        results.append(metrics)
                        logger.info("relearning step %d: %s", step, metrics)
                    if step == steps:
                        break
                    attacked.train()
                    batch = schedule[step]
                    ids, attn, labels = pad_batch([sequences[i] for i in batch], [starts[i] for i in batch], pad,
                                                  _model_device(attacked))
                    logps = forward_logps(attacked, ids, attention_mask=attn, labels=labels).token_logps
                    mask = labels[:, 1:] != -100
                    loss = -(logps * mask).sum() / mask.sum()
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if max_grad_norm is not None and max_grad_norm > 0:
                        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                    optimizer.step()
                    losses.append(float(loss.detach()))
                    step += 1
                    bar.update(1)
    finally:
        attacked = optimizer = params = None  # free the copy and the optimizer states before emptying the cache
        if device.type == "cuda":
            torch.cuda.empty_cache()

    return RelearnCurve(
        steps=steps_done,
        metrics=results,
        fraction=fraction,
        learning_rate=learning_rate,
        seed=seed,
        indices=list(indices),
        num_forget_rows=n,
        train_loss=losses,
        settings=settings,
    )
