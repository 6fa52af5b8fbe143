"""Relearning attack (`trl_unlearn.evaluation.relearn`): a tiny model that learned some QA pairs, then unlearned
them with gradient ascent, gets them back when fine-tuned on a few of them; the caller's model is never touched."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import QA, cpu_args, prompt_completion

from trl_unlearn import GradAscentConfig, GradAscentTrainer
from trl_unlearn.cli.relearn import run_relearn
from trl_unlearn.data import resolve_prompt_format
from trl_unlearn.data.files import write_tofu_layout
from trl_unlearn.evaluation import evaluate_tofu
from trl_unlearn.evaluation.relearn import relearning_attack, select_relearn_indices
from trl_unlearn.evaluation.relearn_curve import RelearnCurve, plot_relearn_curves
from trl_unlearn.evaluation.scoring import score_answers
from trl_unlearn.toy.synthetic import make_tofu_like
from trl_unlearn.toy.tiny import tiny_llama

FORGET = [{"question": q, "answer": a} for q, a in QA[:8]]
RETAIN = [{"question": q, "answer": a} for q, a in QA[8:16]]


def forget_probability(model, tokenizer, rows=FORGET):
    res = score_answers(
        model, tokenizer, [r["question"] for r in rows], [r["answer"] for r in rows], prompt_format="plain"
    )
    return float(np.exp(-res.avg_nll).mean())


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


@pytest.fixture(scope="module")
def unlearned(tokenizer, tmp_path_factory):
    """A tiny Llama that learned FORGET + RETAIN (plain prompt format), then had FORGET unlearned by gradient ascent.
    Returns (model, forget probability after learning, after unlearning)."""
    model = tiny_llama(tokenizer, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, seed=1)
    fmt = resolve_prompt_format(tokenizer, "plain")
    seqs = [(fmt.prompt_ids(tokenizer, r["question"]), fmt.answer_ids(tokenizer, r["answer"])) for r in FORGET + RETAIN]
    width = max(len(p) + len(a) for p, a in seqs)
    ids = torch.full((len(seqs), width), tokenizer.pad_token_id)
    labels = torch.full((len(seqs), width), -100)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (p, a) in enumerate(seqs):
        ids[i, : len(p) + len(a)] = torch.tensor(p + a)
        labels[i, len(p) : len(p) + len(a)] = torch.tensor(a)
        attn[i, : len(p) + len(a)] = 1
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(150):  # plain full-batch NLL on the answers: the model learns the pairs
        loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    learned = forget_probability(model, tokenizer)

    out = tmp_path_factory.mktemp("ga")
    args = cpu_args(GradAscentConfig, out, max_steps=6, learning_rate=1e-2, per_device_train_batch_size=8)
    GradAscentTrainer(
        model=model, args=args, forget_dataset=prompt_completion(QA[:8]), processing_class=tokenizer
    ).train()
    model.eval()
    return model, learned, forget_probability(model, tokenizer)


def test_unlearned_fixture_learned_then_forgot(unlearned):
    _, learned, forgotten = unlearned
    assert learned > 0.5
    assert forgotten < 0.5 * learned


def test_relearning_brings_forget_probability_back_and_leaves_model_alone(unlearned, tokenizer):
    model, learned, forgotten = unlearned
    before = snapshot(model)
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    rng_before = torch.get_rng_state()

    curve = relearning_attack(
        model,
        tokenizer,
        FORGET,
        retain_rows=RETAIN,
        fraction=0.25,
        steps=12,
        eval_every=4,
        learning_rate=1e-2,
        batch_size=2,
        seed=3,
        prompt_format="plain",
        max_new_tokens=24,
    )

    assert curve.steps == [0, 4, 8, 12]
    assert len(curve.train_loss) == 12
    assert curve.indices == select_relearn_indices(8, 0.25, 3) and len(curve.indices) == 2
    start, end = curve.metrics[0], curve.metrics[-1]
    # step 0 is the unlearned model as given; the whole forget set comes back, relearned rows and the others
    assert start["forget_probability"] == pytest.approx(forgotten, rel=1e-5)
    assert end["forget_probability"] > start["forget_probability"] + 0.2
    assert end["forget_probability_relearned"] > start["forget_probability_relearned"] + 0.2
    assert end["forget_probability_unseen"] > start["forget_probability_unseen"]
    assert end["forget_rougeL_recall"] > start["forget_rougeL_recall"]
    assert {"retain_probability", "retain_rougeL_recall"} <= set(end)
    # the caller's model: same weights, same mode, same requires_grad flags, and its RNG stream untouched
    after = snapshot(model)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert not model.training
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng_before)


def test_subset_size_and_seed():
    for n, fraction, k in [
        (8, 0.25, 2),
        (8, 0.01, 1),
        (8, 1.0, 8),
        (40, 0.1, 4),
        (10, 0.25, 3),
        (10, 0.15, 2),
        (400, 0.1, 40),
    ]:
        idx = select_relearn_indices(n, fraction, seed=0)
        assert len(idx) == k == max(1, math.floor(fraction * n + 0.5)), (n, fraction)
        assert idx == sorted(set(idx)) and 0 <= idx[0] and idx[-1] < n
        assert select_relearn_indices(n, fraction, seed=0) == idx  # reproducible
    assert len({tuple(select_relearn_indices(40, 0.1, seed=s)) for s in range(5)}) > 1  # the seed matters
    for bad in [0.0, -0.1, 1.5]:
        with pytest.raises(ValueError, match="fraction"):
            select_relearn_indices(8, bad)


def test_seeded_runs_repeat_and_custom_evaluate(unlearned, tokenizer):
    model, _, _ = unlearned
    seen_modes = []

    def evaluate(m):
        seen_modes.append((m.training, torch.is_grad_enabled()))
        assert m is not model
        return {"forget_probability": forget_probability(m, tokenizer), "label": "x"}

    kw = dict(
        fraction=0.5,
        steps=4,
        eval_every=3,
        learning_rate=1e-3,
        batch_size=3,
        seed=7,
        prompt_format="plain",
        evaluate=evaluate,
    )
    a = relearning_attack(model, tokenizer, FORGET, **kw)
    b = relearning_attack(model, tokenizer, FORGET, **kw)
    assert a.steps == [0, 3, 4] and a.settings["evaluation"] == "custom"
    assert seen_modes == [(False, False)] * 6
    assert a.indices == b.indices and a.train_loss == b.train_loss
    assert a.series("forget_probability") == b.series("forget_probability")
    assert set(a.metrics[0]) == {"forget_probability", "label"}
    c = relearning_attack(model, tokenizer, FORGET, **{**kw, "seed": 8})
    assert c.train_loss != a.train_loss


def test_curve_json_roundtrip_table_and_plot(unlearned, tokenizer, tmp_path):
    model, _, _ = unlearned
    curve = relearning_attack(
        model,
        tokenizer,
        [(r["question"], r["answer"]) for r in FORGET],
        indices=[1, 5],
        steps=2,
        eval_every=1,
        learning_rate=1e-3,
        prompt_format="plain",
        rouge=False,
    )
    assert curve.indices == [1, 5] and curve.fraction == 0.25 and curve.steps == [0, 1, 2]
    assert "forget_rougeL_recall" not in curve.metrics[0]
    path = tmp_path / "sub" / "curve.json"
    curve.save(path)
    loaded = RelearnCurve.load(path)
    assert loaded == curve
    assert json.loads(path.read_text())["indices"] == [1, 5]
    table = curve.table()
    assert "forget_probability" in table and "2 of 8 forget rows" in table
    assert len([line for line in table.splitlines() if line.split() and line.split()[0] in {"0", "1", "2"}]) == 3
    pytest.importorskip("matplotlib")
    plot_relearn_curves(
        {"ga": curve, "again": loaded}, "forget_probability", path=tmp_path / "curve.png", reference=0.1
    )
    assert (tmp_path / "curve.png").stat().st_size > 0


def test_peft_model_is_merged_in_the_copy_and_left_alone(unlearned, tokenizer):
    from peft import LoraConfig, get_peft_model

    model, _, _ = unlearned
    peft_model = get_peft_model(
        tiny_llama(tokenizer, hidden_size=32, num_hidden_layers=2, num_attention_heads=2),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    before = snapshot(peft_model)
    seen = []

    def evaluate(m):  # the attacked copy: adapters merged, every weight trainable
        seen.append((type(m).__name__, all(p.requires_grad for p in m.parameters())))
        return {"forget_probability": forget_probability(m, tokenizer)}

    curve = relearning_attack(
        peft_model,
        tokenizer,
        FORGET,
        fraction=0.5,
        steps=3,
        eval_every=3,
        learning_rate=1e-2,
        prompt_format="plain",
        evaluate=evaluate,
    )
    assert seen == [("LlamaForCausalLM", True)] * 2
    assert curve.metrics[-1]["forget_probability"] != curve.metrics[0]["forget_probability"]
    after = snapshot(peft_model)
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)
    assert type(peft_model).__name__ == "PeftModel"


def test_bad_arguments(unlearned, tokenizer):
    model, _, _ = unlearned
    with pytest.raises(ValueError, match="'question' and 'answer'"):
        relearning_attack(model, tokenizer, [{"prompt": "q", "completion": "a"}])
    with pytest.raises(ValueError, match="forget_rows"):
        relearning_attack(model, tokenizer)
    with pytest.raises(ValueError, match="both data_dir and split"):
        relearning_attack(model, tokenizer, FORGET, data_dir="x")
    with pytest.raises(ValueError, match="indices"):
        relearning_attack(model, tokenizer, FORGET, indices=[8])
    with pytest.raises(ValueError, match="eval_every"):
        relearning_attack(model, tokenizer, FORGET, steps=2, eval_every=0)


def test_tofu_evaluation_per_checkpoint(unlearned, tokenizer, tmp_path):
    """With data_dir/split, each checkpoint is a full `evaluate_tofu`; a retain report of the unlearned model itself
    gives forget quality 1 at step 0, which proves step 0 evaluates the model as given."""
    model, _, _ = unlearned
    data = make_tofu_like(num_authors=10, questions_per_author=2, seed=0)
    folder = write_tofu_layout(tmp_path / "tofu", data)
    kw = dict(prompt_format="plain", max_new_tokens=4, batch_size=16)
    reference = evaluate_tofu(model, tokenizer, folder, "forget10", **kw)
    curve = relearning_attack(
        model,
        tokenizer,
        data_dir=folder,
        split="forget10",
        retain_report=reference,
        fraction=0.5,
        steps=2,
        eval_every=2,
        learning_rate=1e-2,
        eval_batch_size=16,
        prompt_format="plain",
        max_new_tokens=4,
    )
    assert curve.steps == [0, 2] and curve.num_forget_rows == 2 and len(curve.indices) == 1
    start = curve.metrics[0]
    assert start["forget_quality"] == pytest.approx(1.0)
    assert reference.metrics["forget_quality"] is None  # the reference run itself had no retain report
    for k, v in reference.metrics.items():
        if k != "forget_quality":
            assert start[k] == pytest.approx(v, rel=1e-6, abs=1e-9), k
    assert {"forget_probability_relearned", "forget_probability_unseen", "model_utility"} <= set(curve.metrics[1])
    assert curve.metrics[1]["forget_probability_relearned"] > start["forget_probability_relearned"]
    assert curve.settings["evaluation"] == "tofu" and curve.settings["split"] == "forget10"


def test_cli_function(unlearned, tokenizer, tmp_path, capsys):
    import argparse

    from trl_unlearn.cli.relearn import register_relearn

    model, _, _ = unlearned
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    folder = write_tofu_layout(tmp_path / "tofu", make_tofu_like(num_authors=10, questions_per_author=2, seed=0))
    parser = argparse.ArgumentParser()
    register_relearn(parser.add_subparsers(dest="command"))
    out = tmp_path / "curve.json"
    args = parser.parse_args(
        [
            "relearn",
            "--model",
            str(tmp_path / "model"),
            "--data_dir",
            str(folder),
            "--split",
            "forget10",
            "--output",
            str(out),
            "--metrics",
            "probe",
            "--steps",
            "2",
            "--learning_rate",
            "1e-3",
            "--max_new_tokens",
            "4",
            "--device",
            "cpu",
            "--prompt_format",
            "plain",
            "--no_progress",
        ]
    )
    assert args.func is run_relearn
    assert args.func(args) == 0
    curve = RelearnCurve.load(out)
    assert curve.steps == [0, 1, 2] and curve.num_forget_rows == 2 and curve.settings["split"] == "forget10"
    assert "curve written to" in capsys.readouterr().out
