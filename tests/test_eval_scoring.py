"""Batched scoring and generation (`trl_unlearn.evaluation.scoring`) against one-at-a-time and naive references."""

import numpy as np
import pytest
import torch

from trl_unlearn.data import PROMPT_TEMPLATE, resolve_prompt_format
from trl_unlearn.evaluation.scoring import generate_answers, score_answers, score_texts
from trl_unlearn.toy.tiny import tiny_llama

QUESTIONS = [
    "Who wrote book 3?",
    "Who wrote book 12, the one about the lazy dog and the quick brown fox?",
    "Who?",
    "Who wrote book 7?",
    "Who wrote book 3?",
]
ANSWERS = [
    "Author 3.",
    "Author 12 wrote book 12 in year 1936, and the quick brown fox jumps over the lazy dog twice.",
    "Author 1 wrote book 1 in year 1903.",
    "",
    "the quick brown fox jumps over the lazy dog, then the quick brown fox jumps over the lazy dog again",
]


@pytest.fixture(scope="module")
def lm(tokenizer):
    return tiny_llama(tokenizer, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, seed=3).eval()


def _naive_logps(model, ids, start):
    """Full-logits reference: log-probs of ids[start:] given the prefix, for one unpadded sequence."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
    lp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)
    return lp[start - 1 :].numpy(), torch.log_softmax(logits, -1)[start - 1 :]


@pytest.mark.parametrize("prompt_format", ["plain", "chat"])
def test_batched_scoring_equals_one_at_a_time(lm, tokenizer, prompt_format):
    batched = score_answers(
        lm, tokenizer, QUESTIONS, ANSWERS, prompt_format=prompt_format, batch_size=3, return_token_logps=True
    )
    single = score_answers(
        lm, tokenizer, QUESTIONS, ANSWERS, prompt_format=prompt_format, batch_size=1, group_by_length=False,
        return_token_logps=True,
    )  # fmt: skip
    assert len(set(batched.num_tokens.tolist())) >= 4  # the lengths really vary, so batches are padded
    np.testing.assert_array_equal(batched.num_tokens, single.num_tokens)
    np.testing.assert_allclose(batched.avg_nll, single.avg_nll, atol=1e-5, rtol=0)
    np.testing.assert_allclose(batched.sum_logp, single.sum_logp, atol=1e-4, rtol=0)
    for a, b in zip(batched.token_logps, single.token_logps):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_scoring_matches_naive_full_logits_and_counts_eos(lm, tokenizer):
    res = score_answers(lm, tokenizer, QUESTIONS, ANSWERS, prompt_format="plain", batch_size=4, return_token_logps=True)
    for i, (q, a) in enumerate(zip(QUESTIONS, ANSWERS)):
        prompt = tokenizer(PROMPT_TEMPLATE.format(question=q))["input_ids"]
        answer = tokenizer(" " + a, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ref, _ = _naive_logps(lm, prompt + answer, len(prompt))
        assert res.num_tokens[i] == len(answer)  # answer tokens plus EOS
        np.testing.assert_allclose(res.token_logps[i], ref, atol=1e-5, rtol=0)
        assert res.avg_nll[i] == pytest.approx(-ref.mean(), abs=1e-5)


def test_vocab_stats_match_full_softmax(lm, tokenizer):
    texts = [q + " " + a for q, a in zip(QUESTIONS, ANSWERS)]
    fused = score_texts(lm, tokenizer, texts, batch_size=2)
    stats = score_texts(lm, tokenizer, texts, batch_size=2, vocab_stats=True)
    for i, t in enumerate(texts):
        ids = tokenizer(t)["input_ids"]
        ref, logp = _naive_logps(lm, ids, 1)
        logp = torch.log_softmax(logp.double(), -1)  # float64 reference (the float32 one-pass formula cancels)
        p = logp.exp()
        mu = (p * logp).sum(-1)
        sigma = ((p * logp**2).sum(-1) - mu**2).sqrt()
        np.testing.assert_allclose(stats.token_logps[i], ref, atol=1e-5, rtol=0)
        np.testing.assert_allclose(fused.token_logps[i], ref, atol=1e-5, rtol=0)
        np.testing.assert_allclose(stats.token_mu[i], mu.numpy(), atol=1e-5, rtol=0)
        np.testing.assert_allclose(stats.token_sigma[i], sigma.numpy(), atol=1e-5, rtol=0)
        assert fused.num_tokens[i] == len(ids) - 1  # every token after the first


def test_answer_truncated_to_nothing_names_the_item(lm, tokenizer):
    long_q = "Who wrote book 12, the one about the lazy dog and the quick brown fox?"
    with pytest.raises(ValueError, match=r"forget\.json item 1 \(paraphrased\).*no answer token"):
        score_answers(
            lm, tokenizer, ["Who?", long_q], ["a", "b"], prompt_format="plain", max_length=8,
            names=["forget.json item 0 (answer)", "forget.json item 1 (paraphrased)"],
        )  # fmt: skip
    # cut inside the answer: still scored, on the tokens that are left
    prompt_len = len(tokenizer(PROMPT_TEMPLATE.format(question="Who?"))["input_ids"])
    res = score_answers(lm, tokenizer, ["Who?"], [ANSWERS[1]], prompt_format="plain", max_length=prompt_len + 3)
    assert res.num_tokens.tolist() == [3]


def test_prompt_formats(tokenizer):
    chat = resolve_prompt_format(tokenizer, "auto")  # the tiny tokenizer has a chat template
    assert chat.name == "chat_template"
    text = tokenizer.decode(chat.prompt_ids(tokenizer, "Who?"))
    assert text.startswith("<|user|> Who?") and text.rstrip().endswith("<|assistant|>")
    plain = resolve_prompt_format(tokenizer, "plain")
    assert plain.name == PROMPT_TEMPLATE and plain.answer_prefix == " "
    assert tokenizer.decode(plain.prompt_ids(tokenizer, "Who?")) == "Question: Who?\nAnswer:"
    assert resolve_prompt_format(tokenizer, "Q: {question}\nA: ").answer_prefix == ""
    with pytest.raises(ValueError):
        resolve_prompt_format(tokenizer, "no field here")


def test_batched_left_padded_generation_equals_one_at_a_time(lm, tokenizer):
    questions = QUESTIONS[:4] + ["Who wrote book 30?", "the quick brown fox"]
    batched = generate_answers(lm, tokenizer, questions, max_new_tokens=12, batch_size=4, prompt_format="plain")
    single = [
        generate_answers(lm, tokenizer, [q], max_new_tokens=12, batch_size=1, prompt_format="plain")[0]
        for q in questions
    ]
    assert batched == single
    assert len(set(batched)) > 1  # not a degenerate constant output


def test_generation_matches_manual_greedy_and_stop_strings(lm, tokenizer):
    q = "Who wrote book 12, the one about the lazy dog and the quick brown fox?"
    ids = tokenizer(PROMPT_TEMPLATE.format(question=q))["input_ids"]
    seq = list(ids)
    with torch.no_grad():
        for _ in range(6):
            nxt = int(lm(input_ids=torch.tensor([seq])).logits[0, -1].argmax())
            if nxt == tokenizer.eos_token_id:
                break
            seq.append(nxt)
    manual = tokenizer.decode(seq[len(ids) :], skip_special_tokens=True)
    got = generate_answers(lm, tokenizer, [q, "Who?"], max_new_tokens=6, batch_size=2, prompt_format="plain",
                           postprocess=None)  # fmt: skip
    assert got[0] == manual
    assert len(manual) > 1
    stop = manual[len(manual) // 2 :]
    cut = generate_answers(lm, tokenizer, [q], max_new_tokens=6, prompt_format="plain", postprocess=None,
                           stop_strings=["never there", stop])  # fmt: skip
    assert cut == [manual[: manual.find(stop)]]


def test_tofu_scores_without_generation_are_evaluate_tofus(lm, tokenizer, tmp_path):
    """`score_tofu_sets` (public, used by the example studies) gives the columns `evaluate_tofu` reports, an item's
    answer NLL is `score_answers` on that pair, and `truth_ratios` is the report's truth ratio."""
    from trl_unlearn.data.files import write_tofu_layout
    from trl_unlearn.evaluation.tofu import evaluate_tofu, load_tofu_eval_sets, score_tofu_sets, truth_ratios
    from trl_unlearn.toy.synthetic import make_tofu_like

    folder = write_tofu_layout(tmp_path / "tofu", make_tofu_like(num_authors=10, questions_per_author=2, seed=0))
    report = evaluate_tofu(lm, tokenizer, folder, "forget10", prompt_format="plain", max_new_tokens=2)
    sets = load_tofu_eval_sets(folder, "forget10")
    cols = score_tofu_sets(lm, tokenizer, sets, ("forget", "world_facts"), prompt_format="plain")
    assert set(cols) == {"forget", "world_facts"}
    for s, c in cols.items():
        for key, values in c.items():
            np.testing.assert_allclose(
                np.array(values, dtype=float),
                np.array(report.per_item[s][key], dtype=float),
                rtol=1e-5,
                atol=1e-6,
                err_msg=f"{s}/{key}",
            )
        np.testing.assert_allclose(truth_ratios(c, s), report.per_item[s]["truth_ratio"], rtol=1e-5)
    row = sets["forget"][0][1]
    one = score_answers(lm, tokenizer, [row["question"]], [row["answer"]], prompt_format="plain")
    assert cols["forget"]["avg_nll_answer"][1] == pytest.approx(one.avg_nll[0].item(), rel=1e-5)
