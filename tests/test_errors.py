"""Bad input fails early, with a message that names the problem and the fix."""

import copy

import pytest
from conftest import QA, cpu_args, prompt_completion
from datasets import Dataset

from trl_unlearn import NPOConfig, NPOTrainer, SimNPOConfig, SimNPOTrainer


def make(model, tokenizer, tmp_path, cls=SimNPOTrainer, cfg=SimNPOConfig, args=None, **kw):
    kw.setdefault("processing_class", tokenizer)
    return cls(model=model, args=args or cpu_args(cfg, tmp_path), **kw)


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("beta", 0.0, "`beta` must be > 0"),
        ("beta", -1.0, "`beta` must be > 0"),
        ("forget_weight", -0.5, "must be >= 0"),
        ("retain_weight", -1.0, "must be >= 0"),
        ("retain_loss_type", "mse", "`retain_loss_type` must be one of"),
    ],
)
def test_bad_hyperparameters(field, value, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        cpu_args(SimNPOConfig, tmp_path, **{field: value})


def test_both_weights_zero(tmp_path):
    with pytest.raises(ValueError, match="both 0"):
        cpu_args(SimNPOConfig, tmp_path, forget_weight=0.0, retain_weight=0.0)


def test_no_forget_data(model, tokenizer, retain_ds, tmp_path):
    with pytest.raises(ValueError, match="No forget data"):
        make(model, tokenizer, tmp_path, retain_dataset=retain_ds)


def test_empty_forget_data(model, tokenizer, retain_ds, tmp_path):
    empty = Dataset.from_dict({"prompt": [], "completion": []})
    with pytest.raises(ValueError, match="forget dataset is empty"):
        make(model, tokenizer, tmp_path, forget_dataset=empty, retain_dataset=retain_ds)


def test_missing_retain_data(model, tokenizer, forget_ds, tmp_path):
    with pytest.raises(ValueError, match="no retain data was given.*retain_weight=0"):
        make(model, tokenizer, tmp_path, forget_dataset=forget_ds)


def test_unknown_columns_name_found_and_accepted(model, tokenizer, retain_ds, tmp_path):
    bad = Dataset.from_dict({"question": ["q"], "answer": ["a"]})
    with pytest.raises(ValueError, match=r"columns \['answer', 'question'\].*Accepted formats.*prompt"):
        make(model, tokenizer, tmp_path, forget_dataset=bad, retain_dataset=retain_ds)


def test_forget_and_retain_in_different_formats(model, tokenizer, forget_ds, tmp_path):
    conv = prompt_completion(QA[10:20], conversational=True)
    with pytest.raises(ValueError, match="standard prompt-completion but retain data is conversational"):
        make(model, tokenizer, tmp_path, forget_dataset=forget_ds, retain_dataset=conv)


def test_train_dataset_must_be_preference(model, tokenizer, forget_ds, tmp_path):
    with pytest.raises(ValueError, match="must be a preference dataset"):
        make(model, tokenizer, tmp_path, train_dataset=forget_ds)


def test_train_and_forget_both_given(model, tokenizer, forget_ds, tmp_path):
    pref = Dataset.from_dict({"prompt": ["p"], "chosen": [" a"], "rejected": [" b"]})
    with pytest.raises(ValueError, match="either `train_dataset`"):
        make(model, tokenizer, tmp_path, train_dataset=pref, forget_dataset=forget_ds)


def test_all_rows_truncated_away(model, tokenizer, retain_ds, tmp_path):
    forget = Dataset.from_dict({"prompt": ["word " * 60], "completion": [" x"]})
    with pytest.raises(ValueError, match="zero scored tokens after truncation.*Increase `max_length`"):
        make(
            model,
            tokenizer,
            tmp_path,
            args=cpu_args(SimNPOConfig, tmp_path, max_length=16),
            forget_dataset=forget,
            retain_dataset=retain_ds,
        )


def test_ref_model_given_to_simnpo(model, tokenizer, forget_ds, retain_ds, tmp_path):
    with pytest.raises(ValueError, match="reference-free: remove `ref_model`"):
        make(
            model,
            tokenizer,
            tmp_path,
            ref_model=copy.deepcopy(model),
            forget_dataset=forget_ds,
            retain_dataset=retain_ds,
        )


def test_ref_model_is_model(model, tokenizer, forget_ds, retain_ds, tmp_path):
    with pytest.raises(ValueError, match="cannot be the same object"):
        make(
            model,
            tokenizer,
            tmp_path,
            cls=NPOTrainer,
            cfg=NPOConfig,
            ref_model=model,
            forget_dataset=forget_ds,
            retain_dataset=retain_ds,
        )


def test_kl_without_live_reference(model, tokenizer, forget_ds, retain_ds, tmp_path):
    args = cpu_args(NPOConfig, tmp_path, retain_loss_type="kl", precompute_ref_log_probs=True)
    with pytest.raises(ValueError, match="needs a live reference model"):
        make(model, tokenizer, tmp_path, cls=NPOTrainer, args=args, forget_dataset=forget_ds, retain_dataset=retain_ds)


def test_no_trainable_parameters(model, tokenizer, forget_ds, retain_ds, tmp_path):
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        make(model, tokenizer, tmp_path, forget_dataset=forget_ds, retain_dataset=retain_ds)


def test_quantized_model_without_peft(model, tokenizer, forget_ds, retain_ds, tmp_path):
    from transformers import BitsAndBytesConfig

    model.save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="quantized.*pass a `peft_config`"):
        make(
            str(tmp_path / "m"),
            tokenizer,
            tmp_path,
            forget_dataset=forget_ds,
            retain_dataset=retain_ds,
            quantization_config=BitsAndBytesConfig(load_in_4bit=True),
        )


def test_more_ranks_than_forget_rows_is_checked(model, tokenizer, retain_ds, tmp_path, monkeypatch):
    from accelerate import Accelerator

    monkeypatch.setattr(Accelerator, "num_processes", property(lambda self: 4))
    forget = prompt_completion(QA[:2])
    with pytest.raises(ValueError, match="2 rows.*4 processes"):
        make(model, tokenizer, tmp_path, forget_dataset=forget, retain_dataset=retain_ds)


def test_non_finite_loss_stops_with_step_and_checkpoint(model, tokenizer, forget_ds, retain_ds, tmp_path):
    import torch

    args = cpu_args(SimNPOConfig, tmp_path, max_steps=4, save_strategy="steps", save_steps=1)
    trainer = make(model, tokenizer, tmp_path, args=args, forget_dataset=forget_ds, retain_dataset=retain_ds)

    class Poison(torch.nn.Module):  # turns the hidden states into NaN from the third step on
        calls = 0

        def forward(self, module, inputs, output):
            Poison.calls += 1
            if Poison.calls > 2:
                output = output * float("nan")
            return output

    model.model.norm.register_forward_hook(Poison().forward)
    with pytest.raises(FloatingPointError, match=r"step 3.*checkpoint-2"):
        trainer.train()
