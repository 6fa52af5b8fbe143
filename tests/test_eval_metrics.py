"""Every metric of `trl_unlearn.evaluation.metrics` against small cases worked out by hand."""

import itertools
import math
from math import comb, log

import numpy as np
import pytest

from trl_unlearn.evaluation import metrics as M
from trl_unlearn.evaluation.tofu import tofu_aggregates

LN2 = log(2.0)


# ------------------------------------------------------------------------------------------------ probability


def test_probability_is_exp_of_minus_mean_nll():
    np.testing.assert_allclose(M.probability([0.0, LN2, 2 * LN2]), [1.0, 0.5, 0.25])


def test_normalized_probability_hand_cases():
    # p_gt = 0.5, perturbed 0.25 + 0.25 -> 0.5 / 1.0
    # p_gt = 0.6, perturbed 0.2 + 0.1 + 0.1 (ragged rows) -> 0.6 / 1.0
    got = M.normalized_probability([LN2, -log(0.6)], [[2 * LN2, 2 * LN2], [-log(0.2), -log(0.1), -log(0.1)]])
    np.testing.assert_allclose(got, [0.5, 0.6])


def test_normalized_probability_no_underflow_for_long_answers():
    # p = exp(-2000) underflows, the ratio does not: 1 / (1 + 3 * e^0) = 0.25
    assert M.normalized_probability([2000.0], [[2000.0, 2000.0, 2000.0]])[0] == pytest.approx(0.25)


# ------------------------------------------------------------------------------------------------ truth ratio


def test_truth_ratio_from_known_losses():
    # mean perturbed NLL 2.0, paraphrased 1.5 -> R = e^0.5 ; mean 1.0 vs 1.0 -> R = 1
    r = M.truth_ratio([[1.0, 3.0], [0.5, 1.0, 1.5]], [1.5, 1.0])
    np.testing.assert_allclose(r, [math.exp(0.5), 1.0])


def test_truth_ratio_aggregations():
    # forget: min(R, 1/R) of [2, 0.5, 1] = [0.5, 0.5, 1] -> 2/3
    assert M.truth_ratio_forget_score([2.0, 0.5, 1.0]) == pytest.approx(2 / 3)
    # elsewhere: max(0, 1 - 1/R) of [2, 0.5, 4] = [0.5, 0, 0.75] -> 1.25 / 3
    assert M.truth_ratio_score([2.0, 0.5, 4.0]) == pytest.approx(1.25 / 3)


# ----------------------------------------------------------------------------------------- forget quality (KS)


def _exact_ks_pvalue(a, b):
    """Brute force: the share of all C(n+m, n) relabellings of the pooled sample whose KS statistic is >= the
    observed one (no ties in the pool, so this is the exact null distribution)."""

    def stat(x, y):
        pts = sorted(x + y)
        return max(abs(sum(v <= t for v in x) / len(x) - sum(v <= t for v in y) / len(y)) for t in pts)

    pooled = a + b
    d = stat(a, b)
    hits = 0
    for idx in itertools.combinations(range(len(pooled)), len(a)):
        x = [pooled[i] for i in idx]
        y = [pooled[i] for i in range(len(pooled)) if i not in idx]
        hits += stat(x, y) >= d - 1e-12
    return d, hits / comb(len(pooled), len(a))


def test_forget_quality_separated_samples_exact():
    # every forget ratio below every retain-model ratio: D = 1, and exactly 2 of the C(7, 3) = 35 splits reach it
    # (all of the first sample below, or all above): p = 2/35
    a, b = [1.0, 2.0, 3.0], [4.0, 5.0, 6.0, 7.0]
    assert M.forget_quality(a, b) == pytest.approx(2 / 35, abs=1e-12)
    assert _exact_ks_pvalue(a, b) == pytest.approx((1.0, 2 / 35))


def test_forget_quality_interleaved_samples_exact():
    # ECDF gaps at 1,2,3,4,5,6,8: 1/3, 1/12, 5/12, 1/6, 1/2, 1/4, 0 -> D = 1/2
    a, b = [1.0, 3.0, 5.0], [2.0, 4.0, 6.0, 8.0]
    d, p = _exact_ks_pvalue(a, b)
    assert d == pytest.approx(0.5)
    assert M.forget_quality(a, b) == pytest.approx(p, abs=1e-12)
    assert M.forget_quality(a, a) == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------- model utility


def test_model_utility_is_harmonic_mean():
    assert M.model_utility([1.0, 0.5, 0.25]) == pytest.approx(3 / (1 + 2 + 4))
    assert M.model_utility({f"m{i}": 0.5 for i in range(9)}) == pytest.approx(0.5)
    assert M.model_utility([0.9, 0.0, 0.8]) == 0.0
    with pytest.raises(ValueError):
        M.model_utility([0.5, -0.1])
    with pytest.raises(ValueError):
        M.model_utility([])


# ------------------------------------------------------------------------------------------ membership scores


def test_loss_and_zlib_scores():
    np.testing.assert_allclose(M.loss_score([1.5, 2.0]), [1.5, 2.0])
    # zlib of b"" is 8 bytes (2 header + 2 empty final block + 4 Adler-32), of b"a" * 100 is 12 bytes
    np.testing.assert_allclose(M.zlib_score([2.0, 3.0], ["", "a" * 100]), [2.0 / 8, 3.0 / 12])
    with pytest.raises(ValueError):
        M.zlib_score([1.0], ["a", "b"])


def test_min_k_prob_on_known_token_logps():
    lp = [-1.0, -5.0, -3.0, -2.0, -4.0]
    assert M.min_k_prob(lp, 0.4) == pytest.approx(-4.5)  # floor(0.4 * 5) = 2 lowest: -5, -4
    assert M.min_k_prob(lp, 0.1) == pytest.approx(-5.0)  # at least one token
    assert M.min_k_prob(lp, 1.0) == pytest.approx(-3.0)
    with pytest.raises(ValueError):
        M.min_k_prob(lp, 0.0)


def test_min_k_plus_plus_on_hand_made_distribution():
    # next-token distribution p = (1/2, 1/4, 1/4) at both positions:
    # mu = E[log p] = -1.5 ln2, E[(log p)^2] = 2.5 ln2^2, sigma = sqrt(2.5 - 2.25) ln2 = 0.5 ln2
    logp = np.log([0.5, 0.25, 0.25])
    p = np.exp(logp)
    mu = float((p * logp).sum())
    sigma = math.sqrt(float((p * logp**2).sum()) - mu**2)
    assert mu == pytest.approx(-1.5 * LN2) and sigma == pytest.approx(0.5 * LN2)
    # the text takes token 0 (z = +1) then token 1 (z = -1)
    args = ([logp[0], logp[1]], [mu, mu], [sigma, sigma])
    assert M.min_k_plus_plus(*args, k=0.5) == pytest.approx(-1.0)
    assert M.min_k_plus_plus(*args, k=1.0) == pytest.approx(0.0)


def test_auc_separable_reversed_and_direction():
    members, others = [0.9, 0.8, 0.7], [0.1, 0.2]
    assert M.membership_auc(members, others) == 1.0
    assert M.membership_auc(others, members) == 0.0
    # loss-like scores: lower means member
    assert M.membership_auc([0.1, 0.2], [0.9, 0.8], higher_is_member=False) == 1.0
    assert M.membership_auc([0.5, 0.5], [0.5, 0.5]) == 0.5
    # MUSE's forget_holdout AUC puts the holdout set in the positive class: a model that remembers the forget
    # set (higher Min-K% there) gets 0
    assert M.muse_privleak_auc(forget_scores=members, holdout_scores=others) == 0.0


def test_privleak_arithmetic():
    assert M.privleak(0.3, 0.5) == pytest.approx(-40.0)
    assert M.privleak(0.6, 0.5) == pytest.approx(20.0)
    assert M.privleak(0.4772, 0.4772) == 0.0
    with pytest.raises(ValueError):
        M.privleak(0.5, 0.0)


# ---------------------------------------------------------------------------------------------------- ROUGE-L


def test_rouge_l_on_hand_counted_lcs():
    ref = "the cat sat on the mat"  # 6 tokens
    pred = "the cat on mat"  # 4 tokens; LCS = the, cat, on, mat = 4
    assert M.rouge_l_recall(pred, ref) == pytest.approx(4 / 6)
    assert M.rouge_l_f1(pred, ref) == pytest.approx(2 * 1.0 * (4 / 6) / (1.0 + 4 / 6))  # P = 1, R = 2/3 -> 0.8
    # "a cat lay on the rug" vs ref: LCS = cat, on, the = 3 of 6 and 6
    assert M.rouge_l_recall("a cat lay on the rug", ref) == pytest.approx(3 / 6)
    assert M.rouge_l_f1("a cat lay on the rug", ref) == pytest.approx(0.5)


def test_rouge_l_stemmer():
    # Porter stems: cats -> cat, running / runs -> run
    assert M.rouge_l_recall("cat runs", "cats running", use_stemmer=True) == 1.0
    assert M.rouge_l_recall("cat runs", "cats running", use_stemmer=False) == 0.0


# ------------------------------------------------------------------------------------ TOFU aggregation wiring


def test_tofu_aggregates_wiring():
    """Which formula feeds which number: forget/retain use exp(-NLL) and the paraphrase; real authors / world facts
    use the normalised probability and the ground-truth answer in the truth ratio."""

    def qa_set(nll_answer, nll_para, nll_pert, gens, answers):
        cols = {"avg_nll_answer": nll_answer, "avg_nll_perturbed": nll_pert, "generation": gens, "answer": answers}
        if nll_para is not None:
            cols["avg_nll_paraphrased"] = nll_para
        return cols

    per_item = {
        # R = exp(mean pert - para): [e^{ln2}=2, e^{-ln2}=1/2]
        "forget": qa_set([LN2, 2 * LN2], [LN2, 2 * LN2], [[2 * LN2], [LN2]], ["a b", "x"], ["a b", "c d"]),
        "retain": qa_set([LN2, LN2], [0.0, 0.0], [[2 * LN2, 2 * LN2], [LN2, LN2]], ["a b", "a"], ["a b", "a b"]),
        "real_authors": qa_set([LN2], None, [[2 * LN2, 2 * LN2]], ["z"], ["z"]),
        "world_facts": qa_set([LN2], None, [[3 * LN2]], ["no"], ["z"]),
    }
    retain_model_ratios = [0.9, 1.0, 1.1]
    out = tofu_aggregates(per_item, {"retain_forget_truth_ratio": retain_model_ratios}, {"rouge_use_stemmer": True})
    assert out["forget_probability"] == pytest.approx((0.5 + 0.25) / 2)
    assert out["forget_rougeL_recall"] == pytest.approx(0.5)
    assert out["forget_truth_ratio"] == pytest.approx(0.5)  # min(2, 1/2) for both
    assert out["retain_probability"] == pytest.approx(0.5)
    assert out["retain_rougeL_recall"] == pytest.approx((1.0 + 0.5) / 2)
    # R = [e^{2ln2}=4, e^{ln2}=2] -> (0.75 + 0.5) / 2
    assert out["retain_truth_ratio"] == pytest.approx(0.625)
    # 0.5 / (0.5 + 0.25 + 0.25); R = e^{2ln2 - ln2} = 2 -> 0.5
    assert out["real_authors_probability"] == pytest.approx(0.5)
    assert out["real_authors_truth_ratio"] == pytest.approx(0.5)
    # 0.5 / (0.5 + 0.125); R = 4 -> 0.75; ROUGE 0
    assert out["world_facts_probability"] == pytest.approx(0.8)
    assert out["world_facts_truth_ratio"] == pytest.approx(0.75)
    assert out["model_utility"] == 0.0  # world facts ROUGE-L is 0
    # forget R = [0.5, 2] vs [0.9, 1, 1.1]: D = 1/2 -> exact p-value by enumeration
    assert out["forget_quality"] == pytest.approx(_exact_ks_pvalue([2.0, 0.5], retain_model_ratios)[1], abs=1e-12)
    assert tofu_aggregates(per_item, {}, {})["forget_quality"] is None
