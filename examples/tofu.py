"""Unlearn TOFU's forget split and evaluate with the TOFU metrics.

With no arguments it runs a complete small study offline (no Hub, no GPU, a few minutes on 2 CPU cores): it builds a
synthetic fictitious-author set in TOFU's layout, trains a tiny Llama from scratch on all of it ("Original") and on
the retain part only ("Retrain"), unlearns the forget split with NPO and SimNPO, evaluates the four models with the
TOFU metrics and prints a table (and saves a plot).

    python examples/tofu.py
    accelerate launch examples/tofu.py --config examples/recipes/tofu_forget10_simnpo.yaml
    python examples/tofu.py --model_name_or_path MODEL --dataset_name /path/to/tofu --forget_split forget05 \
        --methods simnpo --retain_report retain_forget05.json --output_dir out

With `--model_name_or_path` / `--dataset_name` it runs on a real model and real TOFU files (a local folder of TOFU's
JSON-lines files, or `locuslab/TOFU` from the Hub). Method hyperparameters are `SimNPOConfig` fields (`--beta`,
`--gamma`, `--forget_weight`, ...); NPO's β is `--npo_beta`.
"""

import copy
import json
import os
from dataclasses import dataclass, field

import torch
from accelerate import PartialState
from transformers import TrainerCallback, set_seed
from trl import ModelConfig, SFTConfig, SFTTrainer, TrlParser, get_peft_config, get_quantization_config

from trl_unlearn import SimNPOConfig
from trl_unlearn.evaluation import evaluate_tofu
from trl_unlearn.cli.loading import load_tokenizer
from trl_unlearn.cli.train import METHODS, StudyArguments, UnlearnScriptArguments, load_qa_split, method_config
from trl_unlearn.data import qa_to_trl, write_tofu_layout
from trl_unlearn.synthetic import iter_texts, make_tofu_like
from trl_unlearn.tiny import tiny_llama, train_tokenizer

SHOWN = [  # (report metric, table column)
    ("forget_quality", "forget quality ↑"),
    ("model_utility", "model utility ↑"),
    ("forget_rougeL_recall", "forget ROUGE-L ↓"),
    ("retain_rougeL_recall", "retain ROUGE-L ↑"),
    ("forget_probability", "forget prob ↓"),
]


@dataclass
class TofuArguments(UnlearnScriptArguments, StudyArguments):
    """The training command's data keys (`--forget_split`, ...) and the study keys (`--methods`, default NPO and
    SimNPO; `--retain_report`, ...), so a recipe serves both."""

    # The embedded default (no --model_name_or_path)
    num_authors: int = field(default=20, metadata={"help": "Synthetic study: fictitious authors."})
    finetune_epochs: int = field(default=20, metadata={"help": "Synthetic study: epochs to learn the set."})
    plot: bool = field(default=True, metadata={"help": "Save results.png (needs matplotlib)."})


class EpochProgress(TrainerCallback):
    """One line per epoch (the runs here hide tqdm bars), so a user sees the study move."""

    def __init__(self, what):
        self.what = what

    def on_epoch_end(self, args, state, control, **kwargs):
        losses = [h["loss"] for h in state.log_history if "loss" in h]
        loss = f", loss {losses[-1]:.3f}" if losses else ""
        print(f"  {self.what}: epoch {round(state.epoch)}/{round(args.num_train_epochs)}{loss}", flush=True)


def finetune(model, tokenizer, rows: list[dict], out: str, epochs: int, seed: int):
    """Teach a tiny model a QA set (plain SFT on the answers) with TRL's SFTTrainer."""
    args = SFTConfig(output_dir=out, num_train_epochs=epochs, per_device_train_batch_size=16, learning_rate=5e-3,
                     lr_scheduler_type="cosine", warmup_steps=10, weight_decay=0.0, use_cpu=not torch.cuda.is_available(),
                     bf16=False, report_to=[], save_strategy="no", logging_steps=50, gradient_checkpointing=False,
                     completion_only_loss=True, max_length=128, seed=seed, disable_tqdm=True)
    SFTTrainer(model=model, args=args, train_dataset=qa_to_trl(rows), processing_class=tokenizer,
               callbacks=[EpochProgress("fine-tuning")]).train()
    return model


def synthetic_setup(args: TofuArguments, training_args, out: str):
    """Write the synthetic set, train Original and Retrain models; return (data_dir, tokenizer, original, retain)."""
    data = make_tofu_like(num_authors=args.num_authors, seed=training_args.seed)
    data_dir = os.path.join(out, "data")
    with PartialState().main_process_first():
        if PartialState().is_main_process:
            write_tofu_layout(data_dir, data)
    tokenizer = train_tokenizer(iter_texts(data), vocab_size=512)
    extra = data["real_authors"] + data["world_facts"]
    models = []
    for name, rows in [("original", data["full"]), ("retrain", data[args.retain()])]:
        model = tiny_llama(tokenizer, hidden_size=96, num_hidden_layers=2, num_attention_heads=4,
                           seed=training_args.seed)
        set_seed(training_args.seed)
        print(f"Fine-tuning the {name} model on {len(rows) + len(extra)} QA pairs ...", flush=True)
        models.append(finetune(model, tokenizer, rows + extra, os.path.join(out, name), args.finetune_epochs,
                               training_args.seed))
    return data_dir, tokenizer, *models


def evaluate(model, tokenizer, data_dir, args, retain_report=None, retain_model=None, path=None, name="model"):
    print(f"Evaluating {name} (TOFU metrics: scoring and greedy answers) ...", flush=True)
    model.eval()
    # Score and generate with the prompt format the model was trained with
    prompt_format = "chat" if args.conversational else args.prompt_template
    report = evaluate_tofu(model, tokenizer, data_dir, split=args.forget_split, retain_report=retain_report,
                           retain_model=retain_model, batch_size=args.eval_batch_size, prompt_format=prompt_format,
                           max_new_tokens=args.max_new_tokens, progress=False)
    if path:
        report.save(path)
    return report


def print_table(rows: dict[str, dict]) -> str:
    header = ["model"] + [label for _, label in SHOWN]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, metrics in rows.items():
        cells = [name] + [("n/a" if metrics.get(k) is None else f"{metrics[k]:.3g}") for k, _ in SHOWN]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table, flush=True)
    return table


def plot(rows: dict[str, dict], path: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    for name, m in rows.items():
        fq = max(m.get("forget_quality") or 1e-12, 1e-12)
        ax.scatter(m["model_utility"], fq, s=80, label=name)
        ax.annotate(name, (m["model_utility"], fq), textcoords="offset points", xytext=(5, 5))
    ax.set_yscale("log")
    ax.margins(x=0.25, y=0.35)  # room for the labels inside the frame
    ax.set_xlabel("model utility (higher is better)")
    ax.set_ylabel("forget quality, KS p-value (higher is better)")
    ax.set_title("TOFU: forget quality vs model utility")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args: TofuArguments, training_args: SimNPOConfig, model_args: ModelConfig):
    out = training_args.output_dir
    os.makedirs(out, exist_ok=True)
    state = PartialState()
    embedded = model_args.model_name_or_path is None
    if embedded:
        data_dir, tokenizer, original, retrain = synthetic_setup(args, training_args, out)
        args.dataset_name = data_dir
        forget, retain = (load_qa_split(args, s) for s in (args.forget_split, args.retain()))
        retain_model = retrain
    else:
        data_dir = args.dataset_name
        tokenizer = load_tokenizer(model_args.model_name_or_path)
        forget = load_qa_split(args, args.forget_split)
        retain = load_qa_split(args, args.retain())
        original, retain_model = None, None
        if args.retain_model_name_or_path:
            from transformers import AutoModelForCausalLM

            retain_model = AutoModelForCausalLM.from_pretrained(args.retain_model_name_or_path)

    results = {}
    retain_report = args.retain_report
    if state.is_main_process and (embedded or retain_model is not None):
        report = evaluate(retain_model, tokenizer, data_dir, args, name="Retrain")
        # The retain model against itself: identical truth ratios, forget quality 1 by definition
        report.reference["retain_forget_truth_ratio"] = list(report.per_item["forget"]["truth_ratio"])
        report.metrics = report.recompute()
        report.save(os.path.join(out, "report_retrain.json"))
        retain_report = report
        results["Retrain"] = report.metrics
    if state.is_main_process and embedded:
        results["Original"] = evaluate(original, tokenizer, data_dir, args, retain_report,
                                       path=os.path.join(out, "report_original.json"), name="Original").metrics

    for method in [m.strip() for m in (args.methods or "npo,simnpo").split(",") if m.strip()]:
        trainer_cls, _ = METHODS[method]
        config = method_config(method, training_args, os.path.join(out, method), args.npo_beta)
        if embedded:
            model = copy.deepcopy(original).train()
        else:
            model = model_args.model_name_or_path
            config.model_init_kwargs = {"dtype": model_args.dtype, "revision": model_args.model_revision,
                                        "attn_implementation": model_args.attn_implementation}
        trainer = trainer_cls(model=model, args=config, forget_dataset=forget, retain_dataset=retain,
                              processing_class=tokenizer, quantization_config=get_quantization_config(model_args),
                              peft_config=get_peft_config(model_args), callbacks=[EpochProgress("unlearning")])
        print(f"Unlearning {args.forget_split} with {trainer._name} ...", flush=True)
        trainer.train()
        if state.is_main_process:
            unwrapped = trainer.accelerator.unwrap_model(trainer.model)
            report = evaluate(unwrapped, tokenizer, data_dir, args, retain_report,
                              path=os.path.join(out, f"report_{method}.json"), name=trainer._name)
            results[trainer._name] = report.metrics
            trainer.evaluation_summary = {k: report.metrics.get(k) for k, _ in SHOWN}
        trainer.save_model(config.output_dir)
        if training_args.push_to_hub:
            trainer.push_to_hub(dataset_name=args.dataset_name)

    if state.is_main_process:
        table = print_table(results)
        with open(os.path.join(out, "results.md"), "w") as f:
            f.write(table + "\n")
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
        if args.plot:
            try:
                plot(results, os.path.join(out, "results.png"))
            except ImportError:
                print("matplotlib is not installed: no plot (pip install 'trl-unlearn[plot]').")
        print(f"Reports, models and results are in {out}", flush=True)
    return results


DEFAULTS = {  # the embedded study only (no --model_name_or_path); any flag or YAML key overrides them
    "output_dir": "outputs/tofu",
    "num_train_epochs": 5,
    "per_device_train_batch_size": 4,
    "learning_rate": 1e-3,
    "beta": 2.5,
    "gradient_checkpointing": False,
    "report_to": "none",
    "save_strategy": "no",
    "logging_steps": 10,
    "disable_tqdm": True,
    "max_length": 128,
    "seed": 0,
}


def parse(argv=None):
    parser = TrlParser((TofuArguments, SimNPOConfig, ModelConfig))
    if not torch.cuda.is_available():  # TRL configs default to bf16, which needs use_cpu on a CPU
        parser.set_defaults(use_cpu=True, bf16=False)
    parsed = parser.parse_args_and_config(argv)
    if parsed[2].model_name_or_path is None:  # the embedded study: tiny-model defaults, still overridable
        parser.set_defaults(**DEFAULTS)
        parsed = parser.parse_args_and_config(argv)
    return parsed


if __name__ == "__main__":
    main(*parse())
