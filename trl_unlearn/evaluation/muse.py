"""MUSE evaluation (Shi et al. 2024, swj0419/muse_bench; metric definitions: `method.md` §5, docs/evaluation.md).

Accepted layout (`data_dir`, the layout of muse_bench's ``data/<corpus>/`` folders). Each file is either one JSON
array or JSON lines:

=================================  ===================================================================
file                               content
=================================  ===================================================================
``verbmem/forget.json``            objects with ``prompt`` (a forget-text prefix) and ``gt`` (its true
                                   continuation)
``knowmem/forget_qa.json``         objects with ``question`` and ``answer`` (about the forget set)
``knowmem/retain_qa.json``         objects with ``question`` and ``answer`` (about the retain set)
``knowmem/forget_qa_icl.json``     optional few-shot examples (``question``, ``answer``) for forget_qa
``knowmem/retain_qa_icl.json``     optional few-shot examples for retain_qa
``privleak/forget.json``           texts seen in training and unlearned (strings, or objects with ``text``)
``privleak/holdout.json``          texts never seen (same form)
``privleak/retain.json``           optional: texts seen and kept (same form)
=================================  ===================================================================

Metrics: VerbMem (greedy continuation, ROUGE-L F1 x 100 against the reference cut to the same number of tokens),
KnowMem on forget and retain QA (few-shot "Question: ... Answer: ..." prompts, greedy, ROUGE-L F1 x 100),
membership AUCs (LOSS, zlib, Min-K%, Min-K%++) and PrivLeak from Min-K% Prob (k = 0.4). Every convention that
changes a number on the same inputs follows muse_bench's metrics/{verbmem,knowmem,privleak}.py under the
transformers 4.40 it pins (docs/evaluation.md, "Parity with muse_bench").
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

import trl_unlearn.evaluation.metrics as M

from .report import AGGREGATES, EvalReport, check_same_settings, package_version
from .scoring import generate_answers, score_texts

__all__ = ["MUSE_PARTS", "KNOWMEM_STOP", "evaluate_muse", "knowmem_prompt", "load_muse_file", "muse_aggregates"]

MUSE_PARTS = ("verbmem", "knowmem", "privleak")
# muse_bench cuts a KnowMem answer before the first of each of these, in this order
KNOWMEM_STOP = ("\n\n", "\nQuestion", "Question:")
# transformers 4.40's `clean_up_tokenization`, which muse_bench's decode(clean_up_tokenization_spaces=True) applies
# to every tokenizer; transformers >= 5 skips it for BPE tokenizers (Llama's among them), so it is done here
_CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
             (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))  # fmt: skip
# settings that must match between a run and the retrained model's report it takes the AUC from
RETRAIN_REPORT_KEYS = ("benchmark", "privleak_fingerprint", "max_length", "min_k")
# membership attacks: per-item column -> does a higher score mean "member"?
ATTACKS = {"loss": False, "zlib": False, "min_k": True, "min_k_plus_plus": True}


def load_muse_file(path: str | os.PathLike, kind: str) -> list:
    """Read one MUSE file (JSON array or JSON lines) and check it: `kind` is ``"qa"`` (question/answer objects),
    ``"verbmem"`` (prompt/gt objects) or ``"text"`` (strings or objects with ``text``; returns strings)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"MUSE file not found: {path!r}")
    with open(path, encoding="utf-8") as f:
        raw = f.read()
    try:
        if raw.lstrip().startswith("["):
            rows = json.loads(raw)
        else:
            rows = [json.loads(line) for line in raw.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON (an array or JSON lines): {e}") from e
    if not rows:
        raise ValueError(f"{path}: no items")
    keys = {"qa": ("question", "answer"), "verbmem": ("prompt", "gt"), "text": ()}[kind]
    out = []
    for i, r in enumerate(rows):
        if kind == "text":
            if isinstance(r, dict):
                if "text" not in r:
                    raise ValueError(f"{path}: item {i} has no 'text' key")
                r = r["text"]
            if not isinstance(r, str):
                raise ValueError(f"{path}: item {i} must be a string or an object with 'text'")
            out.append(r)
            continue
        if not isinstance(r, dict):
            raise ValueError(f"{path}: item {i} must be an object with keys {', '.join(keys)}")
        for k in keys:
            if k not in r:
                raise ValueError(f"{path}: item {i} has no {k!r} key")
            if not isinstance(r[k], str):
                raise ValueError(f"{path}: item {i}: {k!r} must be a string")
        out.append({k: r[k] for k in keys})
    return out


def knowmem_prompt(question: str, shots: Sequence[Mapping[str, str]] = ()) -> str:
    """muse_bench's few-shot prompt: each shot as ``"Question: {q}\\nAnswer: {a}\\n\\n"``, then
    ``"Question: {question}\\nAnswer: "`` (with the trailing space)."""
    head = "".join(f"Question: {s['question']}\nAnswer: {s['answer']}\n\n" for s in shots)
    return f"{head}Question: {question}\nAnswer: "


def _clean_up(text: str) -> str:
    for a, b in _CLEAN_UP:
        text = text.replace(a, b)
    return text


def _knowmem_answer(text: str) -> str:
    """A decoded KnowMem generation as muse_bench keeps it: cleaned up, cut before each stop string in turn,
    not stripped."""
    text = _clean_up(text)
    for stop in KNOWMEM_STOP:
        text = text.split(stop, 1)[0]
    return text


def _verbmem_reference(tokenizer, gt: str, max_new_tokens: int) -> str:
    """The true continuation tokenised WITH the tokenizer's special tokens, cut to `max_new_tokens` ids, decoded
    without them (muse_bench: one text token fewer when the tokenizer adds BOS)."""
    ids = tokenizer(gt, add_special_tokens=True)["input_ids"][:max_new_tokens]
    return _clean_up(tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False))


@contextmanager
def _raw_decoding(tokenizer):
    """`generate_answers` decodes with the tokenizer's own clean-up setting: off here, `_clean_up` runs once."""
    old = getattr(tokenizer, "clean_up_tokenization_spaces", None)
    tokenizer.clean_up_tokenization_spaces = False
    try:
        yield
    finally:
        tokenizer.clean_up_tokenization_spaces = old


def _fingerprint(items) -> str:
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode("utf-8")).hexdigest()[:16]


def muse_aggregates(
    per_item: Mapping[str, Mapping[str, list]], reference: Mapping[str, Any], settings: Mapping[str, Any]
) -> dict[str, float | None]:
    """MUSE aggregates from per-item values (`EvalReport.per_item` layout); PrivLeak when `reference` holds
    ``auc_retrain``."""
    use_stemmer = settings.get("rouge_use_stemmer", False)
    out: dict[str, float | None] = {}
    for name in ("verbmem_forget", "knowmem_forget", "knowmem_retain"):
        if name in per_item:
            cols = per_item[name]
            f1 = [M.rouge_l_f1(g, r, use_stemmer) for g, r in zip(cols["generation"], cols["reference"])]
            out[name] = float(np.mean(f1)) * 100.0
    if "privleak_forget" in per_item:
        forget, holdout = per_item["privleak_forget"], per_item["privleak_holdout"]
        for attack, higher in ATTACKS.items():
            if attack in forget:
                out[f"mia_auc_{attack}"] = M.membership_auc(forget[attack], holdout[attack], higher_is_member=higher)
        if "privleak_retain" in per_item:
            out["mia_auc_min_k_retain"] = M.membership_auc(per_item["privleak_retain"]["min_k"], holdout["min_k"])
        auc = M.muse_privleak_auc(forget["min_k"], holdout["min_k"])
        out["privleak_auc"] = auc
        auc_retrain = reference.get("auc_retrain")
        out["privleak"] = M.privleak(auc, auc_retrain) if auc_retrain is not None else None
    return out


def _membership_columns(res, texts: Sequence[str], k: float) -> dict[str, list]:
    n = len(texts)
    cols = {
        "num_tokens": res.num_tokens.tolist(),
        "loss": M.loss_score(res.avg_nll).tolist(),
        "zlib": M.zlib_score(res.avg_nll, texts).tolist(),
        "min_k": [M.min_k_prob(res.token_logps[i], k) for i in range(n)],
    }
    if res.token_mu is not None:
        cols["min_k_plus_plus"] = [
            M.min_k_plus_plus(res.token_logps[i], res.token_mu[i], res.token_sigma[i], k) for i in range(n)
        ]
    return cols


def evaluate_muse(
    model,
    tokenizer,
    data_dir: str | os.PathLike,
    *,
    parts: Sequence[str] = MUSE_PARTS,
    auc_retrain: float | None = None,
    retrain_report: EvalReport | str | os.PathLike | None = None,
    batch_size: int = 8,
    generation_batch_size: int | None = None,
    max_length: int | None = None,
    verbmem_max_new_tokens: int = 128,
    knowmem_max_new_tokens: int = 32,
    knowmem_shots: int | None = None,
    min_k: float = 0.4,
    min_k_plus_plus: bool = True,
    rouge_use_stemmer: bool = False,
    progress: bool | None = None,
    model_path: str | None = None,
) -> EvalReport:
    """Evaluate `model` on a MUSE-layout folder (module docstring). `parts` picks any of verbmem, knowmem, privleak.

    PrivLeak needs the retrained model's `forget_holdout` Min-K% AUC: `auc_retrain` (a number, e.g. muse_bench's
    published value) or `retrain_report` (an `EvalReport` or its path, made by this function for the retrained
    model on the same privleak data with the same `max_length` and `min_k`, else `ValueError`); without either,
    PrivLeak is None and the AUCs are still reported. `knowmem_shots` caps the number of few-shot examples taken
    from the ``*_qa_icl.json`` files (default all; none when the files are absent). `max_length` cuts PrivLeak
    texts to their first `max_length` tokens (default None: whole texts, as muse_bench). ROUGE uses no stemmer by
    default, as muse_bench does. Prompts are raw text (no chat template). `generation_batch_size=1` decodes one
    prompt at a time without padding, as muse_bench does (larger batches are left-padded).
    """
    unknown = set(parts) - set(MUSE_PARTS)
    if unknown or not parts:
        raise ValueError(f"parts must be a non-empty subset of {MUSE_PARTS}, got {list(parts)}")
    if auc_retrain is not None and retrain_report is not None:
        raise ValueError("give auc_retrain or retrain_report, not both")
    data_dir = os.fspath(data_dir)
    settings: dict[str, Any] = {
        "benchmark": "muse",
        "model": model_path if model_path is not None else getattr(model, "name_or_path", None) or None,
        "data_dir": data_dir,
        "parts": list(parts),
        "prompt_format": "raw (verbmem prefix; knowmem few-shot 'Question: ...\\nAnswer: ')",
        "knowmem_stop": list(KNOWMEM_STOP),
        "max_length": max_length,
        "verbmem_max_new_tokens": verbmem_max_new_tokens,
        "knowmem_max_new_tokens": knowmem_max_new_tokens,
        "decoding": "greedy",
        "min_k": min_k,
        "rouge_use_stemmer": rouge_use_stemmer,
        "package_version": package_version(),
    }

    def p(*names: str) -> str:
        return os.path.join(data_dir, *names)

    # Read every file first: a missing or malformed one fails before any compute.
    data: dict[str, Any] = {}
    if "verbmem" in parts:
        data["verbmem"] = load_muse_file(p("verbmem", "forget.json"), "verbmem")
    if "knowmem" in parts:
        for which in ("forget", "retain"):
            data[f"knowmem_{which}"] = load_muse_file(p("knowmem", f"{which}_qa.json"), "qa")
            icl_path = p("knowmem", f"{which}_qa_icl.json")
            shots = load_muse_file(icl_path, "qa") if os.path.isfile(icl_path) else []
            data[f"knowmem_{which}_icl"] = shots[:knowmem_shots] if knowmem_shots is not None else shots
        settings["knowmem_shots"] = {w: len(data[f"knowmem_{w}_icl"]) for w in ("forget", "retain")}
    if "privleak" in parts:
        for which in ("forget", "holdout"):
            data[f"privleak_{which}"] = load_muse_file(p("privleak", f"{which}.json"), "text")
        if os.path.isfile(p("privleak", "retain.json")):
            data["privleak_retain"] = load_muse_file(p("privleak", "retain.json"), "text")
        settings["privleak_fingerprint"] = _fingerprint([data["privleak_forget"], data["privleak_holdout"]])

    reference: dict[str, Any] = {}
    if auc_retrain is not None:
        reference = {"source": "given AUC", "auc_retrain": float(auc_retrain)}
    elif retrain_report is not None:
        source = None
        if not isinstance(retrain_report, EvalReport):
            source = os.fspath(retrain_report)
            retrain_report = EvalReport.load(source)
        check_same_settings(retrain_report, settings, RETRAIN_REPORT_KEYS, what="retrained model's report")
        auc = retrain_report.metrics.get("privleak_auc")
        if auc is None:
            raise ValueError(f"{source or 'retrained report'} has no privleak_auc (was privleak evaluated?)")
        reference = {"source": source or "retrained report", "auc_retrain": float(auc)}

    gen_bs = generation_batch_size or batch_size
    per_item: dict[str, dict[str, list]] = {}
    if "verbmem" in parts:
        rows = data["verbmem"]
        prompts = [r["prompt"] for r in rows]
        refs = [_verbmem_reference(tokenizer, r["gt"], verbmem_max_new_tokens) for r in rows]
        with _raw_decoding(tokenizer):
            gens = generate_answers(
                model, tokenizer, prompts, max_new_tokens=verbmem_max_new_tokens, batch_size=gen_bs,
                prompt_format="raw", progress=progress, postprocess=_clean_up,
            )  # fmt: skip
        per_item["verbmem_forget"] = {
            "reference": refs,
            "generation": gens,
            "rougeL_f1": [M.rouge_l_f1(g, r, rouge_use_stemmer) for g, r in zip(gens, refs)],
        }
    if "knowmem" in parts:
        names = ("knowmem_forget", "knowmem_retain")
        prompts = [knowmem_prompt(r["question"], data[f"{n}_icl"]) for n in names for r in data[n]]
        with _raw_decoding(tokenizer):
            gens = generate_answers(
                model, tokenizer, prompts, max_new_tokens=knowmem_max_new_tokens, batch_size=gen_bs,
                prompt_format="raw", progress=progress, postprocess=_knowmem_answer,
            )  # fmt: skip
        start = 0
        for n in names:
            rows = data[n]
            g = gens[start : start + len(rows)]
            start += len(rows)
            refs = [r["answer"] for r in rows]
            per_item[n] = {
                "question": [r["question"] for r in rows],
                "reference": refs,
                "generation": g,
                "rougeL_f1": [M.rouge_l_f1(a, b, rouge_use_stemmer) for a, b in zip(g, refs)],
            }
    if "privleak" in parts:
        sets = [s for s in ("privleak_forget", "privleak_holdout", "privleak_retain") if s in data]
        texts = [t for s in sets for t in data[s]]
        item_names = [
            f"{p('privleak', s.split('_', 1)[1] + '.json')} item {i}" for s in sets for i in range(len(data[s]))
        ]
        res = score_texts(
            model, tokenizer, texts, batch_size=batch_size, max_length=max_length, names=item_names,
            vocab_stats=min_k_plus_plus, progress=progress,
        )  # fmt: skip
        start = 0
        for s in sets:
            n = len(data[s])
            sub = _slice_result(res, start, start + n)
            per_item[s] = _membership_columns(sub, data[s], min_k)
            start += n

    report = EvalReport(benchmark="muse", metrics={}, per_item=per_item, settings=settings, reference=reference)
    report.metrics = muse_aggregates(per_item, reference, settings)
    return report


def _slice_result(res, a: int, b: int):
    from .scoring import ScoreResult

    return ScoreResult(
        avg_nll=res.avg_nll[a:b],
        sum_logp=res.sum_logp[a:b],
        num_tokens=res.num_tokens[a:b],
        token_logps=res.token_logps[a:b] if res.token_logps is not None else None,
        token_mu=res.token_mu[a:b] if res.token_mu is not None else None,
        token_sigma=res.token_sigma[a:b] if res.token_sigma is not None else None,
    )


AGGREGATES["muse"] = muse_aggregates
