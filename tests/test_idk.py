"""IdkNLL and IdkDPO: the IdK answers (default list, list, file, seeded pairing, errors), the first-step loss against
hand / open-unlearning computations (plain torch, full logits), the reference (precomputed = live), forgetting on the
tiny facts, and accumulation invariance of the pair normalisation."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import QA, cpu_args, learn_qa, prompt_completion, qa_prompt
from datasets import Dataset

from trl_unlearn import IdkDPOConfig, IdkDPOTrainer, IdkNLLConfig, IdkNLLTrainer
from trl_unlearn.data.idk import DEFAULT_IDK_ANSWERS, idk_forget_rows, load_idk_answers, with_idk_completions
from trl_unlearn.losses import dpo_loss
from trl_unlearn.toy.tiny import tiny_llama


def llama(tokenizer):
    return tiny_llama(tokenizer, hidden_size=32, num_hidden_layers=2, num_attention_heads=2)


# ------------------------------------------------------------------------------------------------- IdK answers --
def test_idk_answers_sources_and_errors(tmp_path):
    assert load_idk_answers() == list(DEFAULT_IDK_ANSWERS) and len(set(DEFAULT_IDK_ANSWERS)) == 20
    assert load_idk_answers([" No idea. ", ""]) == ["No idea."]
    (tmp_path / "a.txt").write_text("No idea.\n\nNot known.\n")
    (tmp_path / "a.json").write_text(json.dumps(["Unknown."]))
    assert load_idk_answers(path=str(tmp_path / "a.txt")) == ["No idea.", "Not known."]
    assert load_idk_answers(path=str(tmp_path / "a.json")) == ["Unknown."]
    with pytest.raises(ValueError, match="holds no answer.*leave `idk_answers` unset"):
        load_idk_answers([])
    with pytest.raises(ValueError, match="holds no answer"):
        load_idk_answers(["  "])
    with pytest.raises(ValueError, match="give the answers one way"):
        load_idk_answers(["x"], str(tmp_path / "a.txt"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_idk_answers(path=str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="`idk_answers` holds no answer"):
        cpu_args(IdkNLLConfig, tmp_path, idk_answers=[])


def test_seeded_pairing_keeps_the_format():
    rows = prompt_completion(QA[:40])
    a, b = (idk_forget_rows(rows, list(DEFAULT_IDK_ANSWERS), seed=s)["idk_completion"] for s in (0, 0))
    c = idk_forget_rows(rows, list(DEFAULT_IDK_ANSWERS), seed=1)["idk_completion"]
    assert a == b and a != c
    assert all(x.startswith(" ") and x[1:] in DEFAULT_IDK_ANSWERS for x in a)  # the completions' leading space
    one = with_idk_completions(rows, ["No idea."], seed=3)
    assert one["completion"] == [" No idea."] * 40 and one["prompt"] == rows["prompt"]
    chat = idk_forget_rows(prompt_completion(QA[:2], conversational=True), ["No idea."], seed=0)
    assert chat["idk_completion"] == [[{"role": "assistant", "content": "No idea."}]] * 2
    pref = Dataset.from_dict({"prompt": ["p"], "chosen": [" idk"], "rejected": [" fact"]})
    assert idk_forget_rows(pref, ["unused"], 0)[0] == {"prompt": "p", "completion": " fact", "idk_completion": " idk"}
    with pytest.raises(ValueError, match="must be prompt-completion"):
        idk_forget_rows(Dataset.from_dict({"text": ["a b"]}), ["x"], 0)


# ---------------------------------------------------------------------------------------------------- losses --
def test_dpo_loss_by_hand():
    x = dpo_loss(torch.tensor([-2.0]), torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-0.5]), beta=0.5)
    margin = (-2.0 + 3.0) - (-1.0 + 0.5)  # 1.5
    torch.testing.assert_close(x, torch.tensor([math.log1p(math.exp(-0.5 * margin))]))


def full_logits_logps(model, input_ids, attention_mask, completion_mask):
    """Summed completion log-probs `[B]` from full logits (open-unlearning's `compute_batch_nll`, negated)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    labels = input_ids.masked_fill(completion_mask == 0, -100)[:, 1:]
    nll = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
    return -nll.sum(-1), (labels != -100).sum(-1)


def loss_and_grad_norm(model, compute):
    model.zero_grad()
    loss = compute()
    loss.backward()
    norm = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in model.parameters() if p.grad is not None))
    model.zero_grad()
    return loss.item(), norm.item()


def perturb(model, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))


def test_idk_nll_first_step(tokenizer, forget_ds, retain_ds, tmp_path):
    """Ours: token mean over the IdK answers + token mean over the retain answers. The TOFU repo's "idk" loss (the
    nearest published code; open-unlearning has no IdkNLL) is one token mean over both: a different value."""
    model = llama(tokenizer)
    args = cpu_args(IdkNLLConfig, tmp_path, idk_answers=["I don't know."])
    trainer = IdkNLLTrainer(
        model=model, args=args, forget_dataset=forget_ds, retain_dataset=retain_ds, processing_class=tokenizer
    )
    batch = trainer.data_collator([trainer.train_dataset[(i, i)] for i in range(4)])
    idk_ids = tokenizer(qa_prompt(QA[0][0]) + " I don't know.</s>")["input_ids"]
    assert batch["input_ids"][0, : len(idk_ids)].tolist() == idk_ids
    f = batch["forget_mask"]

    def hand():
        logps, n = full_logits_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        return -logps[f].sum() / n[f].sum() - logps[~f].sum() / n[~f].sum()

    def tofu_idk():
        logps, n = full_logits_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        return -logps.sum() / n.sum()

    ours = loss_and_grad_norm(model, lambda: trainer.compute_loss(model, batch))
    assert ours == pytest.approx(loss_and_grad_norm(model, hand), rel=1e-5)
    assert abs(loss_and_grad_norm(model, tofu_idk)[0] - ours[0]) > 0.2 * ours[0]


def idk_dpo_trainer(tokenizer, tmp_path, state=None, **kw):
    model = llama(tokenizer)
    if state is not None:
        model.load_state_dict(state)
    args = cpu_args(IdkDPOConfig, tmp_path, **{"idk_answers": ["I don't know."], **kw})
    return IdkDPOTrainer(
        model=model,
        args=args,
        forget_dataset=prompt_completion(QA[:8]),
        retain_dataset=prompt_completion(QA[8:32]),
        processing_class=tokenizer,
    )


def test_idk_dpo_first_step_matches_open_unlearning_times_beta_over_2(tokenizer, tmp_path):
    """Against the initial model (policy perturbed after the reference was taken). open-unlearning's `compute_dpo_loss`
    is (2/β) × DPO: both its loss and its gradient are ours × 2/β (= 20 at β 0.1); the retain term is off here."""
    beta = 0.1
    trainer = idk_dpo_trainer(tokenizer, tmp_path, beta=beta, retain_weight=0.0)
    assert trainer.precompute_forget_ref and trainer.ref_model is None
    model = trainer.model
    initial = copy.deepcopy(model).eval()
    perturb(model)
    batch = trainer.data_collator([{"forget": trainer.train_dataset.forget[i], "retain": None} for i in range(4)])
    assert batch["idk_mask"].tolist() == [False] * 4 + [True] * 4 and batch["forget_mask"].all()
    assert "ref_logps" in batch  # precomputed for both answers

    def open_unlearning():
        ids, am, cm = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
        win, lose = batch["idk_mask"], ~batch["idk_mask"]
        logps, _ = full_logits_logps(model, ids, am, cm)
        with torch.no_grad():
            ref, _ = full_logits_logps(initial, ids, am, cm)
        win_log_ratio, lose_log_ratio = logps[win] - ref[win], logps[lose] - ref[lose]
        return -2 / beta * F.logsigmoid(beta * (win_log_ratio - lose_log_ratio)).mean()

    ours = loss_and_grad_norm(model, lambda: trainer.compute_loss(model, batch))
    theirs = loss_and_grad_norm(model, open_unlearning)
    assert theirs[0] == pytest.approx(2 / beta * ours[0], rel=1e-5)
    assert theirs[1] == pytest.approx(2 / beta * ours[1], rel=1e-5)
    assert 0.5 < ours[0] < 0.9  # near log 2 = 0.693: π is near π_ref


def test_idk_dpo_precomputed_reference_equals_live(tokenizer, tmp_path):
    losses = []
    for precompute in (None, False):
        trainer = idk_dpo_trainer(tokenizer, tmp_path / str(precompute), precompute_ref_log_probs=precompute)
        assert (trainer.ref_model is None) == (precompute is None)
        perturb(trainer.model)
        batch = trainer.data_collator([trainer.train_dataset[(i, i)] for i in range(4)])
        assert ("ref_logps" in batch) == (precompute is None)
        with torch.no_grad():
            losses.append(trainer.compute_loss(trainer.model, batch).item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


@pytest.fixture(scope="module")
def learned(tokenizer):
    """A 2-layer model that has learned the forget and retain facts (a few seconds of Adam)."""
    return learn_qa(llama(tokenizer), tokenizer)


def answer_logp(model, tokenizer, rows):
    """Mean label log-prob per token of the true answers of `rows` (full logits)."""
    texts = [qa_prompt(q) + " " + a + "</s>" for q, a in rows]
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    prompt_lens = [len(tokenizer(qa_prompt(q))["input_ids"]) for q, _ in rows]
    model.eval()
    with torch.no_grad():
        logps = model(**enc).logits[:, :-1].float().log_softmax(-1).gather(-1, enc.input_ids[:, 1:, None])[..., 0]
    mask = torch.zeros_like(logps, dtype=torch.bool)
    for i, n in enumerate(prompt_lens):
        mask[i, n - 1 :] = enc.attention_mask[i, 1:].bool()[n - 1 :]
    return logps[mask].mean().item()


@pytest.mark.parametrize("method", ["idknll", "idkdpo"])
def test_forgets_the_forget_facts_more_than_the_retain_facts(method, learned, tokenizer, tmp_path):
    model = llama(tokenizer)
    model.load_state_dict(learned)
    cls, cfg = (IdkNLLTrainer, IdkNLLConfig) if method == "idknll" else (IdkDPOTrainer, IdkDPOConfig)
    args = cpu_args(cfg, tmp_path, max_steps=20, learning_rate=1e-2)
    trainer = cls(
        model=model,
        args=args,
        forget_dataset=prompt_completion(QA[:8]),
        retain_dataset=prompt_completion(QA[8:32]),
        processing_class=tokenizer,
    )
    before = answer_logp(model, tokenizer, QA[:8]), answer_logp(model, tokenizer, QA[8:32])
    trainer.train()
    after = answer_logp(model, tokenizer, QA[:8]), answer_logp(model, tokenizer, QA[8:32])
    forget_drop, retain_drop = before[0] - after[0], before[1] - after[1]
    # measured: IdkNLL forget -1.02, retain -0.13 nats per token; IdkDPO -0.61 and -0.02
    assert forget_drop > 0.5 and forget_drop > 3 * abs(retain_drop)


def test_idk_dpo_accumulation_2x2_matches_4x1(tokenizer, tmp_path):
    runs = []
    for bs, ga in [(4, 1), (2, 2)]:
        trainer = idk_dpo_trainer(
            tokenizer,
            tmp_path / f"{bs}x{ga}",
            per_device_train_batch_size=bs,
            gradient_accumulation_steps=ga,
            max_steps=2,
        )
        trainer.train()
        runs.append(
            (
                [h["loss"] for h in trainer.state.log_history if "loss" in h],
                {n: p.detach().clone() for n, p in trainer.model.named_parameters()},
            )
        )
    (loss_a, p_a), (loss_b, p_b) = runs
    assert loss_a == pytest.approx(loss_b, rel=1e-4)
    for n in p_a:
        torch.testing.assert_close(p_a[n], p_b[n], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["idknll", "idkdpo"])
def test_eval_sets_get_idk_answers(method, tokenizer, forget_ds, retain_ds, tmp_path):
    """A `{"forget", "retain"}` eval set given at creation and a preference one given to `evaluate`: the forget rows
    get IdK answers as in training (the eval loss at step 0 is the training loss of the same rows)."""
    cls, cfg = (IdkNLLTrainer, IdkNLLConfig) if method == "idknll" else (IdkDPOTrainer, IdkDPOConfig)
    args = cpu_args(cfg, tmp_path, per_device_eval_batch_size=4, idk_answers=["I don't know."])
    trainer = cls(
        model=llama(tokenizer),
        args=args,
        forget_dataset=forget_ds,
        retain_dataset=retain_ds,
        processing_class=tokenizer,
        eval_dataset={"forget": forget_ds.select(range(4)), "retain": retain_ds.select(range(4))},
    )
    at_creation = trainer.evaluate()["eval_loss"]
    batch = trainer.data_collator([trainer.train_dataset[(i, i)] for i in range(4)])
    with torch.no_grad():
        assert at_creation == pytest.approx(trainer.compute_loss(trainer.model, batch).item(), rel=1e-5)
    pref = Dataset.from_dict(
        {"prompt": forget_ds["prompt"][:4], "chosen": [" I don't know."] * 4, "rejected": forget_ds["completion"][:4]}
    )
    assert math.isfinite(trainer.evaluate(eval_dataset=pref)["eval_loss"])
    with pytest.raises(ValueError, match="eval set is a dict"):
        trainer.evaluate(eval_dataset=forget_ds)


def test_idk_dpo_with_lora_and_with_a_kl_retain_term(tokenizer, forget_ds, retain_ds, tmp_path):
    """LoRA: the reference is the adapter-disabled base, equal to the policy at the start (B = 0), so the DPO term is
    exactly log 2 per row. KL retain term: a frozen copy is kept, and at the start the KL is 0."""
    from peft import LoraConfig

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    args = cpu_args(IdkDPOConfig, tmp_path / "lora", retain_weight=0.0, max_steps=1)
    trainer = IdkDPOTrainer(
        model=llama(tokenizer), args=args, forget_dataset=forget_ds, processing_class=tokenizer, peft_config=lora
    )
    assert trainer.reference_plan.kind == "adapters_off"
    batch = trainer.data_collator([{"forget": trainer.train_dataset.forget[i], "retain": None} for i in range(4)])
    with torch.no_grad():
        assert trainer.compute_loss(trainer.model, batch).item() == pytest.approx(math.log(2), rel=1e-6)
    trainer.train()
    args = cpu_args(IdkDPOConfig, tmp_path / "kl", retain_loss_type="kl", max_steps=1)
    trainer = IdkDPOTrainer(
        model=llama(tokenizer),
        args=args,
        forget_dataset=forget_ds,
        retain_dataset=retain_ds,
        processing_class=tokenizer,
    )
    assert trainer.reference_plan.kind == "frozen_copy"
    trainer.train()
    first = trainer.state.log_history[0]
    assert first["retain/loss"] == pytest.approx(0.0, abs=1e-6)
    assert first["forget/loss"] == pytest.approx(math.log(2), rel=1e-5)
