"""Launched by tests/test_distributed.py under `accelerate launch` (DDP on gloo, DeepSpeed on CPU): a short
unlearning run on a saved tiny model; rank 0 writes the loss trace to `--out/trace.json`."""

import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from trl_unlearn.cli.train import METHODS  # noqa: E402


def run_one(a, model_dir, data, out):
    trainer_cls, config_cls = METHODS[a["method"]]
    forget, retain = Dataset.from_dict(data["forget"]), Dataset.from_dict(data["retain"])
    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir)
    kwargs = {}
    if a["method"] == "gradascent":
        retain = None
    else:
        kwargs["retain_loss_type"] = a.get("retain_loss_type", "nll")
    kwargs.update(a.get("config", {}))  # method-specific settings (RMU's layer_id, ...)
    args = config_cls(
        output_dir=out,
        save_steps=a.get("save_steps", 500),
        per_device_train_batch_size=a.get("per_device_batch", 2),
        gradient_accumulation_steps=a.get("grad_accum", 1),
        max_steps=a.get("max_steps", 3),
        learning_rate=1e-3,
        logging_steps=1,
        use_cpu=True,
        bf16=False,
        report_to=[],
        save_strategy="no",
        gradient_checkpointing=False,
        seed=0,
        disable_tqdm=True,
        **kwargs,
    )
    peft_config = quant = None
    if a.get("lora") or a.get("qlora"):
        from peft import LoraConfig

        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    if a.get("qlora"):
        from transformers import BitsAndBytesConfig

        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    trainer = trainer_cls(
        model=model_dir,
        args=args,
        forget_dataset=forget,
        retain_dataset=retain,
        processing_class=tokenizer,
        peft_config=peft_config,
        quantization_config=quant,
    )
    if a.get("print_steps"):
        from transformers import TrainerCallback

        class PrintStep(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                print(f"STEP {state.global_step}", flush=True)

        trainer.add_callback(PrintStep())
    trainer.train(resume_from_checkpoint=a.get("resume"))
    if trainer.preempted_at is not None:
        return
    trainer.save_model(out)
    acc = trainer.accelerator
    if acc.is_main_process:
        trace = {
            "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
            "world_size": acc.num_processes,
            "deepspeed": trainer.is_deepspeed_enabled,
            "ref_model": type(trainer.ref_model).__name__ if trainer.ref_model is not None else None,
            "precomputed_reference": trainer.precompute_forget_ref,
            "steps": [h["step"] for h in trainer.state.log_history if "loss" in h],
        }
        json.dump(trace, open(os.path.join(out, "trace.json"), "w"))
    acc.wait_for_everyone()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model_dir", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--runs", required=True, help="JSON list of {name, method, lora, qlora, retain_loss_type, config}")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    data = json.load(open(a.data))
    for run in json.loads(a.runs):
        run_one(run, a.model_dir, data, os.path.join(a.out, run["name"]))


if __name__ == "__main__":
    main()
