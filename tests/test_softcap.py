"""Architectures whose forward transforms the logits: Gemma 2 soft-caps them (`final_logit_softcapping`), Cohere
scales them (`logit_scale`). The chunked head must apply the same transform, for the label log-probs and for the
retain KL, or it scores a different model."""

import pytest
import torch
from conftest import cpu_args
from transformers import CohereConfig, CohereForCausalLM, Gemma2Config, Gemma2ForCausalLM

from trl_unlearn import NPOConfig, NPOTrainer
from trl_unlearn.modeling import forward_logps, head_transform

ARCHS = {
    # small caps / scales so that the transform changes the distribution a lot
    "gemma2": (
        Gemma2Config,
        Gemma2ForCausalLM,
        {"final_logit_softcapping": 2.0, "attn_logit_softcapping": None, "head_dim": 16, "query_pre_attn_scalar": 16},
    ),
    "cohere": (CohereConfig, CohereForCausalLM, {"logit_scale": 0.25}),
}


def tiny(arch, tokenizer, seed):
    config_cls, model_cls, extra = ARCHS[arch]
    config = config_cls(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        **extra,
    )
    torch.manual_seed(seed)
    model = model_cls(config)
    with torch.no_grad():  # larger logits than the init gives, so the cap / scale matters
        model.get_output_embeddings().weight.mul_(20)
    return model


@pytest.mark.parametrize("arch", list(ARCHS))
def test_label_logps_match_the_models_own_logits(arch, tokenizer):
    model = tiny(arch, tokenizer, seed=0).eval()
    logit_scale, softcap = head_transform(model.config)
    assert (logit_scale, softcap) != (1.0, None)
    enc = tokenizer(
        ["Question: Who wrote book 3?\nAnswer: Author 3", "the quick brown fox"], padding=True, return_tensors="pt"
    )
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    with torch.no_grad():
        ours = forward_logps(model, enc["input_ids"], enc["attention_mask"], labels).token_logps
        logits = model(**enc).logits[:, :-1].float()
    target = labels[:, 1:]
    mask = target != -100
    expected = logits.log_softmax(-1).gather(-1, target.clamp(min=0)[..., None]).squeeze(-1) * mask
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)
    # and the transform matters: the raw head gives other numbers
    raw = torch.nn.functional.linear(model.model(**enc).last_hidden_state[:, :-1], model.lm_head.weight)
    raw = raw.float().log_softmax(-1).gather(-1, target.clamp(min=0)[..., None]).squeeze(-1) * mask
    assert (raw - expected).abs().max() > 1e-2


@pytest.mark.parametrize("arch", list(ARCHS))
def test_retain_kl_matches_the_models_own_logits(arch, tokenizer, forget_ds, retain_ds, tmp_path):
    model, ref = tiny(arch, tokenizer, seed=0), tiny(arch, tokenizer, seed=1).requires_grad_(False)
    args = cpu_args(NPOConfig, tmp_path, retain_loss_type="kl", forget_weight=0.0, retain_weight=1.0)
    trainer = NPOTrainer(
        model=model,
        ref_model=ref,
        args=args,
        forget_dataset=forget_ds,
        retain_dataset=retain_ds,
        processing_class=tokenizer,
    )
    pairs = [trainer.train_dataset[(i, i)] for i in range(4)]
    batch = trainer.data_collator(pairs)
    model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch)
        kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        logp = model(**kw).logits[:, :-1].float().log_softmax(-1)
        ref_logp = ref(**kw).logits[:, :-1].float().log_softmax(-1)
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
    mask = batch["completion_mask"][:, 1:].float() * (~batch["forget_mask"])[:, None]
    torch.testing.assert_close(loss, (kl * mask).sum() / mask.sum(), rtol=1e-4, atol=1e-6)
