"""The hidden-state probe finds an answer that is planted in the hidden states but hidden from the output: a tiny
model learns which colour word answers each question, then its LM head is scrambled (each token's row moved to the
next token), so the output never names the colour while the last layer still encodes it linearly."""

import copy

import pytest
import torch
from audit_toy import qa_batch, train

from trl_unlearn.data.formats import resolve_prompt_format
from trl_unlearn.evaluation.hidden_probe import hidden_probe, linear_probe_accuracy, probe_targets
from trl_unlearn.evaluation.unlearning_audit import AuditConfig, AuditData, audit
from trl_unlearn.toy.tiny import tiny_llama, train_tokenizer

THINGS = {"apple": "red", "sky": "blue", "grass": "green", "banana": "yellow"}
ROWS = [
    {"question": f"What colour is the {thing} number {i}?", "answer": f"{colour} is the colour of {thing} {i}."}
    for i in range(10)
    for thing, colour in THINGS.items()
]
RETAIN, FORGET = ROWS[:28], ROWS[28:]  # every colour in both


@pytest.fixture(scope="module")
def planted():
    tok = train_tokenizer([f"Question: {r['question']}\nAnswer: {r['answer']}" for r in ROWS], vocab_size=300)
    model = tiny_llama(tok, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, seed=0)
    train(model, qa_batch(tok, ROWS), steps=80, lr=1e-2)
    scrambled = copy.deepcopy(model)
    with torch.no_grad():
        w = scrambled.get_output_embeddings().weight
        w.copy_(torch.roll(w, shifts=1, dims=0))  # token t now gets the logit token t-1 had
    return tok, model, scrambled


def test_probe_targets_first_answer_token_and_tofu_fact_token(planted):
    tok, _, _ = planted
    fmt = resolve_prompt_format(tok, "plain")
    contexts, labels = probe_targets(tok, RETAIN[:1], fmt)
    assert contexts[0] == fmt.prompt_ids(tok, RETAIN[0]["question"])
    assert labels[0] == fmt.answer_ids(tok, "red is the colour of apple 0.")[0]
    row = {
        "question": "What colour is the sky number 1?",
        "answer": "blue",
        "paraphrased_answer": "the colour of sky 1 is blue.",
        "perturbed_answer": ["the colour of sky 1 is red."],
    }
    contexts, labels = probe_targets(tok, [row], fmt)
    prompt = fmt.prompt_ids(tok, row["question"])
    # the context is the prompt and the paraphrase up to the fact; the label is the fact's first token
    assert contexts[0][: len(prompt)] == prompt
    assert tok.decode(contexts[0][len(prompt) :]) == " the colour of sky 1 is"
    assert " blue".startswith(tok.decode([labels[0]])) and not " red".startswith(tok.decode([labels[0]]))


def test_linear_probe_accuracy_by_hand():
    x = [[0.0], [1.0], [10.0], [11.0]]
    y = [0, 0, 1, 1]
    assert linear_probe_accuracy(x, y, [[0.5], [10.5], [0.2]], [0, 1, 1]) == pytest.approx(2 / 3)
    assert linear_probe_accuracy(x, [1, 1, 1, 1], x, y) is None  # one class: nothing to fit


def test_probe_finds_the_planted_answer_behind_a_scrambled_head(planted):
    tok, model, scrambled = planted
    fmt = resolve_prompt_format(tok, "plain")
    clean = hidden_probe(model, tok, RETAIN, FORGET, fmt)
    assert clean["output_accuracy"] == 1.0  # the model answers every colour
    hidden = hidden_probe(scrambled, tok, RETAIN, FORGET, fmt)
    assert hidden["output_accuracy"] == 0.0  # the scrambled head never names it
    assert max(hidden["lens_accuracy"]) == 0.0
    assert hidden["probe_accuracy"][-1] == 1.0  # the last layer still holds it, linearly
    assert hidden["best_probe_accuracy"] == 1.0 and hidden["test_labels_unseen_in_training"] == 0


def test_audit_reports_the_probe_as_recovered(planted):
    tok, model, scrambled = planted
    report = audit(
        scrambled,
        tok,
        model,
        AuditData(forget=FORGET, retain=RETAIN),
        attacks="hidden_probe",
        config=AuditConfig(max_new_tokens=8),
        prompt_format="plain",
        progress=False,
    )
    (res,) = report["attacks"]
    key = "forget_answer_token_accuracy"
    assert res["metrics"]["base"][key] == 1.0 and res["metrics"]["unlearned"][key] == 0.0
    assert res["recovered_share"][key] == 1.0
    assert report["complete"]
