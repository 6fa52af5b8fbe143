"""Tests for trl_unlearn.kernels.token_logps (the chunked LM-head log-prob op) and trl_unlearn.modeling (its
Hugging Face bridge)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")


import pytest
import torch

from trl_unlearn.kernels.token_logps import ChunkedTokenLogps, chunked_token_logps, naive_token_logps
from trl_unlearn.modeling import forward_logps, head_transform
from trl_unlearn.toy.tiny import tiny_llama, train_tokenizer

TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "unlearning removes what a model knows about the forget set",
    "a retain set keeps the rest of its knowledge intact",
    "hello world, this is a tiny tokenizer for tests",
] * 4


def fused_token_logps(model, *args, return_entropy=False, **kwargs):
    out = forward_logps(model, *args, return_entropy=return_entropy, **kwargs)
    return (out.token_logps, out.entropy) if return_entropy else out.token_logps


def naive_entropy(hidden, weight, bias=None):
    logp = torch.nn.functional.linear(hidden, weight, bias).float().log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


def make_inputs(n, h, v, dtype=torch.float32, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g, dtype=dtype) * 0.3).requires_grad_()
    b = (torch.randn(v, generator=g, dtype=dtype) * 0.1).requires_grad_() if bias else None
    labels = torch.randint(0, v, (n,), generator=g)
    return hidden, weight, b, labels


def transform_args(t):
    """`(logit_scale, softcap, temperature)` for `ChunkedTokenLogps.apply` from a dict of overrides."""
    return t.get("logit_scale", 1.0), t.get("softcap"), t.get("temperature", 1.0)


# ---------------------------------------------------------------------------------------------------------------------
# The op


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(
    "transform", [{}, {"logit_scale": 0.7, "softcap": 2.5, "temperature": 1.3}], ids=["plain", "scale-softcap-temp"]
)
def test_gradcheck_float64(bias, transform):
    hidden, weight, b, labels = make_inputs(7, 5, 11, dtype=torch.float64, bias=bias)
    inputs = (hidden, weight) + ((b,) if bias else ())

    def logps_and_entropy(hidden, weight, b=None):
        # chunk_size=3: chunks of 3, 3 and a ragged 1
        return ChunkedTokenLogps.apply(hidden, weight, b, labels, 3, *transform_args(transform), True)

    assert torch.autograd.gradcheck(logps_and_entropy, inputs)
    assert torch.autograd.gradcheck(lambda *x: logps_and_entropy(*x)[0], inputs)  # log-probs only
    assert torch.autograd.gradcheck(lambda *x: logps_and_entropy(*x)[1], inputs)  # entropy only


@pytest.mark.parametrize("chunk_size", [1, 16, 50, 4096])
def test_matches_naive_fp32(chunk_size):
    hidden, weight, b, labels = make_inputs(50, 16, 97, bias=True)
    g = torch.Generator().manual_seed(1)
    a, c = torch.randn(2, 50, generator=g)  # arbitrary upstream gradients

    logp, ent = chunked_token_logps(hidden, weight, labels, b, chunk_size=chunk_size, return_entropy=True)
    assert logp.dtype == ent.dtype == torch.float32 and logp.shape == ent.shape == (50,)
    ours = torch.autograd.grad((logp * a + ent * c).sum(), (hidden, weight, b))

    ref_logp = naive_token_logps(hidden, weight, labels, b)
    ref_ent = naive_entropy(hidden, weight, b)
    ref = torch.autograd.grad((ref_logp * a + ref_ent * c).sum(), (hidden, weight, b))

    torch.testing.assert_close(logp, ref_logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, ref_ent, rtol=1e-5, atol=1e-5)
    for x, y in zip(ours, ref):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


def test_transform_matches_explicit_logits():
    hidden, weight, _, labels = make_inputs(20, 8, 31)
    logp, ent = chunked_token_logps(
        hidden, weight, labels, chunk_size=6, logit_scale=3.0, softcap=4.0, temperature=0.8, return_entropy=True
    )
    z = (4.0 * torch.tanh(3.0 * (hidden @ weight.T) / 4.0) / 0.8).log_softmax(-1)
    torch.testing.assert_close(logp, z.gather(-1, labels[:, None]).squeeze(-1))
    torch.testing.assert_close(ent, -(z.exp() * z).sum(-1))
    g_ours = torch.autograd.grad(logp.sum(), weight)[0]
    g_ref = torch.autograd.grad(z.gather(-1, labels[:, None]).sum(), weight)[0]
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-4, atol=1e-5)


def test_bf16_autocast_close_to_fp32():
    hidden, weight, _, labels = make_inputs(64, 32, 300)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp = chunked_token_logps(hidden, weight, labels, chunk_size=16)
    assert logp.dtype == torch.float32
    gh, gw = torch.autograd.grad(logp.sum(), (hidden, weight))
    assert gh.dtype == gw.dtype == torch.float32  # gradients come back in the inputs' dtype

    ref = naive_token_logps(hidden, weight, labels)
    rh, rw = torch.autograd.grad(ref.sum(), (hidden, weight))
    torch.testing.assert_close(logp, ref, rtol=0, atol=0.05)
    for x, y in ((gh, rh), (gw, rw)):
        assert (x - y).norm() / y.norm() < 2e-2
    # and the product really ran in bf16 (not silently in fp32)
    assert (logp - ref).abs().max() > 1e-5


def test_bf16_params_without_autocast(monkeypatch):
    import trl_unlearn.kernels.tiles as tiles

    monkeypatch.setattr(tiles, "ACC_BLOCK_ROWS", 64)  # accumulate grad_weight in several (ragged) blocks
    hidden, weight, _, labels = make_inputs(40, 32, 200, dtype=torch.bfloat16)
    logp = chunked_token_logps(hidden, weight, labels, chunk_size=16)
    assert logp.dtype == torch.float32
    gh, gw = torch.autograd.grad(logp.sum(), (hidden, weight))
    assert gh.dtype == gw.dtype == torch.bfloat16
    ref = naive_token_logps(hidden.float(), weight.float(), labels)
    rh, rw = torch.autograd.grad(ref.sum(), (hidden, weight))
    torch.testing.assert_close(logp, ref, rtol=0, atol=0.05)
    assert (gw.float() - rw.float()).norm() / rw.float().norm() < 2e-2


def test_gradcheck_frozen_head_float64():
    """Only `hidden` requires grad: the gradient is precomputed in forward (no recomputation in backward)."""
    hidden, weight, b, labels = make_inputs(7, 5, 11, dtype=torch.float64, bias=True)
    w, b = weight.detach(), b.detach()
    for t in ({}, {"logit_scale": 0.7, "softcap": 2.5, "temperature": 1.3}):
        args = (w, b, labels, 3, *transform_args(t), False, True)  # return_entropy=False, hidden_grad_only=True
        assert torch.autograd.gradcheck(lambda h, args=args: ChunkedTokenLogps.apply(h, *args)[0], (hidden,))


def test_no_grad_and_frozen_weight(monkeypatch):
    import trl_unlearn.kernels.token_logps as ops

    hidden, weight, _, labels = make_inputs(10, 8, 20)
    with torch.no_grad():
        logp = chunked_token_logps(hidden, weight, labels, chunk_size=4)
    assert not logp.requires_grad
    torch.testing.assert_close(logp, naive_token_logps(hidden, weight, labels).detach())

    calls = []
    project = ops.project
    monkeypatch.setattr(ops, "project", lambda *a, **k: calls.append(1) or project(*a, **k))
    frozen = weight.detach()
    logp = chunked_token_logps(hidden, frozen, labels, chunk_size=4)
    a = torch.randn(10, generator=torch.Generator().manual_seed(1))
    (gh,) = torch.autograd.grad((logp * a).sum(), hidden)
    assert len(calls) == 3  # 3 tiles in forward, none recomputed in backward
    (rh,) = torch.autograd.grad((naive_token_logps(hidden, frozen, labels) * a).sum(), hidden)
    torch.testing.assert_close(gh, rh, rtol=1e-4, atol=1e-6)

    # with a trainable head the tiles are recomputed in backward instead
    calls.clear()
    torch.autograd.grad(chunked_token_logps(hidden, weight, labels, chunk_size=4).sum(), hidden)
    assert len(calls) == 6


def test_no_rows():
    hidden, weight, _, labels = make_inputs(0, 8, 20)
    logp = chunked_token_logps(hidden, weight, labels)
    assert logp.shape == (0,)
    logp.sum().backward()
    assert weight.grad is not None and torch.count_nonzero(weight.grad) == 0


# ---------------------------------------------------------------------------------------------------------------------
# Hugging Face models


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, vocab_size=300)


def batch(tokenizer):
    """Right-padded batch of varied lengths, with the first two tokens of row 0 masked as a 'prompt'."""
    enc = tokenizer(
        ["the quick brown fox", "hello world, this is a tiny tokenizer for tests", "a"],
        return_tensors="pt",
        padding=True,
    )
    assert tokenizer.padding_side == "right"
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    labels[0, :2] = -100
    return enc["input_ids"], enc["attention_mask"], labels


def naive_model_logps(model, input_ids, attention_mask, labels):
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    shifted = labels[:, 1:]
    logp = logits.log_softmax(-1).gather(-1, shifted.clamp(min=0)[..., None]).squeeze(-1)
    return logp * (shifted != -100)


def nll(logps, labels):
    mask = labels[:, 1:] != -100
    return -(logps * mask).sum() / mask.sum()


def test_fused_matches_naive_on_tiny_llama(tokenizer):
    model = tiny_llama(tokenizer, hidden_size=32, num_hidden_layers=2)
    input_ids, attention_mask, labels = batch(tokenizer)
    logps, entropy = fused_token_logps(model, input_ids, attention_mask, labels, return_entropy=True, chunk_size=5)
    ref = naive_model_logps(model, input_ids, attention_mask, labels)
    mask = labels[:, 1:] != -100
    assert logps.shape == entropy.shape == mask.shape
    assert not mask.all() and mask.any()
    torch.testing.assert_close(logps, ref, rtol=1e-5, atol=1e-5)
    assert (logps[~mask] == 0).all() and (entropy[~mask] == 0).all()
    assert (logps[mask] < 0).all() and (entropy[mask] > 0).all()

    # default labels: input_ids with the padding masked
    default = fused_token_logps(model, input_ids, attention_mask)
    pad_only = input_ids.masked_fill(attention_mask == 0, -100)
    torch.testing.assert_close(default, naive_model_logps(model, input_ids, attention_mask, pad_only))


def test_tied_embeddings_gradients_add_up(tokenizer):
    model = tiny_llama(tokenizer, hidden_size=32, num_hidden_layers=2, tie_word_embeddings=True)
    shared = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight is shared
    input_ids, attention_mask, labels = batch(tokenizer)

    loss = nll(fused_token_logps(model, input_ids, attention_mask, labels, chunk_size=4), labels)
    (g_fused,) = torch.autograd.grad(loss, shared)
    ref_loss = nll(naive_model_logps(model, input_ids, attention_mask, labels), labels)
    (g_ref,) = torch.autograd.grad(ref_loss, shared)

    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_fused, g_ref, rtol=1e-4, atol=1e-6)


def test_nothing_scored_still_backprops(tokenizer):
    model = tiny_llama(tokenizer, hidden_size=32, num_hidden_layers=2)
    input_ids, attention_mask, _ = batch(tokenizer)
    labels = torch.full_like(input_ids, -100)
    logps = fused_token_logps(model, input_ids, attention_mask, labels)
    assert logps.requires_grad and (logps == 0).all()
    logps.sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is None or torch.count_nonzero(g) == 0 for g in grads)
    assert model.lm_head.weight.grad is not None


def test_peft_lora_gradients_reach_only_adapters(tokenizer):
    from peft import LoraConfig, get_peft_model

    model = tiny_llama(tokenizer, hidden_size=32, num_hidden_layers=2)
    base_logps = fused_token_logps(model, *batch(tokenizer)).detach()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    input_ids, attention_mask, labels = batch(tokenizer)

    logps = fused_token_logps(peft_model, input_ids, attention_mask, labels)
    ref = naive_model_logps(peft_model, input_ids, attention_mask, labels)
    torch.testing.assert_close(logps, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logps, base_logps)  # the adapters are in the computation

    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    ref_grads = torch.autograd.grad(nll(ref, labels), trainable)
    nll(logps, labels).backward()  # frozen head: the precomputed-hidden-gradient path
    for name, p in peft_model.named_parameters():
        if "lora_" in name:
            assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name
        else:
            assert p.grad is None, name
    for p, g in zip(trainable, ref_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)


def test_head_transform_from_config():
    from transformers import CohereConfig, Gemma2Config, GraniteConfig, LlamaConfig

    assert head_transform(LlamaConfig()) == (1.0, None)
    assert head_transform(Gemma2Config(final_logit_softcapping=30.0)) == (1.0, 30.0)
    assert head_transform(CohereConfig(logit_scale=0.25)) == (0.25, None)
    assert head_transform(GraniteConfig(logits_scaling=8.0)) == (0.125, None)


def test_weight_only_read_inside_gather_context(monkeypatch):
    """Mimic ZeRO-3: the head weight is empty except inside `maybe_gather_lm_head_ctx`, in forward and backward."""
    import contextlib

    import trl_unlearn.kernels.tiles

    hidden, weight, _, labels = make_inputs(9, 8, 20)
    full = weight.detach().clone()
    ref_logp = naive_token_logps(hidden, full.requires_grad_(), labels)
    ref_gh, ref_gw = torch.autograd.grad(ref_logp.sum(), (hidden, full))

    partitioned = torch.nn.Parameter(torch.empty(0))
    entered = []

    @contextlib.contextmanager
    def fake_gather(*params):
        assert params[0] is partitioned
        if partitioned.numel():  # already gathered: a null context, as in TRL
            yield
            return
        entered.append(torch.is_grad_enabled())
        partitioned.data = full.detach()
        try:
            yield
        finally:
            partitioned.data = torch.empty(0)

    monkeypatch.setattr(trl_unlearn.kernels.tiles, "maybe_gather_lm_head_ctx", fake_gather)
    logp = chunked_token_logps(hidden, partitioned, labels, chunk_size=4)
    assert partitioned.numel() == 0 and len(entered) == 1
    gh, gw = torch.autograd.grad(logp.sum(), (hidden, partitioned))
    assert len(entered) == 2  # gathered again for the backward's recomputation
    torch.testing.assert_close(logp, ref_logp)
    torch.testing.assert_close(gh, ref_gh, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gw, ref_gw, rtol=1e-4, atol=1e-6)
