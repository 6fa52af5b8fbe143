"""Pure metric functions for unlearning evaluation: numbers and arrays in, numbers and arrays out.

No model is touched here (see `scoring.py` for that). Definitions follow `method.md` §4-5:
TOFU (Maini et al. 2024, locuslab/tofu `aggregate_eval_stat.py`), MUSE (Shi et al. 2024, swj0419/muse_bench)
and the membership-inference scores used by open-unlearning (LOSS, zlib, Min-K%, Min-K%++).

Conventions: `avg_nll` is the per-token mean negative log-likelihood of one answer (or text) over its scored
tokens; "perturbed" arguments are ragged per item (a 2-D array, or a list of 1-D sequences of any length >= 1).
Every function says which direction is better, or which direction means "member" for membership scores.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from functools import lru_cache

import numpy as np
from scipy.special import logsumexp
from scipy.stats import hmean, ks_2samp
from sklearn.metrics import roc_auc_score

__all__ = [
    "probability",
    "normalized_probability",
    "rouge_l",
    "rouge_l_recall",
    "rouge_l_f1",
    "truth_ratio",
    "truth_ratio_forget_score",
    "truth_ratio_score",
    "forget_quality",
    "model_utility",
    "loss_score",
    "zlib_score",
    "min_k_prob",
    "min_k_plus_plus",
    "membership_auc",
    "muse_privleak_auc",
    "privleak",
]


def _as_1d(x, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    return arr


def _ragged(x, name: str) -> list[np.ndarray]:
    """A 2-D array or a list of 1-D sequences -> list of non-empty float64 arrays (one per item)."""
    rows = [np.asarray(r, dtype=np.float64).reshape(-1) for r in x]
    for i, r in enumerate(rows):
        if r.size == 0:
            raise ValueError(f"{name}: item {i} has no values")
    return rows


# ---------------------------------------------------------------------------------------------------- TOFU


def probability(avg_nll) -> np.ndarray:
    """Per-item answer probability `exp(-avg_nll)` (TOFU "Probability" on the forget/retain sets, averaged).

    Source: TOFU, `method.md` §4. Direction: higher = the model gives the answer more probability (better on
    retain; on the forget set the target is the retain model's value, usually lower).
    """
    return np.exp(-_as_1d(avg_nll, "avg_nll"))


def normalized_probability(avg_nll_answer, avg_nll_perturbed) -> np.ndarray:
    """Per-item `p_gt / (p_gt + sum_k p_perturbed_k)` with `p = exp(-avg_nll)` (TOFU Real Authors / World Facts).

    Computed in log space (no underflow for long answers). Source: TOFU, `method.md` §4. Direction: higher is
    better (the true answer is preferred over the wrong ones); 1 / (1 + K) is chance for K perturbations.
    """
    gt = _as_1d(avg_nll_answer, "avg_nll_answer")
    pert = _ragged(avg_nll_perturbed, "avg_nll_perturbed")
    if len(pert) != gt.size:
        raise ValueError(f"{gt.size} answers but {len(pert)} rows of perturbed answers")
    out = np.empty(gt.size)
    for i, (g, p) in enumerate(zip(gt, pert)):
        out[i] = np.exp(-g - logsumexp(np.concatenate(([-g], -p))))
    return out


@lru_cache(maxsize=4)
def _rouge_scorer(use_stemmer: bool):
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)


def rouge_l(prediction: str, reference: str, use_stemmer: bool = True):
    """ROUGE-L `Score(precision, recall, fmeasure)` of `prediction` against `reference` (rouge-score package).

    rouge-score lower-cases, keeps `[a-z0-9]` tokens and (with `use_stemmer`) applies the Porter stemmer.
    """
    return _rouge_scorer(bool(use_stemmer)).score(reference, prediction)["rougeL"]


def rouge_l_recall(prediction: str, reference: str, use_stemmer: bool = True) -> float:
    """ROUGE-L recall = LCS(prediction, reference) / len(reference tokens) (TOFU, `use_stemmer=True`).

    Source: TOFU `eval_rouge_recall`, `method.md` §4. Direction: higher = more of the reference reproduced
    (better on retain / real authors / world facts; on the forget set the target is the retain model's value).
    """
    return float(rouge_l(prediction, reference, use_stemmer).recall)


def rouge_l_f1(prediction: str, reference: str, use_stemmer: bool = True) -> float:
    """ROUGE-L F1 (harmonic mean of LCS precision and recall), as MUSE's VerbMem / KnowMem use it.

    Source: MUSE (`method.md` §5; muse_bench uses `use_stemmer=False`, pass it to match). Direction: on the
    forget set lower = less memorised; on the retain set higher = more utility kept.
    """
    return float(rouge_l(prediction, reference, use_stemmer).fmeasure)


def truth_ratio(avg_nll_perturbed, avg_nll_paraphrased) -> np.ndarray:
    """Per-item truth ratio `R = exp(mean_k avg_nll_perturbed_k - avg_nll_paraphrased)`.

    `R` is the (length-normalised, geometric-mean) probability of the paraphrased correct answer divided by that
    of the wrong (perturbed) answers: R > 1 means the model prefers the correct answer. Real Authors / World
    Facts pass the ground-truth answer as "paraphrased". This is the ratio TOFU's code computes (the TOFU paper
    writes its inverse). Source: TOFU, `method.md` §4. See the two aggregations below.
    """
    para = _as_1d(avg_nll_paraphrased, "avg_nll_paraphrased")
    pert = _ragged(avg_nll_perturbed, "avg_nll_perturbed")
    if len(pert) != para.size:
        raise ValueError(f"{para.size} paraphrased answers but {len(pert)} rows of perturbed answers")
    with np.errstate(over="ignore"):
        return np.exp(np.array([p.mean() for p in pert]) - para)


def truth_ratio_forget_score(ratios) -> float:
    """Forget-set aggregation `mean(min(R, 1/R))`, in [0, 1].

    Source: TOFU, `method.md` §4. Direction: 1 = no preference between the correct and the wrong answers, which is
    what a model that never saw the forget set tends towards; higher usually means more forgotten, but the target
    is the retain model's value (forget quality compares the two per-item distributions).
    """
    r = _as_1d(ratios, "ratios")
    if r.size == 0:
        raise ValueError("no truth ratios")
    with np.errstate(divide="ignore", over="ignore"):
        return float(np.mean(np.minimum(r, 1.0 / r)))


def truth_ratio_score(ratios) -> float:
    """Retain / Real Authors / World Facts aggregation `mean(max(0, 1 - 1/R))`, in [0, 1].

    Source: TOFU, `method.md` §4. Higher is better (the model prefers correct answers over wrong ones).
    """
    r = _as_1d(ratios, "ratios")
    if r.size == 0:
        raise ValueError("no truth ratios")
    with np.errstate(divide="ignore"):
        return float(np.mean(np.maximum(0.0, 1.0 - 1.0 / r)))


def forget_quality(ratios_unlearned, ratios_retain_model) -> float:
    """Forget quality: `scipy.stats.ks_2samp(R_unlearned, R_retain_model).pvalue` on the forget set.

    Two-sample Kolmogorov-Smirnov test of the unlearned model's per-item forget truth ratios against those of a
    model trained on the retain split only (scipy's default `method="auto"`: exact for small samples).
    Source: TOFU, `method.md` §4. Higher is better (1 = indistinguishable from the retain model).
    """
    a = _as_1d(ratios_unlearned, "ratios_unlearned")
    b = _as_1d(ratios_retain_model, "ratios_retain_model")
    if a.size == 0 or b.size == 0:
        raise ValueError("forget quality needs truth ratios from both models")
    return float(ks_2samp(a, b).pvalue)


def model_utility(values: Mapping[str, float] | Sequence[float]) -> float:
    """Model utility: `scipy.stats.hmean` of {Retain, Real Authors, World Facts} x {Probability, ROUGE-L recall,
    Truth ratio} (9 numbers for TOFU; any non-empty set of non-negative numbers is accepted; a zero gives 0).

    Source: TOFU, `method.md` §4. Higher is better.
    """
    vals = list(values.values()) if isinstance(values, Mapping) else list(values)
    arr = _as_1d(vals, "values")
    if arr.size == 0:
        raise ValueError("model utility needs at least one number")
    if np.any(~np.isfinite(arr)) or np.any(arr < 0):
        raise ValueError(f"model utility needs finite non-negative numbers, got {arr.tolist()}")
    if np.any(arr == 0):
        return 0.0
    return float(hmean(arr))


# ------------------------------------------------------------------------------------------ membership scores


def loss_score(avg_nll) -> np.ndarray:
    """LOSS attack (Yeom et al. 2018): the per-token mean NLL of a text. Lower = more likely a member."""
    return _as_1d(avg_nll, "avg_nll").copy()


def zlib_score(avg_nll, texts: Sequence[str]) -> np.ndarray:
    """zlib attack (Carlini et al. 2021, open-unlearning convention): `avg_nll / len(zlib.compress(text_utf8))`.

    The numerator is the per-token mean NLL (log-perplexity) of the text, the denominator the byte length of its
    zlib-compressed UTF-8 encoding (default level). Lower = more likely a member.
    """
    nll = _as_1d(avg_nll, "avg_nll")
    if len(texts) != nll.size:
        raise ValueError(f"{nll.size} losses but {len(texts)} texts")
    sizes = np.array([len(zlib.compress(t.encode("utf-8"))) for t in texts], dtype=np.float64)
    return nll / sizes


def _lowest_k_mean(values: np.ndarray, k: float) -> float:
    if not 0.0 < k <= 1.0:
        raise ValueError(f"k must be in (0, 1], got {k}")
    if values.size == 0:
        raise ValueError("no token values")
    n = max(1, int(values.size * k))
    return float(np.mean(np.sort(values)[:n]))


def min_k_prob(token_logps, k: float = 0.4) -> float:
    """Min-K% Prob (Shi et al. 2024): mean of the lowest `k` fraction of a text's token log-probs.

    The count is `max(1, floor(k * n_tokens))`. MUSE's PrivLeak uses k = 0.4. Higher = more likely a member.
    """
    return _lowest_k_mean(_as_1d(token_logps, "token_logps"), k)


def min_k_plus_plus(token_logps, mu, sigma, k: float = 0.4) -> float:
    """Min-K%++ (Zhang et al. 2024): mean of the lowest `k` fraction of `(log p(x_t) - mu_t) / sigma_t`.

    `mu_t = E_{z~p(.|x_<t)}[log p(z|x_<t)]` and `sigma_t^2 = E[(log p(z))^2] - mu_t^2` over the full vocabulary at
    position t (see `scoring.score_texts(..., vocab_stats=True)`). A zero sigma (one-hot distribution) is
    treated as 1e-12. Same count rule as `min_k_prob`. Higher = more likely a member.
    """
    lp = _as_1d(token_logps, "token_logps")
    mu = _as_1d(mu, "mu")
    sg = _as_1d(sigma, "sigma")
    if not lp.size == mu.size == sg.size:
        raise ValueError(f"length mismatch: {lp.size} log-probs, {mu.size} mu, {sg.size} sigma")
    return _lowest_k_mean((lp - mu) / np.maximum(sg, 1e-12), k)


def membership_auc(member_scores, nonmember_scores, higher_is_member: bool = True) -> float:
    """ROC AUC of telling members from non-members with a score (`sklearn.metrics.roc_auc_score`).

    = P(a random member looks more member-like than a random non-member); 1.0 perfectly separates, 0.5 is chance,
    0.0 is perfectly reversed. Pass `higher_is_member=False` for LOSS / zlib (lower = member).
    """
    m = _as_1d(member_scores, "member_scores")
    n = _as_1d(nonmember_scores, "nonmember_scores")
    if m.size == 0 or n.size == 0:
        raise ValueError("AUC needs at least one member and one non-member")
    scores = np.concatenate([m, n])
    if not higher_is_member:
        scores = -scores
    labels = np.concatenate([np.ones(m.size), np.zeros(n.size)])
    return float(roc_auc_score(labels, scores))


def muse_privleak_auc(forget_scores, holdout_scores, higher_is_member: bool = True) -> float:
    """MUSE's `forget_holdout` AUC: the holdout set is the positive class ("member" in muse_bench's key naming).

    Equals `membership_auc(holdout, forget)` = 1 - AUC(forget as members). A model that still remembers the
    forget set gets AUC < 0.5, a retrained one about 0.5. Feed it to `privleak`.
    """
    return membership_auc(holdout_scores, forget_scores, higher_is_member=higher_is_member)


def privleak(auc_unlearned: float, auc_retrain: float) -> float:
    """MUSE PrivLeak `(AUC_unlearned - AUC_retrain) / AUC_retrain * 100` (AUCs from `muse_privleak_auc`).

    Source: MUSE, `method.md` §5. 0 is ideal; large negative = under-unlearned, large positive = over-unlearned.
    """
    if auc_retrain <= 0:
        raise ValueError(f"AUC of the retrained model must be > 0, got {auc_retrain}")
    return (float(auc_unlearned) - float(auc_retrain)) / float(auc_retrain) * 100.0
