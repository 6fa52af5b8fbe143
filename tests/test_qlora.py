"""QLoRA for real on CPU: a 4-bit bitsandbytes base with LoRA adapters trains the adapters and nothing else."""

import pytest
import torch
from conftest import cpu_args

from trl_unlearn import NPOConfig, NPOTrainer, SimNPOConfig, SimNPOTrainer

bnb = pytest.importorskip("bitsandbytes")


@pytest.mark.parametrize("cls,cfg", [(SimNPOTrainer, SimNPOConfig), (NPOTrainer, NPOConfig)])
def test_qlora_trains_adapters_on_cpu(cls, cfg, model, tokenizer, forget_ds, retain_ds, tmp_path):
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig

    model.save_pretrained(tmp_path / "base")
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    args = cpu_args(cfg, tmp_path, max_steps=3, gradient_checkpointing=True)
    trainer = cls(
        model=str(tmp_path / "base"),
        args=args,
        forget_dataset=forget_ds,
        retain_dataset=retain_ds,
        processing_class=tokenizer,
        quantization_config=quant,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]),
    )
    assert trainer.model.get_base_model().is_loaded_in_4bit
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in trainer.model.modules())
    before = {n: p.detach().float().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    after = {n: p.detach().float() for n, p in trainer.model.named_parameters()}
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == {n for n in before if "lora_" in n}
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
