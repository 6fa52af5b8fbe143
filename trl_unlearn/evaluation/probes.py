"""Quick forget / retain probes: QA rows in, probability (and ROUGE-L) out. Used by the relearning attack and by
`UnlearningEvalCallback` during training."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

import trl_unlearn.evaluation.metrics as M

from ..data.formats import PromptFormat
from .scoring import generate_answers, score_answers


def qa_pairs(rows, what: str) -> list[tuple[str, str]]:
    """(question, answer) pairs from rows: mappings with ``question`` and ``answer`` keys (TOFU layout; extra keys
    are ignored; a `datasets.Dataset` with those columns works too) or 2-tuples of strings."""
    if rows is None:
        raise ValueError(f"no {what} rows given")
    pairs = []
    for i, r in enumerate(rows):
        if isinstance(r, Mapping):
            if "question" not in r or "answer" not in r:
                raise ValueError(
                    f"{what} row {i} has keys {sorted(r)}; rows need 'question' and 'answer' keys (TOFU layout) or "
                    "must be (question, answer) pairs"
                )
            q, a = r["question"], r["answer"]
        elif isinstance(r, (tuple, list)) and len(r) == 2:
            q, a = r
        else:
            raise ValueError(
                f"{what} row {i}: expected a mapping with 'question'/'answer' or a (question, answer) "
                f"pair, got {type(r).__name__}"
            )
        if not isinstance(q, str) or not isinstance(a, str):
            raise ValueError(f"{what} row {i}: question and answer must be strings")
        pairs.append((q, a))
    if not pairs:
        raise ValueError(f"the {what} rows are empty")
    return pairs


def probe_metrics(
    model,
    tokenizer,
    forget: Sequence[tuple[str, str]] = (),
    retain: Sequence[tuple[str, str]] = (),
    *,
    prompt_format: str | PromptFormat = "auto",
    batch_size: int = 16,
    max_length: int = 512,
    rouge: bool = False,
    max_new_tokens: int = 200,
    generation_batch_size: int | None = None,
    rouge_use_stemmer: bool = True,
    progress: bool | None = False,
) -> tuple[dict[str, float], np.ndarray]:
    """Forget / retain probability (mean of `exp(-avg_nll)` of the ground-truth answers, TOFU's definition) from one
    batched `score_answers` call over both sets, and, with `rouge`, ROUGE-L recall of greedy answers
    (`generate_answers`, one batched call). Returns (metrics, per-item forget probabilities). Keys:
    ``forget_probability``, ``retain_probability``, ``forget_rougeL_recall``, ``retain_rougeL_recall`` (only those
    of the sets given)."""
    pairs = [*forget, *retain]
    if not pairs:
        raise ValueError("nothing to probe: give forget and/or retain rows")
    names = [f"forget row {i}" for i in range(len(forget))] + [f"retain row {i}" for i in range(len(retain))]
    res = score_answers(
        model,
        tokenizer,
        [q for q, _ in pairs],
        [a for _, a in pairs],
        prompt_format=prompt_format,
        batch_size=batch_size,
        max_length=max_length,
        names=names,
        progress=progress,
    )
    prob = M.probability(res.avg_nll)
    out: dict[str, float] = {}
    if forget:
        out["forget_probability"] = float(prob[: len(forget)].mean())
    if retain:
        out["retain_probability"] = float(prob[len(forget) :].mean())
    if rouge:
        gens = generate_answers(
            model,
            tokenizer,
            [q for q, _ in pairs],
            max_new_tokens=max_new_tokens,
            batch_size=generation_batch_size or batch_size,
            prompt_format=prompt_format,
            progress=progress,
        )
        recall = [M.rouge_l_recall(g, a, rouge_use_stemmer) for g, (_, a) in zip(gens, pairs)]
        if forget:
            out["forget_rougeL_recall"] = float(np.mean(recall[: len(forget)]))
        if retain:
            out["retain_rougeL_recall"] = float(np.mean(recall[len(forget) :]))
    return out, prob[: len(forget)]
