"""WGA and SatImp: the token-weighted losses against hand computations, the first-step loss and gradient against
open-unlearning's formula (written out here in plain torch on full logits), forgetting on the tiny facts, and
accumulation invariance of the token-level fused path."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import QA, cpu_args, learn_qa, prompt_completion

from trl_unlearn import SatImpConfig, SatImpTrainer, WGAConfig, WGATrainer
from trl_unlearn.losses import satimp_loss, satimp_weight, wga_loss, wga_weight
from trl_unlearn.toy.tiny import tiny_llama


def llama(tokenizer):
    return tiny_llama(tokenizer, hidden_size=32, num_hidden_layers=2, num_attention_heads=2)


def first_batch(trainer, size=4):
    return trainer.data_collator([trainer.train_dataset[(i, i)] for i in range(size)])


def test_wga_loss_and_gradient_by_hand():
    x = torch.tensor([math.log(0.5), math.log(0.25)], requires_grad=True)
    loss = wga_loss(x, beta=2.0)
    torch.testing.assert_close(loss.detach(), torch.tensor([0.25 * math.log(0.5), 0.0625 * math.log(0.25)]))
    loss.sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([0.25, 0.0625]))  # detached weight: d/dx = p^β
    torch.testing.assert_close(wga_weight(x, 1.0), torch.tensor([0.5, 0.25]))


def test_satimp_loss_and_gradient_by_hand():
    x = torch.tensor([math.log(0.5), math.log(0.9)], requires_grad=True)
    loss = satimp_loss(x, beta1=2.0, beta2=3.0)
    w = torch.tensor([0.5**2 * 0.5**3, 0.9**2 * 0.1**3])
    torch.testing.assert_close(loss.detach(), w * torch.tensor([math.log(0.5), math.log(0.9)]))
    loss.sum().backward()
    torch.testing.assert_close(x.grad, w)
    torch.testing.assert_close(satimp_weight(x, 0.0, 0.0), torch.ones(2))


def open_unlearning_loss(model, batch, forget_fn, gamma, alpha):
    """open-unlearning's `compute_{wga,satimp}_loss` + GradDiff NLL retain term, as it computes them: HF labels
    (-100 off the completion), full logits, a token mean over the forget batch's valid shifted tokens, the retain
    loss the HF token mean; `gamma · forget + alpha · retain`."""
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    f = batch["forget_mask"]

    def ce(rows):
        logits = model(input_ids=batch["input_ids"][rows], attention_mask=batch["attention_mask"][rows]).logits
        shift_logits, shift_labels = logits[:, :-1].float(), labels[rows][:, 1:]
        lm_loss = F.cross_entropy(
            shift_logits.reshape(-1, shift_logits.shape[-1]),
            shift_labels.reshape(-1),
            ignore_index=-100,
            reduction="none",
        )
        return lm_loss, shift_labels.reshape(-1) != -100

    lm_loss, valid = ce(f)
    forget = -(forget_fn((-lm_loss).exp().detach()) * lm_loss)[valid].mean()
    r_loss, r_valid = ce(~f)
    return gamma * forget + alpha * r_loss[r_valid].mean()


def loss_and_grads(model, compute):
    """`(loss, gradient norm, {name: gradient})` of `compute()`."""
    model.zero_grad()
    loss = compute()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return loss.item(), torch.sqrt(sum((g.float() ** 2).sum() for g in grads.values())).item(), grads


def loss_and_grad_norm(model, compute):
    return loss_and_grads(model, compute)[:2]


CASES = {
    "wga": (WGATrainer, WGAConfig, dict(beta=1.5), lambda p: p**1.5, (1.0, 1.0)),
    "satimp": (SatImpTrainer, SatImpConfig, dict(beta1=5.0, beta2=1.0), lambda p: p**5.0 * (1 - p), (1.0, 0.1)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_first_step_matches_open_unlearning(name, tokenizer, forget_ds, retain_ds, tmp_path):
    trainer_cls, config_cls, kw, weight_fn, (gamma, alpha) = CASES[name]
    model = llama(tokenizer)
    trainer = trainer_cls(
        model=model,
        args=cpu_args(config_cls, tmp_path, **kw),
        forget_dataset=forget_ds,
        retain_dataset=retain_ds,
        processing_class=tokenizer,
    )
    batch = first_batch(trainer)
    *ours, our_grads = loss_and_grads(model, lambda: trainer.compute_loss(model, batch))
    *theirs, their_grads = loss_and_grads(model, lambda: open_unlearning_loss(model, batch, weight_fn, gamma, alpha))
    assert ours == pytest.approx(theirs, rel=1e-5)
    assert our_grads.keys() == their_grads.keys()
    for name in our_grads:  # the whole gradient, not only its norm
        torch.testing.assert_close(our_grads[name], their_grads[name], rtol=1e-4, atol=1e-7)
    if name == "satimp":  # open-unlearning's SatImp.yaml swaps the weights (gamma 0.1, alpha 1.0): a different loss
        yaml = loss_and_grad_norm(model, lambda: open_unlearning_loss(model, batch, weight_fn, 0.1, 1.0))
        assert abs(yaml[0] - ours[0]) > 0.1 * abs(ours[0])


@pytest.fixture(scope="module")
def learned(tokenizer):
    """A 2-layer model that has learned the forget and retain facts (a few seconds of Adam): the weights of WGA and
    SatImp are near 0 on a random model's unlikely tokens."""
    return learn_qa(llama(tokenizer), tokenizer)


def mean_answer_logp(model, trainer, dataset):
    """Mean label log-prob of the completion tokens of a tokenized dataset (full logits)."""
    batch = trainer.data_collator([{"forget": row, "retain": None} for row in dataset])
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    logps = logits.float().log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return logps[batch["completion_mask"][:, 1:].bool()].mean().item()


@pytest.mark.parametrize("name", sorted(CASES))
def test_forgets_the_forget_facts_more_than_the_retain_facts(name, learned, tokenizer, tmp_path):
    trainer_cls, config_cls, kw, *_ = CASES[name]
    model = llama(tokenizer)
    model.load_state_dict(learned)
    args = cpu_args(config_cls, tmp_path, max_steps=20, learning_rate=1e-2, **kw)
    trainer = trainer_cls(
        model=model,
        args=args,
        forget_dataset=prompt_completion(QA[:8]),
        retain_dataset=prompt_completion(QA[8:32]),
        processing_class=tokenizer,
    )
    forget, retain = trainer.train_dataset.forget, trainer.train_dataset.retain
    f0, r0 = (mean_answer_logp(model, trainer, d) for d in (forget, retain))
    trainer.train()
    f1, r1 = (mean_answer_logp(model, trainer, d) for d in (forget, retain))
    assert f0 - f1 > 0.5  # measured: WGA 1.59, SatImp 0.86 nats per token; retain 0.25 and 0.17
    assert f0 - f1 > 3 * abs(r0 - r1)


def test_wga_accumulation_2x2_matches_4x1(tokenizer, forget_ds, retain_ds, tmp_path):
    runs = []
    for bs, ga in [(4, 1), (2, 2)]:
        model = llama(tokenizer)
        args = cpu_args(
            WGAConfig,
            tmp_path / f"{bs}x{ga}",
            per_device_train_batch_size=bs,
            gradient_accumulation_steps=ga,
            max_steps=2,
        )
        trainer = WGATrainer(
            model=model, args=args, forget_dataset=forget_ds, retain_dataset=retain_ds, processing_class=tokenizer
        )
        trainer.train()
        runs.append(([h["loss"] for h in trainer.state.log_history if "loss" in h], dict(model.named_parameters())))
    (loss_a, p_a), (loss_b, p_b) = runs
    assert loss_a == pytest.approx(loss_b, rel=1e-4)
    for n in p_a:
        torch.testing.assert_close(p_a[n], p_b[n], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "config_cls,kw,match",
    [
        (SatImpConfig, dict(beta1=-1.0), "`beta1` and `beta2` must be >= 0"),
        (SatImpConfig, dict(beta2=-0.5), "`beta1` and `beta2` must be >= 0"),
        (WGAConfig, dict(beta=0.0), "`beta` must be > 0"),
    ],
)
def test_config_errors(config_cls, kw, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        cpu_args(config_cls, tmp_path, **kw)
