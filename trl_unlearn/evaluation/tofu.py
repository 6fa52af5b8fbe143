"""TOFU evaluation (Maini et al. 2024; metric definitions: `method.md` §4, docs/evaluation.md).

Four evaluation sets, read from a TOFU-layout folder of JSON-lines files (or from the Hub dataset
``locuslab/TOFU`` when `data_dir` is a dataset id and not a folder):

=============  ================================  ====================================================================
set            file                              keys used
=============  ================================  ====================================================================
forget         ``{split}_perturbed.json``         question, answer, paraphrased_answer, perturbed_answer (list)
retain         ``retain_perturbed.json``          question, answer, paraphrased_answer, perturbed_answer (list)
real_authors   ``real_authors_perturbed.json``    question, answer, perturbed_answer (list)
world_facts    ``world_facts_perturbed.json``     question, answer, perturbed_answer (list)
=============  ================================  ====================================================================

Every answer of every set (ground truth, paraphrase, each perturbed answer) is scored in one batched pass, and
every question gets one greedy generation, also batched.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

import trl_unlearn.evaluation.metrics as M

from ..data.formats import PromptFormat, resolve_prompt_format
from .report import AGGREGATES, EvalReport, check_same_settings, package_version
from .scoring import generate_answers, score_answers

__all__ = [
    "TOFU_SETS",
    "evaluate_tofu",
    "load_tofu_eval_sets",
    "score_tofu_sets",
    "tofu_aggregates",
    "tofu_files",
    "truth_ratios",
]

TOFU_SETS = ("forget", "retain", "real_authors", "world_facts")
# sets whose truth ratio uses a paraphrased answer (the others use the ground-truth answer)
_PARAPHRASED = ("forget", "retain")
# settings that must match between a run and the retain report it takes forget truth ratios from
RETAIN_REPORT_KEYS = ("benchmark", "split", "forget_fingerprint", "prompt_format", "max_length", "max_new_tokens",
                      "decoding")  # fmt: skip
UTILITY_SETS = ("retain", "real_authors", "world_facts")
UTILITY_MEASURES = ("probability", "rougeL_recall", "truth_ratio")


def tofu_files(split: str) -> dict[str, str]:
    """Set name -> file stem for a forget split (``"forget01"``, ``"forget05"``, ``"forget10"``, ...)."""
    return {
        "forget": f"{split}_perturbed",
        "retain": "retain_perturbed",
        "real_authors": "real_authors_perturbed",
        "world_facts": "world_facts_perturbed",
    }


def _read_stem(data_dir: str, stem: str) -> tuple[list[dict], str]:
    """Rows of one TOFU file and a name for it in error messages."""
    if os.path.isdir(data_dir):
        from ..data.files import load_tofu_split

        return load_tofu_split(data_dir, stem), os.path.join(data_dir, f"{stem}.json")
    if os.path.exists(data_dir) or data_dir.count("/") != 1:
        raise FileNotFoundError(f"TOFU data folder not found: {data_dir!r} (give a folder or a Hub dataset id)")
    from datasets import load_dataset  # a Hub dataset id such as "locuslab/TOFU"; needs network access

    ds = load_dataset(data_dir, stem, split="train")
    return [dict(r) for r in ds], f"{data_dir} (config {stem})"


def _validate(rows: list[dict], where: str, paraphrased: bool) -> None:
    if not rows:
        raise ValueError(f"{where}: no items")
    keys = ("question", "answer", "paraphrased_answer") if paraphrased else ("question", "answer")
    for i, row in enumerate(rows):
        for k in keys:
            if k not in row:
                raise ValueError(f"{where}: item {i} has no {k!r} key")
            if not isinstance(row[k], str):
                raise ValueError(f"{where}: item {i}: {k!r} must be a string, got {type(row[k]).__name__}")
        pert = row.get("perturbed_answer")
        if pert is None:
            raise ValueError(f"{where}: item {i} has no 'perturbed_answer' key")
        if isinstance(pert, str):
            pert = [pert]
        if not isinstance(pert, list) or not pert or not all(isinstance(p, str) for p in pert):
            raise ValueError(f"{where}: item {i}: 'perturbed_answer' must be a non-empty list of strings")
        row["perturbed_answer"] = pert


def load_tofu_eval_sets(data_dir: str | os.PathLike, split: str = "forget10") -> dict[str, tuple[list[dict], str]]:
    """Read and check the four evaluation sets: set name -> (rows, file name). A missing file, an empty file or an
    item without a needed key raises an error naming the file (and the item)."""
    data_dir = os.fspath(data_dir)
    out = {}
    for name, stem in tofu_files(split).items():
        rows, where = _read_stem(data_dir, stem)
        rows = [dict(r) for r in rows]
        _validate(rows, where, paraphrased=name in _PARAPHRASED)
        out[name] = (rows, where)
    return out


def _fingerprint(rows: Sequence[Mapping]) -> str:
    h = hashlib.sha256()
    for r in rows:
        fields = [r.get("question"), r.get("answer"), r.get("paraphrased_answer"), r.get("perturbed_answer")]
        h.update(json.dumps(fields, ensure_ascii=False).encode("utf-8"))
    return h.hexdigest()[:16]


# -------------------------------------------------------------------------------------------------- aggregation


def truth_ratios(cols: Mapping[str, list], set_name: str) -> np.ndarray:
    """Per-item truth ratios of one set's `score_tofu_sets` columns (paraphrased answer where the set has one)."""
    para = cols["avg_nll_paraphrased"] if set_name in _PARAPHRASED else cols["avg_nll_answer"]
    return M.truth_ratio(cols["avg_nll_perturbed"], para)


def tofu_aggregates(
    per_item: Mapping[str, Mapping[str, list]], reference: Mapping[str, Any], settings: Mapping[str, Any]
) -> dict[str, float | None]:
    """TOFU aggregates from per-item values (`EvalReport.per_item` layout): per set probability, ROUGE-L recall and
    truth ratio; model utility; forget quality when `reference` holds the retain model's forget truth ratios."""
    use_stemmer = settings.get("rouge_use_stemmer", True)
    out: dict[str, float | None] = {}
    for s in TOFU_SETS:
        cols = per_item[s]
        if s in _PARAPHRASED:
            prob = M.probability(cols["avg_nll_answer"])
        else:
            prob = M.normalized_probability(cols["avg_nll_answer"], cols["avg_nll_perturbed"])
        rouge = [M.rouge_l_recall(g, a, use_stemmer) for g, a in zip(cols["generation"], cols["answer"])]
        ratios = truth_ratios(cols, s)
        out[f"{s}_probability"] = float(np.mean(prob))
        out[f"{s}_rougeL_recall"] = float(np.mean(rouge))
        out[f"{s}_truth_ratio"] = M.truth_ratio_forget_score(ratios) if s == "forget" else M.truth_ratio_score(ratios)
    out["model_utility"] = M.model_utility([out[f"{s}_{m}"] for s in UTILITY_SETS for m in UTILITY_MEASURES])
    retain_ratios = reference.get("retain_forget_truth_ratio")
    out["forget_quality"] = (
        M.forget_quality(truth_ratios(per_item["forget"], "forget"), retain_ratios) if retain_ratios else None
    )
    return out


# --------------------------------------------------------------------------------------------------- evaluation


def score_tofu_sets(
    model,
    tokenizer,
    sets,
    set_names=None,
    *,
    prompt_format="auto",
    batch_size=16,
    max_length=512,
    group_by_length=True,
    progress=None,
):
    """TOFU's likelihood columns without generation: every answer of every item of `set_names` (default: all of
    `sets`, as `load_tofu_eval_sets` returns them) scored in one batched call. Returns set -> per-item columns
    ``avg_nll_answer``, ``num_tokens_answer``, ``avg_nll_perturbed`` (a list per item) and, for the paraphrased
    sets, ``avg_nll_paraphrased``: the columns `evaluate_tofu` reports, which `truth_ratios` turns into ratios."""
    set_names = tuple(sets) if set_names is None else tuple(set_names)
    if not isinstance(prompt_format, PromptFormat):
        prompt_format = resolve_prompt_format(tokenizer, prompt_format)
    questions, answers, names, slots = [], [], [], []
    for s in set_names:
        rows, where = sets[s]
        for i, r in enumerate(rows):
            kinds = [("answer", r["answer"])]
            if s in _PARAPHRASED:
                kinds.append(("paraphrased", r["paraphrased_answer"]))
            kinds += [(f"perturbed[{k}]", p) for k, p in enumerate(r["perturbed_answer"])]
            for kind, text in kinds:
                questions.append(r["question"])
                answers.append(text)
                names.append(f"{where} item {i} ({kind})")
                slots.append((s, i, kind))
    res = score_answers(
        model,
        tokenizer,
        questions,
        answers,
        prompt_format=prompt_format,
        batch_size=batch_size,
        max_length=max_length,
        names=names,
        group_by_length=group_by_length,
        progress=progress,
    )
    cols = {}
    for s in set_names:
        rows, _ = sets[s]
        cols[s] = {
            "avg_nll_answer": [0.0] * len(rows),
            "num_tokens_answer": [0] * len(rows),
            "avg_nll_perturbed": [[0.0] * len(r["perturbed_answer"]) for r in rows],
        }
        if s in _PARAPHRASED:
            cols[s]["avg_nll_paraphrased"] = [0.0] * len(rows)
    for (s, i, kind), nll, n in zip(slots, res.avg_nll.tolist(), res.num_tokens.tolist()):
        c = cols[s]
        if kind == "answer":
            c["avg_nll_answer"][i] = nll
            c["num_tokens_answer"][i] = n
        elif kind == "paraphrased":
            c["avg_nll_paraphrased"][i] = nll
        else:
            c["avg_nll_perturbed"][i][int(kind[len("perturbed[") : -1])] = nll
    return cols


def _settings(model, data_dir, split, fmt, max_length, max_new_tokens, rouge_use_stemmer, model_path):
    return {
        "benchmark": "tofu",
        "model": model_path if model_path is not None else getattr(model, "name_or_path", None) or None,
        "data_dir": os.fspath(data_dir),
        "split": split,
        "prompt_format": fmt.name,
        "answer_prefix": fmt.answer_prefix,
        "max_length": max_length,
        "max_new_tokens": max_new_tokens,
        "decoding": "greedy",
        "rouge_use_stemmer": rouge_use_stemmer,
        "package_version": package_version(),
    }


def evaluate_tofu(
    model,
    tokenizer,
    data_dir: str | os.PathLike,
    split: str = "forget10",
    retain_report: EvalReport | str | os.PathLike | None = None,
    retain_model=None,
    *,
    retain_tokenizer=None,
    prompt_format: str = "auto",
    batch_size: int = 16,
    generation_batch_size: int | None = None,
    max_length: int = 512,
    max_new_tokens: int = 200,
    rouge_use_stemmer: bool = True,
    group_by_length: bool = True,
    progress: bool | None = None,
    model_path: str | None = None,
) -> EvalReport:
    """Evaluate `model` on TOFU's forget split `split` and the retain / Real Authors / World Facts sets.

    Forget quality needs the retain model's per-item forget truth ratios: give `retain_report` (an `EvalReport` or
    the path of one, made by this function for the retain model with the same split, data and settings, else
    `ValueError`) or `retain_model` (scored here with the same settings and `retain_tokenizer`, default
    `tokenizer`). Without either, forget quality is None. `batch_size` is for scoring, `generation_batch_size`
    (default `batch_size`) for generation; `group_by_length=False` keeps the file order (for timing baselines).
    """
    if retain_report is not None and retain_model is not None:
        raise ValueError("give retain_report or retain_model, not both")
    sets = load_tofu_eval_sets(data_dir, split)
    fmt = resolve_prompt_format(tokenizer, prompt_format)
    settings = _settings(model, data_dir, split, fmt, max_length, max_new_tokens, rouge_use_stemmer, model_path)
    settings["forget_fingerprint"] = _fingerprint(sets["forget"][0])
    settings["num_items"] = {s: len(sets[s][0]) for s in TOFU_SETS}

    # Refuse a mismatched retain report before spending any compute.
    reference: dict[str, Any] = {}
    if retain_report is not None:
        source = None
        if not isinstance(retain_report, EvalReport):
            source = os.fspath(retain_report)
            retain_report = EvalReport.load(source)
        check_same_settings(retain_report, settings, RETAIN_REPORT_KEYS, what="retain report")
        reference = {
            "source": source or f"retain report of {retain_report.settings.get('model')}",
            "model": retain_report.settings.get("model"),
            "retain_forget_truth_ratio": truth_ratios(retain_report.per_item["forget"], "forget").tolist(),
        }

    common = dict(prompt_format=fmt, max_length=max_length, group_by_length=group_by_length, progress=progress)
    cols = score_tofu_sets(model, tokenizer, sets, TOFU_SETS, batch_size=batch_size, **common)
    all_questions = [r["question"] for s in TOFU_SETS for r in sets[s][0]]
    generations = generate_answers(
        model,
        tokenizer,
        all_questions,
        max_new_tokens=max_new_tokens,
        batch_size=generation_batch_size or batch_size,
        prompt_format=fmt,
        group_by_length=group_by_length,
        progress=progress,
    )

    per_item: dict[str, dict[str, list]] = {}
    start = 0
    for s in TOFU_SETS:
        rows, _ = sets[s]
        gens = generations[start : start + len(rows)]
        start += len(rows)
        c = cols[s]
        per_item[s] = {
            "question": [r["question"] for r in rows],
            "answer": [r["answer"] for r in rows],
            "generation": gens,
            "rougeL_recall": [M.rouge_l_recall(g, r["answer"], rouge_use_stemmer) for g, r in zip(gens, rows)],
            **c,
            "truth_ratio": truth_ratios(c, s).tolist(),
        }

    if retain_model is not None:
        rcols = score_tofu_sets(
            retain_model, retain_tokenizer or tokenizer, sets, ("forget",), batch_size=batch_size, **common
        )
        reference = {
            "source": f"retain model {getattr(retain_model, 'name_or_path', '') or '(in memory)'}",
            "model": getattr(retain_model, "name_or_path", None) or None,
            "retain_forget_truth_ratio": truth_ratios(rcols["forget"], "forget").tolist(),
        }

    report = EvalReport(benchmark="tofu", metrics={}, per_item=per_item, settings=settings, reference=reference)
    report.metrics = tofu_aggregates(per_item, reference, settings)
    return report


AGGREGATES["tofu"] = tofu_aggregates
