"""UNDIAL, CE-U and PDU end to end on a tiny Llama: the first-step loss and gradient norm against open-unlearning's
formulas (written here in plain torch on full logits, as its code computes them, and as the papers define them),
forgetting on learned facts, accumulation invariance, PDU's dual variable, and the errors a user meets."""

import copy
import json
import types

import pytest
import torch
import torch.nn.functional as F
from conftest import QA, cpu_args, prompt_completion, qa_prompt

from trl_unlearn import CEUConfig, CEUTrainer, PDUConfig, PDUTrainer, UNDIALConfig, UNDIALTrainer
from trl_unlearn.methods.pdu import DualAscentCallback, dual_step
from trl_unlearn.reference import scored_labels
from trl_unlearn.toy.tiny import tiny_llama


def tiny(tokenizer, seed=0):
    return tiny_llama(tokenizer, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, seed=seed)


@pytest.fixture(scope="module")
def learned(tokenizer):
    """Weights of a tiny Llama that has learned the forget facts (QA[:8]) and the retain ones (QA[8:16])."""
    model = tiny(tokenizer, seed=1)
    rows = [qa_prompt(q) + " " + a + "</s>" for q, a in QA[:16]]
    enc = tokenizer(rows, padding=True, return_tensors="pt")
    labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        loss = model(**enc, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.state_dict()


def learned_model(tokenizer, learned):
    model = tiny(tokenizer, seed=1)
    model.load_state_dict(learned)
    return model


def first_batch(trainer, size=4):
    retain = trainer.train_dataset.retain is not None
    return trainer.data_collator([trainer.train_dataset[(i, i if retain else -1)] for i in range(size)])


def grad_norm(model):
    return torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters() if p.grad is not None)).item()


def ours(trainer, model, batch):
    """Our first-step loss and gradient norm on `batch` (normalised over the batch, as one step of it)."""
    model.zero_grad()
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    return loss.item(), grad_norm(model)


def theirs(model, formula):
    """A formula's loss and gradient norm (full logits, autograd)."""
    model.zero_grad()
    loss = formula()
    loss.backward()
    return loss.item(), grad_norm(model)


def rows_of(batch, rows):
    return {
        "input_ids": batch["input_ids"][rows],
        "attention_mask": batch["attention_mask"][rows],
        "labels": scored_labels(batch)[rows],
    }


# ------------------------------------------------------------------------------- open-unlearning's formulas --
def ou_undial(model, teacher, inputs, beta, scored_only):
    """`compute_undial_loss` of open-unlearning (src/trainer/utils.py); `scored_only=False` as it computes it (a mean
    over every position, prompt and padding included, the -100 label wrapping to index V - 100), True as the paper
    defines it (a mean over the answer tokens)."""
    logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits[:, :-1]
    labels = inputs["labels"][:, 1:]
    with torch.no_grad():
        teacher_logits = teacher(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits[:, :-1]
    mask = torch.zeros_like(teacher_logits)
    mask[torch.arange(mask.shape[0])[:, None, None], torch.arange(mask.shape[1])[None, :, None], labels[..., None]] = 1
    soft = F.softmax(teacher_logits - mask * beta, dim=-1)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), soft.reshape(-1, soft.shape[-1]), reduction="none")
    return loss[(labels != -100).reshape(-1)].mean() if scored_only else loss.mean()


def ou_ceu(model, inputs, n):
    """`compute_batch_ceu` of open-unlearning (src/trainer/unlearn/ceu.py)."""
    logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    labels = inputs["labels"]
    valid = labels != -100
    labels = labels.masked_fill((valid.cumsum(-1) <= n) & valid, -100)[:, 1:]
    logits = logits[:, :-1]
    keep = labels != -100
    target = logits[keep].detach().clone().scatter(-1, labels[keep][:, None], float("-inf")).softmax(-1)
    return F.cross_entropy(logits[keep], target)


def ou_pdu(model, forget, retain, lam, eps, shifted):
    """open-unlearning's PDU loss (src/trainer/unlearn/pdu.py): `gamma·forget + alpha·(retain − eps)`, its forget
    term on the logits at the positions whose OWN label is set (`shifted=False`, as it computes it) or at the
    positions that predict a label (`shifted=True`, as the paper's per-token loss and the other methods count)."""
    logits = model(input_ids=forget["input_ids"], attention_mask=forget["attention_mask"]).logits
    mask = forget["labels"] != -100
    if shifted:
        logits, mask = logits[:, :-1], mask[:, 1:]
    logits = logits.reshape(-1, logits.shape[-1])
    gap = (logits.max(-1).values - logits.mean(-1)) ** 2
    mask = mask.reshape(-1)
    forget_loss = (gap * mask).sum() / mask.sum()
    retain_loss = model(**retain).loss
    return 1.0 * forget_loss + lam * (retain_loss - eps)


def test_undial_first_step_against_open_unlearning(tokenizer, learned, forget_ds, tmp_path):
    model = learned_model(tokenizer, learned).eval()
    args = cpu_args(UNDIALConfig, tmp_path, beta=3.0)
    trainer = UNDIALTrainer(model, args=args, forget_dataset=forget_ds, processing_class=tokenizer)
    assert trainer.reference_plan.kind == "frozen_copy"
    batch = first_batch(trainer)
    assert batch["forget_mask"].all()  # retain_weight 0: no retain rows are loaded
    inputs = rows_of(batch, batch["forget_mask"])
    loss, norm = ours(trainer, model, batch)
    paper = theirs(model, lambda: ou_undial(model, trainer.ref_model, inputs, 3.0, scored_only=True))
    as_computed = theirs(model, lambda: ou_undial(model, trainer.ref_model, inputs, 3.0, scored_only=False))
    print(
        f"UNDIAL first step: ours {loss:.5f} (grad norm {norm:.5f}); open-unlearning on answer tokens "
        f"{paper[0]:.5f} ({paper[1]:.5f}); as it computes it (every position) {as_computed[0]:.5f} "
        f"({as_computed[1]:.5f})"
    )
    assert loss == pytest.approx(paper[0], rel=1e-5) and norm == pytest.approx(paper[1], rel=1e-4)
    assert abs(as_computed[0] - loss) > 0.05 * loss  # the prompt and padding positions change the value


def test_ceu_first_step_equals_open_unlearning(tokenizer, learned, forget_ds, tmp_path):
    model = learned_model(tokenizer, learned).eval()
    for n in (0, 1, 3):
        args = cpu_args(CEUConfig, tmp_path, ignore_first_n_answer_tokens=n)
        trainer = CEUTrainer(model, args=args, forget_dataset=forget_ds, processing_class=tokenizer)
        batch = first_batch(trainer)
        loss, norm = ours(trainer, model, batch)
        inputs = rows_of(batch, batch["forget_mask"])
        ou = theirs(model, lambda: ou_ceu(model, inputs, n))  # noqa: B023  (called at once)
        assert loss == pytest.approx(ou[0], rel=1e-5) and norm == pytest.approx(ou[1], rel=1e-4)


def test_pdu_first_step_against_open_unlearning(tokenizer, learned, forget_ds, retain_ds, tmp_path):
    model = learned_model(tokenizer, learned).eval()
    args = cpu_args(PDUConfig, tmp_path, retain_loss_eps=0.3, retain_weight=2.0)
    trainer = PDUTrainer(
        model, args=args, forget_dataset=forget_ds, retain_dataset=retain_ds, processing_class=tokenizer
    )
    batch = first_batch(trainer)
    f = batch["forget_mask"]
    forget, retain = rows_of(batch, f), rows_of(batch, ~f)
    loss, norm = ours(trainer, model, batch)
    paper = theirs(model, lambda: ou_pdu(model, forget, retain, 2.0, 0.3, shifted=True))
    as_computed = theirs(model, lambda: ou_pdu(model, forget, retain, 2.0, 0.3, shifted=False))
    print(
        f"PDU first step: ours {loss:.5f} (grad norm {norm:.5f}); open-unlearning with the shifted mask "
        f"{paper[0]:.5f} ({paper[1]:.5f}); as it computes it (unshifted mask) {as_computed[0]:.5f} "
        f"({as_computed[1]:.5f})"
    )
    assert loss == pytest.approx(paper[0], rel=1e-5) and norm == pytest.approx(paper[1], rel=1e-4)
    assert abs(as_computed[1] - norm) > 0.01 * norm  # other positions' logits: another gradient


# --------------------------------------------------------------------------------------------- forgetting --
def logps_per_token(model, dataset, trainer):
    batch = trainer.data_collator([{"forget": dataset[i], "retain": None} for i in range(len(dataset))])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    mask = batch["completion_mask"][:, 1:].bool()
    logps = logits.log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return logps[mask].mean().item()


@pytest.mark.parametrize("method", ["undial", "ceu", "pdu"])
def test_forgets_the_forget_facts_more_than_the_retain_ones(method, tokenizer, learned, tmp_path):
    """With the retain term on (open-unlearning's UNDIAL search uses 1-5): the synthetic facts share one template,
    so without it the tiny model loses both sets together."""
    model = learned_model(tokenizer, learned)
    forget, retain = prompt_completion(QA[:8]), prompt_completion(QA[8:16])
    cls, cfg, kw = {
        "undial": (UNDIALTrainer, UNDIALConfig, dict(beta=10.0, retain_weight=1.0)),
        "ceu": (CEUTrainer, CEUConfig, dict(retain_weight=1.0)),
        "pdu": (
            PDUTrainer,
            PDUConfig,
            dict(retain_loss_eps=0.1, dual_warmup_epochs=0, retain_weight=100.0, dual_step_size=5.0),
        ),
    }[method]
    args = cpu_args(cfg, tmp_path, max_steps=10, learning_rate=5e-3, **kw)
    trainer = cls(model, args=args, forget_dataset=forget, retain_dataset=retain, processing_class=tokenizer)
    data_f, data_r = trainer.train_dataset.forget, trainer._tokenize(retain, "retain")
    f0, r0 = logps_per_token(model.eval(), data_f, trainer), logps_per_token(model, data_r, trainer)
    trainer.train()
    f1, r1 = logps_per_token(model.eval(), data_f, trainer), logps_per_token(model, data_r, trainer)
    print(f"{method}: forget log-prob per token {f0:.3f} -> {f1:.3f}, retain {r0:.3f} -> {r1:.3f}")
    assert f0 > -0.5 and r0 > -0.5  # the facts were learned
    assert f0 - f1 > 0.8
    assert f0 - f1 > 3 * (r0 - r1)


# ------------------------------------------------------------------------------------------- accumulation --
@pytest.mark.parametrize("method", ["undial", "ceu", "pdu"])
def test_gradient_accumulation_2x2_matches_4x1(method, tokenizer, forget_ds, retain_ds, tmp_path):
    """Token counts over the whole step (CE-U: minus its ignored tokens), and PDU's λ updated once per optimizer step
    from the step's retain loss over both micro-batches."""
    cls, cfg, kw = {
        "undial": (UNDIALTrainer, UNDIALConfig, dict(retain_weight=0.5)),
        "ceu": (CEUTrainer, CEUConfig, dict(ignore_first_n_answer_tokens=2)),
        "pdu": (PDUTrainer, PDUConfig, dict(retain_loss_eps=1.0, dual_warmup_epochs=0, dual_step_size=0.5)),
    }[method]
    runs = []
    for bs, ga in [(4, 1), (2, 2)]:
        m = tiny(tokenizer)
        args = cpu_args(
            cfg,
            tmp_path / f"{bs}x{ga}",
            per_device_train_batch_size=bs,
            gradient_accumulation_steps=ga,
            max_steps=3,
            **kw,
        )
        t = cls(model=m, args=args, forget_dataset=forget_ds, retain_dataset=retain_ds, processing_class=tokenizer)
        t.train()
        logs = [h for h in t.state.log_history if "loss" in h]
        runs.append(
            (
                [h["loss"] for h in logs],
                [h.get("dual/lambda") for h in logs],
                {n: p.detach().clone() for n, p in m.named_parameters()},
            )
        )
    (loss_a, lam_a, p_a), (loss_b, lam_b, p_b) = runs
    assert loss_a == pytest.approx(loss_b, rel=1e-4)
    assert lam_a == pytest.approx(lam_b, rel=1e-5) if method == "pdu" else lam_a == lam_b
    for n in p_a:
        torch.testing.assert_close(p_a[n], p_b[n], rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------ PDU's λ trace --
class StepLosses:
    """A stand-in for the trainer: λ and a hand-made sequence of step retain losses."""

    def __init__(self, lam, losses):
        self.dual_lambda, self.losses = lam, list(losses)

    def pop_step_retain_loss(self):
        return self.losses.pop(0)


def lambda_trace(upon, losses, steps_per_epoch=2):
    args = types.SimpleNamespace(dual_update_upon=upon, dual_warmup_epochs=1, retain_loss_eps=0.5, dual_step_size=2.0)
    trainer = StepLosses(1.0, losses)
    callback, state, trace = DualAscentCallback(trainer), types.SimpleNamespace(epoch=0.0), []
    for step in range(len(losses)):
        trace.append(trainer.dual_lambda)  # the λ this step's loss uses
        callback.on_step_begin(args, state, None)
        state.epoch = (step + 1) / steps_per_epoch
        callback.on_step_end(args, state, None)
        if (step + 1) % steps_per_epoch == 0:
            callback.on_epoch_end(args, state, None)
    return trace + [trainer.dual_lambda]


def test_dual_variable_trace_on_hand_made_retain_losses():
    losses = [0.9, 0.7, 0.2, 0.1, 1.0, 0.5]
    # per step, after the 1-epoch warm-up (steps 3..6): 1 + 2(0.2 - 0.5) = 0.4; max(0, 0.4 + 2(0.1 - 0.5)) = 0;
    # 0 + 2(1.0 - 0.5) = 1; 1 + 2(0.5 - 0.5) = 1
    assert lambda_trace("step", losses) == pytest.approx([1.0, 1.0, 1.0, 0.4, 0.0, 1.0, 1.0])
    # per epoch, from the end of epoch 1: mean(0.9, 0.7) = 0.8 -> 1.6; mean(0.2, 0.1) -> 1.6 - 0.7 = 0.9;
    # mean(1.0, 0.5) = 0.75 -> 0.9 + 0.5 = 1.4
    assert lambda_trace("epoch", losses) == pytest.approx([1.0, 1.0, 1.6, 1.6, 0.9, 0.9, 1.4])
    assert dual_step(0.2, 0.0, 0.5, 1.0) == 0.0  # projected onto λ >= 0


def test_pdu_logs_lambda_every_step_and_saves_it(tokenizer, forget_ds, retain_ds, tmp_path):
    args = cpu_args(
        PDUConfig,
        tmp_path,
        retain_loss_eps=5.0,
        dual_warmup_epochs=0,
        dual_step_size=3.0,
        retain_weight=0.5,
        max_steps=4,
    )
    trainer = PDUTrainer(
        tiny(tokenizer), args=args, forget_dataset=forget_ds, retain_dataset=retain_ds, processing_class=tokenizer
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "dual/lambda" in h]
    assert len(logs) == 4 and logs[0]["dual/lambda"] == 0.5
    for before, after in zip(logs, logs[1:]):  # one micro-batch per step: the logged retain loss is the step's
        assert after["dual/lambda"] == pytest.approx(
            dual_step(before["dual/lambda"], before["retain/loss"], 5.0, 3.0), rel=1e-5
        )
    trainer.save_model()
    saved = json.load(open(tmp_path / "out" / "pdu_dual.json"))
    assert saved["lambda"] == pytest.approx(trainer.dual_lambda) and saved["retain_loss_eps"] == 5.0


# ------------------------------------------------------------------------------------------------- errors --
def test_bad_settings_are_clear_errors(tokenizer, forget_ds, retain_ds, tmp_path):
    with pytest.raises(ValueError, match="PDU needs `retain_loss_eps`"):
        cpu_args(PDUConfig, tmp_path)
    with pytest.raises(ValueError, match="initial λ"):
        cpu_args(PDUConfig, tmp_path, retain_loss_eps=0.3, retain_weight=0.0)
    with pytest.raises(ValueError, match="`dual_update_upon` must be one of"):
        cpu_args(PDUConfig, tmp_path, retain_loss_eps=0.3, dual_update_upon="batch")
    with pytest.raises(ValueError, match="UNDIAL distils from the teacher's whole next-token distribution"):
        cpu_args(UNDIALConfig, tmp_path, precompute_ref_log_probs=True)
    with pytest.raises(ValueError, match="`ignore_first_n_answer_tokens` must be >= 0"):
        cpu_args(CEUConfig, tmp_path, ignore_first_n_answer_tokens=-1)
    # every answer token ignored: nothing to learn from
    with pytest.raises(
        ValueError,
        match=r"8 of 8 forget examples have at most `ignore_first_n_answer_tokens=50` scored tokens \(shortest: ",
    ):
        CEUTrainer(
            tiny(tokenizer),
            args=cpu_args(CEUConfig, tmp_path, ignore_first_n_answer_tokens=50),
            forget_dataset=forget_ds,
            processing_class=tokenizer,
        )
    with pytest.raises(ValueError, match="reference-free: remove `ref_model`"):
        CEUTrainer(
            tiny(tokenizer),
            ref_model=tiny(tokenizer),
            args=cpu_args(CEUConfig, tmp_path),
            forget_dataset=forget_ds,
            processing_class=tokenizer,
        )


def test_undial_teacher_is_an_explicit_ref_model(tokenizer, forget_ds, tmp_path):
    """A `ref_model` is UNDIAL's teacher: a teacher with the student's weights gives CE(softmax(z − β·e_y), p)."""
    model = tiny(tokenizer)
    trainer = UNDIALTrainer(
        model,
        ref_model=copy.deepcopy(model),
        args=cpu_args(UNDIALConfig, tmp_path, beta=2.0),
        forget_dataset=forget_ds,
        processing_class=tokenizer,
    )
    assert trainer.reference_plan.kind == "explicit"
    batch = first_batch(trainer)
    with torch.no_grad():
        loss = trainer.compute_loss(model.eval(), batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    scored = batch["completion_mask"][:, 1:].bool()
    z, y = logits[scored], batch["input_ids"][:, 1:][scored]
    target = (z - 2.0 * F.one_hot(y, z.shape[-1])).softmax(-1)
    expected = -(target * z.log_softmax(-1)).sum(-1).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_undial_with_a_kl_retain_term_and_another_teacher(tokenizer, forget_ds, retain_ds, tmp_path):
    """Forget rows distil from the `ref_model`, retain rows pay KL(ref ‖ model): both against full logits."""
    model, ref = tiny(tokenizer), tiny(tokenizer, seed=7)
    args = cpu_args(UNDIALConfig, tmp_path, beta=2.0, retain_weight=0.5, retain_loss_type="kl", forget_weight=0.7)
    trainer = UNDIALTrainer(
        model, ref_model=ref, args=args, forget_dataset=forget_ds, retain_dataset=retain_ds, processing_class=tokenizer
    )
    batch = first_batch(trainer)
    f = batch["forget_mask"]
    scored = batch["completion_mask"][:, 1:].bool()
    loss, norm = ours(trainer, model.eval(), batch)

    def naive():
        kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        logp = model(**kw).logits[:, :-1].float().log_softmax(-1)
        with torch.no_grad():
            ref_logits = ref(**kw).logits[:, :-1].float()
        y = batch["input_ids"][:, 1:]
        fpos, rpos = scored & f[:, None], scored & ~f[:, None]
        target = (ref_logits[fpos] - 2.0 * F.one_hot(y[fpos], ref_logits.shape[-1])).softmax(-1)
        forget = -(target * logp[fpos]).sum(-1).mean()
        ref_logp = ref_logits[rpos].log_softmax(-1)
        retain = (ref_logp.exp() * (ref_logp - logp[rpos])).sum(-1).mean()
        return 0.7 * forget + 0.5 * retain

    expected = theirs(model, naive)
    assert loss == pytest.approx(expected[0], rel=1e-5) and norm == pytest.approx(expected[1], rel=1e-4)


def test_undial_with_lora_uses_the_base_as_teacher(tokenizer, forget_ds, tmp_path):
    from peft import LoraConfig

    model = tiny(tokenizer)
    reference = UNDIALTrainer(
        copy.deepcopy(model),
        args=cpu_args(UNDIALConfig, tmp_path / "a"),
        forget_dataset=forget_ds,
        processing_class=tokenizer,
    )
    lora = UNDIALTrainer(
        model,
        args=cpu_args(UNDIALConfig, tmp_path / "b", max_steps=2),
        forget_dataset=forget_ds,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
    )
    assert lora.reference_plan.kind == "adapters_off" and lora.ref_model is None
    batch = first_batch(lora)
    with torch.no_grad():  # LoRA starts as the identity: the same loss as a full fine-tune's first step
        torch.testing.assert_close(
            lora.compute_loss(lora.model.eval(), batch), reference.compute_loss(reference.model.eval(), batch)
        )
    lora.train()
    assert all(h["forget/loss"] > 0 for h in lora.state.log_history if "forget/loss" in h)


def test_pdu_resume_reads_lambda_back(tokenizer, forget_ds, retain_ds, tmp_path):
    def run(out, max_steps, resume=None):
        args = cpu_args(
            PDUConfig,
            tmp_path,
            output_dir=str(out),
            retain_loss_eps=5.0,
            dual_warmup_epochs=0,
            dual_step_size=3.0,
            retain_weight=0.5,
            max_steps=max_steps,
            save_strategy="steps",
            save_steps=1,
        )
        t = PDUTrainer(
            tiny(tokenizer), args=args, forget_dataset=forget_ds, retain_dataset=retain_ds, processing_class=tokenizer
        )
        t.train(resume_from_checkpoint=resume)
        return t

    full = run(tmp_path / "a", 3)
    lam_step3 = [h["dual/lambda"] for h in full.state.log_history if "dual/lambda" in h][2]
    saved = json.load(open(tmp_path / "a" / "checkpoint-2" / "pdu_dual.json"))["lambda"]
    assert saved == pytest.approx(lam_step3) and saved != 0.5  # λ after two updates, the one step 3 uses
    resumed = run(tmp_path / "a", 3, resume=str(tmp_path / "a" / "checkpoint-2"))
    assert resumed.dual_lambda == pytest.approx(full.dual_lambda, rel=1e-5)
