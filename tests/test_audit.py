"""The audit's quantization attack and recovered share, on cases with a known answer: RTN by hand, and unlearning
that moves weights by less than half a 4-bit step (undone by quantization, share 1) or by whole steps (share 0)."""

import copy
import json

import pytest
import torch
from audit_toy import mean_nll, qa_batch, train
from conftest import QA

from trl_unlearn.evaluation.quantize import quant_specs, quantize_model_rtn, rtn_quantize_weight
from trl_unlearn.evaluation.unlearning_audit import AuditConfig, AuditData, audit, parse_attacks, recovered_share
from trl_unlearn.toy.tiny import tiny_llama, train_tokenizer

FORGET = [{"question": q, "answer": a} for q, a in QA[:6]]
RETAIN = [{"question": q, "answer": a} for q, a in QA[6:18]]


def test_rtn_per_channel_by_hand():
    # 4 bits: qmax 7, scale = max|w| / 7 = 1/7; w / scale = 7, -3.15, 1.75, 0.7 -> 7, -3, 2, 1
    w = torch.tensor([[1.0, -0.45, 0.25, 0.1]])
    assert torch.allclose(rtn_quantize_weight(w, 4), torch.tensor([[1.0, -3 / 7, 2 / 7, 1 / 7]]))
    # 8 bits: qmax 127, scale 1/127; 0.1 * 127 = 12.7 -> 13
    assert torch.allclose(rtn_quantize_weight(w, 8)[0, 3], torch.tensor(13 / 127))


def test_rtn_group_wise_by_hand():
    # groups [1, -0.45] (scale 1/7) and [0.25, 0.1] (scale 0.25/7: 0.1 / scale = 2.8 -> 3)
    w = torch.tensor([[1.0, -0.45, 0.25, 0.1]])
    expected = torch.tensor([[1.0, -3 / 7, 0.25, 3 * 0.25 / 7]])
    assert torch.allclose(rtn_quantize_weight(w, 4, group_size=2), expected)
    # a short last group: 3 columns in groups of 2 -> [1, -0.45], [0.25] (a lone value is its own max: exact)
    w3 = torch.tensor([[1.0, -0.45, 0.25]])
    assert torch.allclose(rtn_quantize_weight(w3, 4, group_size=2), torch.tensor([[1.0, -3 / 7, 0.25]]))
    assert torch.equal(rtn_quantize_weight(torch.zeros(2, 4), 4), torch.zeros(2, 4))


def test_quant_specs_and_names():
    names = [s.name for s in quant_specs((8, 4), 64, all_variants=True)]
    assert names == ["rtn8_channel", "rtn8_g64", "rtn4_channel", "rtn4_g64", "bnb_int8", "bnb_nf4"]
    # the default: per channel at 8 bits, group-wise below
    assert [s.name for s in quant_specs((8, 4), 128, bnb=False)] == ["rtn8_channel", "rtn4_g128"]
    assert [s.name for s in quant_specs((4,), 32, bnb=False)] == ["rtn4_g32"]
    with pytest.raises(ValueError, match="bits"):
        quant_specs((5,))


def test_recovered_share_values_and_the_none_rule():
    assert recovered_share(0.8, 0.2, 1.0) == (pytest.approx(0.75), None)
    assert recovered_share(0.2, 0.2, 1.0) == (0.0, None)
    # forgetting that raises a metric (truth ratio towards 1) works the same way
    assert recovered_share(0.7, 0.9, 0.5)[0] == pytest.approx(0.5)
    share, reason = recovered_share(0.9, 0.5, 0.51, min_gap=0.02)
    assert share is None and "nothing forgotten" in reason
    assert recovered_share(None, 0.5, 1.0) == (None, "a value is missing")


def test_parse_attacks():
    assert parse_attacks("prompt, quantization") == ["prompt", "quantization"]
    assert parse_attacks(None)[0] == "quantization"
    with pytest.raises(ValueError, match="choose among quantization, relearn"):
        parse_attacks("quantisation")


@pytest.fixture(scope="module")
def grid_models():
    """(tokenizer, base on the 4-bit per-channel grid, unlearned by < half a step, unlearned by whole steps)."""
    tok = train_tokenizer([f"Question: {q}\nAnswer: {a}" for q, a in QA], vocab_size=320)
    model = tiny_llama(tok, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, seed=3)
    train(model, qa_batch(tok, FORGET + RETAIN), steps=120, lr=1e-2)
    base, _ = quantize_model_rtn(model, 4)  # every decoder Linear on its 4-bit grid
    head = base.get_output_embeddings()
    linears = [m for m in base.modules() if isinstance(m, torch.nn.Linear) and m is not head]
    base.zero_grad()
    mean_nll(base, qa_batch(tok, FORGET)).backward()  # the gradient of the forget NLL: the unlearning direction
    small, large = copy.deepcopy(base), copy.deepcopy(base)
    with torch.no_grad():
        for m, ms, ml in zip(
            linears,
            [x for x in small.modules() if isinstance(x, torch.nn.Linear)],
            [x for x in large.modules() if isinstance(x, torch.nn.Linear)],
        ):
            w = m.weight
            step = w.abs().amax(dim=1, keepdim=True) / 7  # the row's 4-bit step
            k = torch.round(w / step)
            inner = k.abs() < 7  # the row's largest weight stays, so its step does not change
            direction = torch.sign(m.weight.grad) * inner
            ms.weight.copy_(w + 0.45 * step * direction)  # less than half a step: rounds back to the grid point
            ml.weight.copy_(torch.clamp(k + 3 * direction, -6, 6) * step * inner + w * ~inner)  # whole steps
    base.zero_grad()
    return tok, base, small, large


def _quant_share(tok, base, unlearned):
    data = AuditData(forget=FORGET, retain=RETAIN)
    cfg = AuditConfig(quant_bits=(4,), quant_all_variants=True, bnb=False, max_new_tokens=8)
    report = audit(
        unlearned, tok, base, data, attacks="quantization", config=cfg, prompt_format="plain", progress=False
    )
    return {r["variant"]: r for r in report["attacks"]}["rtn4_channel"]


def test_quantization_undoes_sub_half_step_unlearning(grid_models):
    tok, base, small, _ = grid_models
    res = _quant_share(tok, base, small)
    m = res["metrics"]
    assert m["base"]["forget_probability"] - m["unlearned"]["forget_probability"] > 0.05  # it did forget
    assert res["recovered_share"]["forget_probability"] == pytest.approx(1.0, abs=1e-3)
    # the base is quantized the same way: on its grid already, quantization leaves it as it was
    assert m["attacked_base"]["forget_probability"] == pytest.approx(m["base"]["forget_probability"], abs=1e-4)


def test_quantization_keeps_whole_step_unlearning(grid_models):
    tok, base, _, large = grid_models
    res = _quant_share(tok, base, large)
    m = res["metrics"]
    assert m["base"]["forget_probability"] - m["unlearned"]["forget_probability"] > 0.05
    assert res["recovered_share"]["forget_probability"] == pytest.approx(0.0, abs=1e-3)


def test_quantized_copy_leaves_the_model_alone(grid_models):
    _, _, small, _ = grid_models
    before = {n: p.clone() for n, p in small.state_dict().items()}
    quantized, count = quantize_model_rtn(small, 4)
    assert count == 2 * 7  # q, k, v, o, gate, up, down per layer
    assert all(torch.equal(before[n], p) for n, p in small.state_dict().items())
    assert torch.equal(quantized.get_output_embeddings().weight, small.get_output_embeddings().weight)


def test_rows_to_qa_reads_qa_prompt_completion_and_text_rows(tmp_path):
    from trl_unlearn.data.files import write_tofu_layout
    from trl_unlearn.evaluation.unlearning_audit import load_audit_data, rows_to_qa

    assert rows_to_qa([{"question": "q", "answer": "a", "x": 1}], "f") == (
        [{"question": "q", "answer": "a", "x": 1}],
        None,
    )
    assert rows_to_qa([{"prompt": "Q: 2+2\nA:", "completion": " 4"}], "f") == (
        [{"question": "Q: 2+2\nA:", "answer": " 4"}],
        "raw",
    )
    # text: the first half of the words is the prompt, the rest (after a space) the answer
    assert rows_to_qa([{"text": "one two three four five"}], "f") == (
        [{"question": "one two", "answer": " three four five"}],
        "raw",
    )
    with pytest.raises(ValueError, match="fewer than 2 words"):
        rows_to_qa([{"text": "one"}], "f")
    with pytest.raises(ValueError, match="render them with the chat template"):
        rows_to_qa([{"prompt": [{"role": "user", "content": "q"}], "completion": "a"}], "f")
    with pytest.raises(ValueError, match="question/answer, prompt/completion or text"):
        rows_to_qa([{"input": "q"}], "f")

    write_tofu_layout(
        tmp_path,
        {
            "forget": [{"text": "a b c d"}],
            "retain": [{"text": "e f g h"}],
            "holdout": [{"text": "i j k l"}],
            "qa": [{"question": "q", "answer": "a"}],
        },
    )
    data = load_audit_data(tmp_path, "forget", nonmember_split="holdout")
    assert data.prompt_format == "raw" and data.nonmember == [("i j", " k l")]
    assert data.forget == [{"question": "a b", "answer": " c d"}]
    with pytest.raises(ValueError, match="different formats"):
        load_audit_data(tmp_path, "forget", retain_split="qa")
    write_tofu_layout(tmp_path, {"empty": []})
    with pytest.raises(ValueError, match="empty.json: no rows; the audit needs at least one"):
        load_audit_data(tmp_path, "empty", retain_split="qa")


def test_spread_items_by_hand():
    from trl_unlearn.evaluation.unlearning_audit import spread_items

    assert spread_items(10, 4) == [0, 2, 5, 7]  # floor(i * 10 / 4)
    assert spread_items(3, 5) == [0, 1, 2] and spread_items(3, None) == [0, 1, 2]
    with pytest.raises(ValueError, match=">= 1 or None"):
        spread_items(3, 0)


def test_aggregate_takes_detail_metrics_on_the_given_items_only():
    from trl_unlearn.evaluation.unlearning_audit import aggregate

    items = {"probability": [0.1, 0.2, 0.3, 0.6], "rougeL_recall": [1.0, None, 0.5, None]}
    # probability over every item of idx, ROUGE-L over those of them that were generated
    assert aggregate(items, "forget", detail_idx=[0, 2]) == {
        "forget_probability": pytest.approx(0.3),
        "forget_rougeL_recall": pytest.approx(0.75),
    }
    assert aggregate(items, "forget", idx=[1, 2], detail_idx=[0, 2]) == {
        "forget_probability": pytest.approx(0.25),
        "forget_rougeL_recall": pytest.approx(0.5),
    }
    # never a mean over fewer items than asked: an item without a value raises
    with pytest.raises(ValueError, match=r"forget items \[1, 3\] have no rougeL_recall"):
        aggregate(items, "forget")


def test_capped_attack_rows_compare_the_same_items(grid_models):
    tok, base, small, _ = grid_models
    data = AuditData(forget=FORGET, retain=RETAIN)
    cfg = AuditConfig(quant_bits=(4,), bnb=False, max_new_tokens=8, attack_items=2, min_gap=0.0)
    report = audit(small, tok, base, data, attacks="quantization", config=cfg, prompt_format="plain", progress=False)
    row = report["attacks"][0]
    assert row["variant"] == "rtn4_g128" and row["detail_items"] == {"forget": [0, 3], "retain": [0, 6]}
    assert report["settings"]["detail_items"] == {"forget": [0, 3], "retain": [0, 6]}
    att = row["per_item"]["attacked"]["forget"]
    assert [g is None for g in att["generation"]] == [False, True, True, False, True, True]
    m = row["metrics"]
    clean = {role: report["clean"][role]["per_item"]["forget"] for role in ("base", "unlearned")}
    # ROUGE-L of base, unlearned and attacked over items 0 and 3; probability over all six
    for role, values in (("base", clean["base"]), ("unlearned", clean["unlearned"]), ("attacked", att)):
        r = values["rougeL_recall"]
        assert m[role]["forget_rougeL_recall"] == pytest.approx((r[0] + r[3]) / 2)
        assert m[role]["forget_probability"] == pytest.approx(sum(values["probability"]) / 6)
    assert m["base"]["forget_probability"] == report["clean"]["base"]["metrics"]["forget_probability"]
    # the share of each metric from those same values (probability: min_gap 0 here, and the model did forget)
    for k in ("forget_probability", "forget_rougeL_recall"):
        gap = m["base"][k] - m["unlearned"][k]
        assert gap != 0
        expected = (m["attacked"][k] - m["unlearned"][k]) / gap
        assert row["recovered_share"][k] == pytest.approx(expected)


def _write(path, text):
    path.write_text(text)
    return str(path)


def test_paraphrase_file_formats_and_errors(tmp_path):
    from trl_unlearn.evaluation.unlearning_audit import apply_paraphrases

    data = AuditData(forget=FORGET[:2], retain=RETAIN[:2])
    (q0, a0), (_, a1) = QA[0], QA[1]
    lines = _write(
        tmp_path / "p.jsonl",
        json.dumps({"question": q0, "paraphrased_question": "P0"})
        + "\n\n"
        + json.dumps({"question": "P1", "answer": a1})
        + "\n",
    )
    out = apply_paraphrases(data, lines)
    assert [r["paraphrased_question"] for r in out.forget] == ["P0", "P1"]
    assert all("paraphrased_question" not in r for r in out.retain) and out.paraphrase_source == lines
    assert "paraphrased_question" not in data.forget[0]  # the caller's rows are left alone
    listed = _write(
        tmp_path / "p.json", json.dumps([{"question": "P0", "answer": a0}, {"question": "P1", "answer": a1}])
    )
    assert [r["paraphrased_question"] for r in apply_paraphrases(data, listed).forget] == ["P0", "P1"]
    bad = {
        "not json": ("{question: 1}\n", "line 1: not valid JSON"),
        "broken list": ('[{"question": "x"', "not valid JSON"),
        "missing key": (json.dumps({"question": q0}) + "\n", r"row 0: needs non-empty string 'question' and 'answer'"),
        "empty": ("\n", "no rows"),
        "a forget row without one": (json.dumps({"question": q0, "paraphrased_question": "P0"}), "no paraphrase for"),
        "a row matching nothing": (
            "\n".join(
                json.dumps(r)
                for r in [
                    {"question": "P0", "answer": a0},
                    {"question": "P1", "answer": a1},
                    {"question": "nobody asked", "paraphrased_question": "P"},
                ]
            ),
            "1 row\\(s\\) match no forget or retain row",
        ),
        "an answer of two rows": (
            json.dumps({"question": "P", "answer": a0})
            + "\n"
            + json.dumps({"question": FORGET[1]["question"], "paraphrased_question": "P1"}),
            "belongs to several audit rows",
        ),
        "two paraphrases": (
            "\n".join(json.dumps({"question": q0, "paraphrased_question": p}) for p in ("A", "B")),
            "a second, different paraphrase",
        ),
    }
    twice = AuditData(forget=FORGET[:2], retain=[{"question": "another question", "answer": a0}])
    for name, (text, message) in bad.items():
        with pytest.raises(ValueError, match=message) as err:
            apply_paraphrases(twice if name == "an answer of two rows" else data, _write(tmp_path / "bad.jsonl", text))
        assert "\n" not in str(err.value), name


def test_the_paraphrase_probe_asks_the_file_questions(grid_models, tmp_path):
    from trl_unlearn.data.formats import resolve_prompt_format
    from trl_unlearn.evaluation.unlearning_audit import apply_paraphrases, score_qa

    tok, base, small, _ = grid_models
    paras = {r["question"]: "Tell me: " + r["question"].lower() for r in FORGET}
    path = _write(
        tmp_path / "p.jsonl",
        "\n".join(json.dumps({"question": q, "paraphrased_question": p}) for q, p in paras.items()),
    )
    data = apply_paraphrases(AuditData(forget=FORGET, retain=RETAIN), path)
    cfg = AuditConfig(bnb=False, max_new_tokens=4, few_shot=1, num_samples=1, attack_items=1)
    report = audit(small, tok, base, data, attacks="prompt", config=cfg, prompt_format="plain", progress=False)
    row = {r["variant"]: r for r in report["attacks"]}["paraphrase"]
    assert row["settings"]["paraphrases"] == path
    expected = score_qa(small, tok, FORGET, resolve_prompt_format(tok, "plain"), cfg, list(paras.values()), rouge=False)
    assert row["per_item"]["attacked"]["forget"]["probability"] == pytest.approx(expected["probability"])
