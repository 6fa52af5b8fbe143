"""Trainers end to end on a tiny Llama: losses against a naive full-logits computation, data formats, parameters
that change (and those that must not), references, accumulation, resume, metrics, model card."""

import copy
import math

import pytest
import torch
from conftest import QA, cpu_args, prompt_completion, qa_prompt
from datasets import Dataset

from trl_unlearn import (
    GradAscentConfig,
    GradAscentTrainer,
    GradDiffConfig,
    GradDiffTrainer,
    NPOConfig,
    NPOTrainer,
    SimNPOConfig,
    SimNPOTrainer,
)


def naive_terms(model, batch):
    """Summed label log-probs and token counts from full `(B, T, V)` logits: the reference computation."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    labels = batch["input_ids"][:, 1:]
    mask = batch["completion_mask"][:, 1:].float()
    token_logps = logits.log_softmax(-1).gather(-1, labels[..., None]).squeeze(-1)
    return (token_logps * mask).sum(-1), mask.sum(-1)


def first_batch(trainer, size=4):
    pairs = [trainer.train_dataset[(i, i)] for i in range(size)]
    return trainer.data_collator(pairs)


def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_simnpo_loss_matches_naive_full_logits(model, tokenizer, forget_ds, retain_ds, tmp_path):
    args = cpu_args(SimNPOConfig, tmp_path, beta=2.0, gamma=0.5, forget_weight=0.7, retain_weight=0.3)
    trainer = SimNPOTrainer(
        model=model, args=args, forget_dataset=forget_ds, retain_dataset=retain_ds, processing_class=tokenizer
    )
    batch = first_batch(trainer)
    model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch)
        logps, n = naive_terms(model, batch)
    f = batch["forget_mask"]
    forget = (-(2 / 2.0) * torch.nn.functional.logsigmoid(-(2.0 / n[f]) * logps[f] - 0.5)).mean()
    retain = -logps[~f].sum() / n[~f].sum()
    torch.testing.assert_close(loss, 0.7 * forget + 0.3 * retain, rtol=1e-5, atol=1e-6)


def test_npo_loss_and_weights_at_first_step(model, tokenizer, forget_ds, retain_ds, tmp_path):
    args = cpu_args(NPOConfig, tmp_path, beta=0.5, retain_weight=0.0, max_steps=1)
    trainer = NPOTrainer(model=model, args=args, forget_dataset=forget_ds, processing_class=tokenizer)
    # Precomputed reference: no second model is held, and the stored values are the initial model's log-probs
    assert trainer.ref_model is None and trainer.precompute_forget_ref
    batch = first_batch(trainer)
    with torch.no_grad():
        logps, _ = naive_terms(model.eval(), batch)
        torch.testing.assert_close(batch["ref_logps"], logps, rtol=1e-5, atol=1e-5)
        # π = π_ref: every sample's loss is (2/β)·log 2
        torch.testing.assert_close(trainer.compute_loss(model, batch), torch.tensor(4 * math.log(2)))
    trainer.train()
    assert trainer.state.log_history[0]["forget/grad_weight"] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("cls,cfg", [(GradAscentTrainer, GradAscentConfig), (GradDiffTrainer, GradDiffConfig)])
def test_gradient_ascent_baselines(cls, cfg, model, tokenizer, forget_ds, retain_ds, tmp_path):
    trainer = cls(
        model=model,
        args=cpu_args(cfg, tmp_path),
        forget_dataset=forget_ds,
        retain_dataset=retain_ds,
        processing_class=tokenizer,
    )
    batch = first_batch(trainer)
    with torch.no_grad():
        logps, n = naive_terms(model.eval(), batch)
        loss = trainer.compute_loss(model, batch)
    f = batch["forget_mask"]
    expected = logps[f].sum() / n[f].sum()  # GA: token-mean log-likelihood of the forget rows
    if cls is GradDiffTrainer:
        expected = expected - logps[~f].sum() / n[~f].sum()
    else:
        assert f.all()  # GA has no retain term, so no retain rows are even loaded
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def _naive_loss(method, logps, n, f, ref):
    """The trainers' loss on one batch from full-logits log-probs (weights as in `training_grad_case`)."""
    if method == "simnpo":
        forget = (-(2 / 2.0) * torch.nn.functional.logsigmoid(-(2.0 / n[f]) * logps[f] - 0.5)).mean()
    elif method == "npo":
        forget = (-(2 / 0.5) * torch.nn.functional.logsigmoid(-0.5 * (logps[f] - ref))).mean()
    else:  # gradient ascent: token-mean log-likelihood
        forget = logps[f].sum() / n[f].sum()
    retain = -logps[~f].sum() / n[~f].sum()
    return 0.7 * forget + (0.3 * retain if method != "gradascent" else 0.0)


@pytest.mark.parametrize("method", ["simnpo", "npo", "gradascent", "graddiff"])
@pytest.mark.parametrize("tied", [False, True])
def test_training_gradients_match_naive_full_logits(
    method, tied, tokenizer, forget_ds, retain_ds, tmp_path, monkeypatch
):
    """The fused training loss (gradients computed in the forward, `kernels/sequence_loss.py`) gives the full-logits
    autograd gradients for every parameter, trainable head or tied embeddings."""
    import trl_unlearn.modeling
    from trl_unlearn.toy.tiny import tiny_llama

    calls = []
    fused_op = trl_unlearn.modeling.fused_linear_sequence_loss
    monkeypatch.setattr(
        trl_unlearn.modeling, "fused_linear_sequence_loss", lambda *a, **k: calls.append(1) or fused_op(*a, **k)
    )

    cls, cfg, extra = {
        "simnpo": (SimNPOTrainer, SimNPOConfig, dict(beta=2.0, gamma=0.5)),
        "npo": (NPOTrainer, NPOConfig, dict(beta=0.5)),
        "gradascent": (GradAscentTrainer, GradAscentConfig, {}),
        "graddiff": (GradDiffTrainer, GradDiffConfig, {}),
    }[method]
    model = tiny_llama(tokenizer, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, tie_word_embeddings=tied)
    args = cpu_args(cfg, tmp_path, forget_weight=0.7, retain_weight=0.0 if method == "gradascent" else 0.3, **extra)
    trainer = cls(
        model=model, args=args, forget_dataset=forget_ds, retain_dataset=retain_ds, processing_class=tokenizer
    )
    with torch.no_grad():  # move away from the reference, so NPO's weights are not all 1
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    batch = first_batch(trainer)
    model.train()
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    assert calls == [1]  # training went through the fused op
    fused = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logps, n = naive_terms(model, batch)
    f = batch["forget_mask"]
    expected = _naive_loss(method, logps, n, f, batch.get("ref_logps"))
    expected.backward()
    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(fused[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_retain_kl_matches_full_vocab_kl(model, tokenizer, forget_ds, retain_ds, tmp_path):
    args = cpu_args(SimNPOConfig, tmp_path, retain_loss_type="kl", forget_weight=0.0, retain_weight=1.0)
    trainer = SimNPOTrainer(
        model=model, args=args, forget_dataset=forget_ds, retain_dataset=retain_ds, processing_class=tokenizer
    )
    assert trainer.ref_model is not None and trainer.ref_model is not model
    with torch.no_grad():  # move the policy away from the reference
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = first_batch(trainer)
    model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch)
        kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        logp = model(**kw).logits[:, :-1].log_softmax(-1)
        ref = trainer.ref_model(**kw).logits[:, :-1].log_softmax(-1)
    kl = (ref.exp() * (ref - logp)).sum(-1)
    mask = batch["completion_mask"][:, 1:].float() * (~batch["forget_mask"])[:, None]
    torch.testing.assert_close(loss, (kl * mask).sum() / mask.sum(), rtol=1e-4, atol=1e-6)
    assert loss > 0


def _train_and_diff(trainer, model):
    before = params(model)
    trainer.train()
    after = params(model)
    return {n for n in before if not torch.equal(before[n], after[n])}


def test_full_finetune_changes_trainable_and_not_frozen(model, tokenizer, forget_ds, retain_ds, tmp_path):
    for p in model.model.layers[0].parameters():
        p.requires_grad_(False)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    trainer = SimNPOTrainer(
        model=model,
        args=cpu_args(SimNPOConfig, tmp_path, max_steps=3),
        forget_dataset=forget_ds,
        retain_dataset=retain_ds,
        processing_class=tokenizer,
    )
    changed = _train_and_diff(trainer, model)
    assert frozen and not (changed & frozen)
    assert changed == {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_lora_trains_adapters_only(checkpointing, model, tokenizer, forget_ds, retain_ds, tmp_path):
    from peft import LoraConfig

    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    args = cpu_args(SimNPOConfig, tmp_path, max_steps=3, gradient_checkpointing=checkpointing)
    trainer = SimNPOTrainer(
        model=model,
        args=args,
        forget_dataset=forget_ds,
        retain_dataset=retain_ds,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    changed = _train_and_diff(trainer, trainer.model)
    lora = {n for n, _ in trainer.model.named_parameters() if "lora_" in n}
    assert lora and changed == lora


def test_npo_explicit_reference_is_untouched(model, tokenizer, forget_ds, retain_ds, tmp_path):
    ref = copy.deepcopy(model)
    ref_before = params(ref)
    trainer = NPOTrainer(
        model=model,
        ref_model=ref,
        args=cpu_args(NPOConfig, tmp_path, max_steps=3),
        forget_dataset=forget_ds,
        retain_dataset=retain_ds,
        processing_class=tokenizer,
    )
    assert not trainer.precompute_forget_ref
    changed = _train_and_diff(trainer, model)
    assert changed and all(torch.equal(ref_before[n], p) for n, p in ref.named_parameters())


def test_npo_with_peft_uses_adapter_disabled_base(model, tokenizer, forget_ds, retain_ds, tmp_path):
    from peft import LoraConfig

    trainer = NPOTrainer(
        model=model,
        args=cpu_args(NPOConfig, tmp_path, max_steps=3),
        forget_dataset=forget_ds,
        retain_dataset=retain_ds,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
    )
    assert trainer.ref_model is None and not trainer.precompute_forget_ref
    base_before = {n: p.clone() for n, p in trainer.model.named_parameters() if "lora_" not in n}
    trainer.train()
    assert all(torch.equal(base_before[n], p) for n, p in trainer.model.named_parameters() if "lora_" not in n)
    # After training the adapters move π away from π_ref, so the NPO weights are no longer 1
    assert trainer.state.log_history[-2]["forget/grad_weight"] != pytest.approx(1.0, abs=1e-7)


def test_simnpo_never_creates_or_runs_a_reference(model, tokenizer, forget_ds, retain_ds, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(SimNPOTrainer, "_reference_token_logps", lambda *a, **k: calls.append(1))
    trainer = SimNPOTrainer(
        model=model,
        args=cpu_args(SimNPOConfig, tmp_path),
        forget_dataset=forget_ds,
        retain_dataset=retain_ds,
        processing_class=tokenizer,
    )
    trainer.train()
    assert trainer.ref_model is None and not calls
    assert "ref_logps" not in trainer.train_dataset.forget.column_names


def test_gradient_accumulation_2x2_matches_4x1(tokenizer, forget_ds, retain_ds, tmp_path):
    from trl_unlearn.toy.tiny import tiny_llama

    runs = []
    for bs, ga in [(4, 1), (2, 2)]:
        m = tiny_llama(tokenizer, hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
        args = cpu_args(
            SimNPOConfig,
            tmp_path / f"{bs}x{ga}",
            per_device_train_batch_size=bs,
            gradient_accumulation_steps=ga,
            max_steps=3,
            beta=0.5,
        )
        t = SimNPOTrainer(
            model=m, args=args, forget_dataset=forget_ds, retain_dataset=retain_ds, processing_class=tokenizer
        )
        t.train()
        runs.append(([h["loss"] for h in t.state.log_history if "loss" in h], params(m)))
    (loss_a, p_a), (loss_b, p_b) = runs
    assert loss_a == pytest.approx(loss_b, rel=1e-4)
    for n in p_a:
        torch.testing.assert_close(p_a[n], p_b[n], rtol=1e-4, atol=1e-6)


def test_resume_from_checkpoint_reproduces_loss_trace(tokenizer, forget_ds, retain_ds, tmp_path):
    from trl_unlearn.toy.tiny import tiny_llama

    def run(out, resume=None, max_steps=5):
        m = tiny_llama(tokenizer, hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
        args = cpu_args(
            SimNPOConfig,
            tmp_path,
            output_dir=str(out),
            max_steps=max_steps,
            save_strategy="steps",
            save_steps=1,
            beta=0.5,
        )
        t = SimNPOTrainer(
            model=m, args=args, forget_dataset=forget_ds, retain_dataset=retain_ds, processing_class=tokenizer
        )
        t.train(resume_from_checkpoint=resume)
        return {h["step"]: h["loss"] for h in t.state.log_history if "loss" in h}, params(m)

    full, p_full = run(tmp_path / "a")
    # 8 forget rows, batch 4: epochs of 2 steps; step 3 resumes inside the second epoch
    resumed, p_res = run(tmp_path / "a", resume=str(tmp_path / "a" / "checkpoint-3"))
    assert set(resumed) == {1, 2, 3, 4, 5}  # steps 1-3 come from the checkpoint's state, 4-5 are re-run
    assert [resumed[s] for s in (4, 5)] == pytest.approx([full[s] for s in (4, 5)], rel=1e-5)
    for n in p_full:
        torch.testing.assert_close(p_full[n], p_res[n])


def test_retain_pairing_is_seeded_and_epoch_dependent(model, tokenizer, forget_ds, retain_ds, tmp_path):
    trainer = SimNPOTrainer(
        model=model,
        args=cpu_args(SimNPOConfig, tmp_path),
        forget_dataset=forget_ds,
        retain_dataset=retain_ds,
        processing_class=tokenizer,
    )
    sampler = trainer._get_train_sampler()
    epoch0 = list(sampler)
    assert epoch0 == list(trainer._get_train_sampler())  # reproducible from the seed
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert sorted(f for f, _ in epoch0) == list(range(8)) and epoch0 != epoch1
    assert len({r for _, r in epoch0}) == 8  # distinct retain rows within an epoch (24 retain ≥ 8 forget)


def test_logged_metrics(model, tokenizer, forget_ds, retain_ds, tmp_path):
    trainer = SimNPOTrainer(
        model=model,
        args=cpu_args(SimNPOConfig, tmp_path, eval_strategy="steps", eval_steps=2),
        forget_dataset=forget_ds,
        retain_dataset=retain_ds,
        processing_class=tokenizer,
        eval_dataset={"forget": forget_ds, "retain": retain_ds},
    )
    trainer.train()
    train_log = trainer.state.log_history[0]
    for key in [
        "loss",
        "forget/loss",
        "retain/loss",
        "forget/logps_per_token",
        "forget/grad_weight",
        "num_tokens/forget",
        "num_tokens/retain",
    ]:
        assert key in train_log, key
    eval_log = next(h for h in trainer.state.log_history if "eval_loss" in h)
    assert "eval_forget/loss" in eval_log and eval_log["eval_num_tokens/forget"] > 0


def _completion_text(trainer, tokenizer, row=0):
    batch = first_batch(trainer, 1)
    ids, mask = batch["input_ids"][0], batch["completion_mask"][0].bool()
    return tokenizer.decode(ids[mask])


@pytest.mark.parametrize("fmt", ["prompt_completion", "conversational", "text", "messages"])
def test_forget_retain_formats(fmt, model, tokenizer, tmp_path):
    q, a = QA[0]
    if fmt == "prompt_completion":
        make, expected = (lambda rows: prompt_completion(rows)), f" {a}</s>"
    elif fmt == "conversational":
        make, expected = (lambda rows: prompt_completion(rows, conversational=True)), f" {a}</s>\n"
    elif fmt == "text":
        make = lambda rows: Dataset.from_dict({"text": [qa_prompt(q) + " " + a for q, a in rows]})  # noqa: E731
        expected = tokenizer.decode(tokenizer(qa_prompt(q) + " " + a + "</s>").input_ids[1:])
    else:
        make = lambda rows: Dataset.from_dict(  # noqa: E731
            {"messages": [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in rows]}
        )
        messages = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        full = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        expected = tokenizer.decode(full[1:])
    trainer = SimNPOTrainer(
        model=model,
        args=cpu_args(SimNPOConfig, tmp_path, max_steps=1),
        forget_dataset=make(QA[:4]),
        retain_dataset=make(QA[4:12]),
        processing_class=tokenizer,
    )
    trainer.train_dataset.forget = trainer.train_dataset.forget.select([0])
    assert _completion_text(trainer, tokenizer) == expected
    trainer.train()


@pytest.mark.parametrize("kind", ["paired", "unpaired"])
def test_drop_in_preference_datasets(kind, model, tokenizer, tmp_path):
    rows = QA[:6]
    if kind == "paired":
        ds = Dataset.from_dict(
            {
                "prompt": [qa_prompt(q) for q, _ in rows],
                "chosen": [" I don't know." for _ in rows],
                "rejected": [" " + a for _, a in rows],
            }
        )
    else:
        ds = Dataset.from_dict(
            {
                "prompt": [qa_prompt(q) for q, _ in rows] * 2,
                "completion": [" " + a for _, a in rows] + [" I don't know." for _ in rows],
                "label": [False] * 6 + [True] * 6,
            }
        )
    trainer = SimNPOTrainer(
        model=model, args=cpu_args(SimNPOConfig, tmp_path, max_steps=1), train_dataset=ds, processing_class=tokenizer
    )
    assert len(trainer.train_dataset.forget) == 6 and len(trainer.train_dataset.retain) == 6
    pair = trainer.data_collator([trainer.train_dataset[(0, 0)]])
    forget_text = tokenizer.decode(pair["input_ids"][0][pair["completion_mask"][0].bool()])
    retain_text = tokenizer.decode(pair["input_ids"][1][pair["completion_mask"][1].bool()])
    assert forget_text.startswith(" Author") and retain_text == " I don't know.</s>"
    trainer.train()


def test_zero_scored_rows_dropped_with_count(model, tokenizer, retain_ds, tmp_path, caplog):
    forget = Dataset.from_dict(
        {"prompt": ["word " * 60 + "?", qa_prompt(QA[0][0])], "completion": [" x", " " + QA[0][1]]}
    )
    with caplog.at_level("WARNING"):
        trainer = SimNPOTrainer(
            model=model,
            args=cpu_args(SimNPOConfig, tmp_path, max_length=32),
            forget_dataset=forget,
            retain_dataset=retain_ds,
            processing_class=tokenizer,
        )
    assert len(trainer.train_dataset.forget) == 1
    assert "Dropped 1 of 2 forget examples" in caplog.text


def test_model_card(model, tokenizer, forget_ds, retain_ds, tmp_path):
    trainer = SimNPOTrainer(
        model=model,
        args=cpu_args(SimNPOConfig, tmp_path, max_steps=1),
        forget_dataset=forget_ds,
        retain_dataset=retain_ds,
        processing_class=tokenizer,
    )
    trainer.train()
    trainer.evaluation_summary = {"forget_quality": 0.5}
    trainer.save_model()
    card = (tmp_path / "out" / "README.md").read_text()
    for needle in [
        "SimNPO",
        "2410.07163",
        "trl-unlearn",
        "unlearning",
        "simnpo",
        "Forget data: 8 examples",
        "Retain data: 24 examples",
        "`beta` | 2.5",
        "approximate",
        "forget_quality: 0.5",
        "@article{fan2024",
    ]:
        assert needle in card, needle


def test_group_by_length_cuts_padding_and_keeps_every_row(model, tokenizer, tmp_path):
    rows = [(f"Q{i}?", "word " * (1 + (i * 7) % 23)) for i in range(32)]
    forget = prompt_completion(rows)
    retain = prompt_completion([(f"R{i}?", a) for i, (_, a) in enumerate(rows[::-1])])  # disjoint from forget

    def padding(strategy):
        args = cpu_args(SimNPOConfig, tmp_path, per_device_train_batch_size=4, train_sampling_strategy=strategy)
        trainer = SimNPOTrainer(
            model=model, args=args, forget_dataset=forget, retain_dataset=retain, processing_class=tokenizer
        )
        pairs = list(trainer._get_train_sampler())
        assert sorted(f for f, _ in pairs) == list(range(32)) and sorted(r for _, r in pairs) == list(range(32))
        pad = 0
        for i in range(0, 32, 4):
            batch = trainer.data_collator([trainer.train_dataset[p] for p in pairs[i : i + 4]])
            f = batch["forget_mask"]
            pad += (batch["attention_mask"][f] == 0).sum().item()
        return pad

    assert padding("group_by_length") < padding("random") / 2
