"""Tests for benchmarks/markov_chains.py: the data generator, the input/label layout, the metric and the crossing."""

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "markov_chains.py"
_spec = importlib.util.spec_from_file_location("markov_chains", _PATH)
mc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mc)


@pytest.mark.parametrize("name", ["retain", "forget1", "forget2"])
def test_chain_matrices_pattern(name):
    states = mc.CHAINS[name]
    init, trans = mc.chain_matrices(states, leakage=0.2)
    assert trans.shape == (10, 10)
    np.testing.assert_allclose(trans.sum(1), 1.0)
    np.testing.assert_allclose(init.sum(), 1.0)
    own = np.isin(np.arange(10), states)
    for i in range(10):
        if own[i]:
            np.testing.assert_allclose(trans[i, own], 0.8 / 3)
            np.testing.assert_allclose(trans[i, ~own], 0.2 / 7)
        else:
            np.testing.assert_allclose(trans[i], 0.1)
    np.testing.assert_allclose(init[own], 0.8 / 3)
    np.testing.assert_allclose(init[~own], 0.2 / 7)


def test_sample_chain_frequencies_match_the_matrix():
    init, trans = mc.chain_matrices(mc.CHAINS["forget1"])
    seqs = mc.sample_chain(init, trans, 4000, 30, np.random.default_rng(0))
    assert seqs.shape == (4000, 30) and seqs.min() >= 0 and seqs.max() <= 9
    counts = np.zeros((10, 10))
    np.add.at(counts, (seqs[:, :-1].ravel(), seqs[:, 1:].ravel()), 1)
    freq = counts / counts.sum(1, keepdims=True)
    assert counts.sum(1).min() > 2000  # every row well sampled
    np.testing.assert_allclose(freq, trans, atol=0.02)
    np.testing.assert_allclose(np.bincount(seqs[:, 0], minlength=10) / 4000, init, atol=0.025)


def test_make_data_sizes_lengths_and_states():
    long = mc.make_data(42, lengths=(20, 20, 20), sizes=(1000, 500, 500))
    short = mc.make_data(42, lengths=(20, 20, 5), sizes=(1000, 500, 500))
    for name, n in (("retain", 1000), ("forget1", 500), ("forget2", 500)):
        train, test = short[name]
        assert (len(train), len(test)) == (int(0.8 * n), int(0.2 * n))
        assert train.shape[1] == test.shape[1] == (5 if name == "forget2" else 20)
        both = np.concatenate([train, test])
        assert set(np.unique(both)) <= set(range(10))  # states only: no begin/end/pad tokens
    assert long["forget2"][0].shape[1] == 20
    for name in ("retain", "forget1"):  # forget-2's length does not change the other sets
        for a, b in zip(long[name], short[name]):
            np.testing.assert_array_equal(a, b)
    # each chain mostly stays on its own states
    assert np.isin(short["forget1"][0], mc.CHAINS["forget1"]).mean() > 0.5
    assert np.isin(short["retain"][0], mc.CHAINS["forget1"]).mean() < 0.2
    # a different seed gives different data
    assert not np.array_equal(mc.make_data(1, sizes=(1000, 500, 500))["retain"][0], long["retain"][0])


def test_inputs_labels_shift_and_padding():
    seqs = np.array([[1, 2, 3, 4, 5], [6, 7, 8, 9, 0]])
    inputs, labels = mc.to_inputs_labels(seqs, width=19)
    assert inputs.shape == labels.shape == (2, 19)
    assert inputs[0, :4].tolist() == [1, 2, 3, 4] and labels[0, :4].tolist() == [2, 3, 4, 5]
    assert inputs[1, :4].tolist() == [6, 7, 8, 9] and labels[1, :4].tolist() == [7, 8, 9, 0]
    assert (labels[:, 4:] == -100).all() and (inputs[:, 4:] == 0).all()
    full = np.arange(20)[None] % 10
    inputs, labels = mc.to_inputs_labels(full, width=19)
    assert inputs[0].tolist() == (list(range(10)) + list(range(9))) and (labels != -100).sum() == 19
    assert labels[0].tolist() == list(range(1, 10)) + list(range(10))
    with pytest.raises(ValueError, match="width"):
        mc.to_inputs_labels(np.zeros((1, 21), dtype=np.int64), width=19)


def test_first_crossing():
    forget = [0.10, 0.20, 0.50, 0.30, 0.60]
    retain = [0.01, 0.02, 0.05, 0.04, 0.08]
    assert mc.first_crossing(forget, retain, 0.45) == (2, 0.05)  # first, not the later 0.60
    assert mc.first_crossing(forget, retain, 0.50) == (2, 0.05)  # reaching the level counts
    assert mc.first_crossing(forget, retain, 0.90) is None  # never
    assert mc.first_crossing(forget, retain, 0.05) == (0, 0.01)  # already there before unlearning


def test_summarize_crossings():
    s = mc.summarize_crossings([(2, 0.05), (4, 0.07), None])
    assert (s["n"], s["crossed"]) == (3, 2)
    assert s["mean"] == pytest.approx(0.06) and s["sd"] == pytest.approx(math.sqrt(2) * 0.01)
    assert (s["min"], s["max"], s["step_mean"]) == (pytest.approx(0.05), pytest.approx(0.07), 3.0)
    assert mc.summarize_crossings([None, None]) == {"n": 2, "crossed": 0}


def test_sequence_logps_sums_scored_tokens():
    logits = torch.zeros(2, 3, 10)
    logits[0, 0, 4] = math.log(9.0)  # p(4) = 9 / 18 = 0.5 at row 0, position 0; uniform 0.1 at the other positions
    labels = torch.tensor([[4, 1, -100], [2, -100, -100]])
    logps, num = mc.sequence_logps(logits, labels)
    assert num.tolist() == [2.0, 1.0]
    assert logps.tolist() == pytest.approx([math.log(0.5) + math.log(0.1), math.log(0.1)])


def test_truth_kl_hand_computed():
    _, trans = mc.chain_matrices(mc.CHAINS["forget1"])
    p = torch.tensor(trans, dtype=torch.float32)[torch.tensor([[3, 0]])]  # own row, then a uniform row
    uniform = torch.full((1, 2, 10), math.log(0.1))
    expected_own = 0.8 * math.log((0.8 / 3) / 0.1) + 0.2 * math.log((0.2 / 7) / 0.1)
    mask = torch.tensor([[True, True]])
    assert mc.truth_kl(uniform, p, mask) == pytest.approx(expected_own / 2, rel=1e-5)
    assert mc.truth_kl(uniform, p, torch.tensor([[True, False]])) == pytest.approx(expected_own, rel=1e-5)
    assert mc.truth_kl(p.log(), p, mask) == pytest.approx(0.0, abs=1e-6)


def test_model_is_causal_and_truth_kl_ignores_padding():
    torch.manual_seed(0)
    model = mc.MarkovTransformer(d=16, n_layer=2, n_positions=19).eval()
    ids = torch.randint(0, 10, (3, 19))
    changed = ids.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 10
    with torch.no_grad():
        a, b = model(ids), model(changed)
    assert a.shape == (3, 19, 10)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])
    # TruthKL trims trailing padding columns of short sequences; the value equals the full-width computation
    seqs = mc.sample_chain(*mc.chain_matrices(mc.CHAINS["forget2"]), 6, 5, np.random.default_rng(0))
    inputs, labels = mc.to_inputs_labels(seqs, width=19)
    _, trans = mc.chain_matrices(mc.CHAINS["forget2"])
    got = mc.TruthKL({"forget2": (inputs, labels, trans)}, batch_size=4)(model)["forget2"]
    with torch.no_grad():
        log_q = torch.log_softmax(model(inputs), -1)
    full = mc.truth_kl(log_q, torch.tensor(trans, dtype=torch.float32)[inputs], labels != -100)
    assert got == pytest.approx(full, rel=1e-5)
