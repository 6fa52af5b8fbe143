"""The training scripts behind `trl-unlearn simnpo|npo|gradascent|graddiff`, in TRL's script style.

    trl-unlearn simnpo --model_name_or_path MODEL --dataset_name locuslab/TOFU --forget_split forget10 \
        --retain_split retain90 --output_dir out [--config recipe.yaml] [--use_peft ...]

Every field of the method's config (`SimNPOConfig`, ...), TRL's `ModelConfig` (PEFT / quantization flags) and
`UnlearnScriptArguments` below is a flag or a YAML key (`--config`). Works under `accelerate launch`.
"""

import os
from dataclasses import dataclass, field

from datasets import Dataset, load_dataset

from .config import GradAscentConfig, GradDiffConfig, NPOConfig, SimNPOConfig
from .synthetic import PROMPT_TEMPLATE, load_tofu_split
from .trainer import GradAscentTrainer, GradDiffTrainer, NPOTrainer, SimNPOTrainer

METHODS = {
    "simnpo": (SimNPOTrainer, SimNPOConfig),
    "npo": (NPOTrainer, NPOConfig),
    "gradascent": (GradAscentTrainer, GradAscentConfig),
    "graddiff": (GradDiffTrainer, GradDiffConfig),
}


@dataclass
class UnlearnScriptArguments:
    """Where the forget and retain data come from.

    `dataset_name` is a local folder of JSON-lines files in TOFU's layout (`forget10.json`, `retain90.json`, ...) or
    a Hub dataset id whose configs are the splits (e.g. `locuslab/TOFU`). Rows already in a TRL format are used as
    they are; question/answer rows become prompt-completion rows with `prompt_template`.
    """

    dataset_name: str | None = field(default=None, metadata={"help": "Local TOFU-layout folder or Hub dataset id."})
    forget_split: str = field(default="forget10", metadata={"help": "Forget split (file stem or Hub config)."})
    retain_split: str | None = field(default="retain90", metadata={"help": "Retain split; empty for none."})
    question_column: str = field(default="question", metadata={"help": "Column holding the question."})
    answer_column: str = field(default="answer", metadata={"help": "Column holding the answer."})
    prompt_template: str = field(default=PROMPT_TEMPLATE, metadata={"help": "Prompt built from `{question}`."})
    conversational: bool = field(
        default=False, metadata={"help": "Build conversational rows (the model's chat template) instead."}
    )


def load_qa_split(args: UnlearnScriptArguments, split: str) -> Dataset:
    """One split as a TRL dataset: a local TOFU-layout file or a Hub config, QA rows mapped to prompt-completion."""
    if args.dataset_name is None:
        raise ValueError("`--dataset_name` is required: a local TOFU-layout folder or a Hub dataset id.")
    if os.path.isdir(args.dataset_name):
        dataset = Dataset.from_list(load_tofu_split(args.dataset_name, split))
    else:
        dataset = load_dataset(args.dataset_name, name=split, split="train")
    if {"prompt", "completion"} <= set(dataset.column_names) or "text" in dataset.column_names:
        return dataset
    missing = {args.question_column, args.answer_column} - set(dataset.column_names)
    if missing:
        raise ValueError(
            f"Split {split!r} of {args.dataset_name} has columns {dataset.column_names}; expected a TRL format or "
            f"the QA columns {sorted(missing)} (set `--question_column` / `--answer_column`)."
        )
    q, a = args.question_column, args.answer_column
    if args.conversational:
        def to_trl(row):
            return {"prompt": [{"role": "user", "content": row[q]}],
                    "completion": [{"role": "assistant", "content": row[a]}]}
    else:
        def to_trl(row):
            return {"prompt": args.prompt_template.format(question=row[q]), "completion": " " + row[a]}
    return dataset.map(to_trl, remove_columns=dataset.column_names)


def make_parser(method: str, subparsers=None):
    from trl import ModelConfig, TrlParser

    _, config_cls = METHODS[method]
    types = (UnlearnScriptArguments, config_cls, ModelConfig)
    if subparsers is not None:
        return subparsers.add_parser(method, help=f"Unlearn with {method}", dataclass_types=types)
    return TrlParser(types)


def run(method: str, script_args, training_args, model_args):
    """Build the trainer from parsed arguments, train, save (model card included) and optionally push."""
    from trl import get_peft_config, get_quantization_config

    trainer_cls, _ = METHODS[method]
    training_args.model_init_kwargs = {
        "revision": model_args.model_revision,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
        **(training_args.model_init_kwargs or {}),
    }
    forget = load_qa_split(script_args, script_args.forget_split)
    retain = load_qa_split(script_args, script_args.retain_split) if script_args.retain_split else None
    trainer = trainer_cls(
        model=model_args.model_name_or_path,
        args=training_args,
        forget_dataset=forget,
        retain_dataset=retain,
        processing_class=_load_tokenizer(model_args.model_name_or_path),
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    return trainer


def method_config(method: str, base, output_dir: str, npo_beta: float | None = None):
    """The config of `method`, every shared field copied from `base` (a parsed config of another method, e.g. the
    `SimNPOConfig` an example script parses). `beta` is SimNPO's: NPO takes `npo_beta`, and GA / GradDiff, whose
    losses have no β, keep their default. Gradient ascent gets `retain_weight=0`."""
    import dataclasses

    _, config_cls = METHODS[method]
    shared = {f.name for f in dataclasses.fields(config_cls) if f.init} & {
        f.name for f in dataclasses.fields(base) if f.init
    }
    values = {n: getattr(base, n) for n in shared}
    values["output_dir"] = output_dir
    if config_cls is NPOConfig:
        values.update(beta=npo_beta if npo_beta is not None else NPOConfig.beta, precompute_ref_log_probs=None)
    elif config_cls is not SimNPOConfig:
        values.pop("beta", None)
    if method == "gradascent":
        values["retain_weight"] = 0.0
    return config_cls(**values)


def _load_tokenizer(path: str):
    """The model's tokenizer; a local `tokenizer.json` loads as `PreTrainedTokenizerFast` (AutoTokenizer can pick
    a wrong class for tokenizers saved without a class name)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if os.path.isfile(os.path.join(path, "tokenizer.json")):
        return PreTrainedTokenizerFast.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path)
