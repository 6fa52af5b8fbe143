"""`trl-unlearn simnpo|npo|gradascent|graddiff|rmu`: the training scripts, in TRL's script style.

    trl-unlearn simnpo --model_name_or_path MODEL --dataset_name locuslab/TOFU --forget_split forget10 \
        --output_dir out [--config recipe.yaml] [--use_peft ...]

Every field of the method's config (`SimNPOConfig`, ...), TRL's `ModelConfig` (PEFT / quantization flags),
`UnlearnScriptArguments` and `StudyArguments` below is a flag or a YAML key (`--config`), so one recipe serves both
this command and the example scripts (`examples/tofu.py`), which also read the study keys. Works under
`accelerate launch`. The prompt format used for training is saved beside the model (`unlearning_prompt.json`),
so `trl-unlearn eval` scores with the same one.
"""

import dataclasses
import logging
import os
from dataclasses import dataclass, field

from ..config import GradAscentConfig, GradDiffConfig, NPOConfig, SimNPOConfig
from ..data import PROMPT_TEMPLATE, load_text_corpus, load_tofu_split, qa_to_trl, text_windows
from ..rmu import RMUConfig, RMUTrainer
from ..trainer import GradAscentTrainer, GradDiffTrainer, NPOTrainer, SimNPOTrainer
from .loading import load_tokenizer, save_prompt_format

logger = logging.getLogger(__name__)

METHODS = {
    "simnpo": (SimNPOTrainer, SimNPOConfig),
    "npo": (NPOTrainer, NPOConfig),
    "gradascent": (GradAscentTrainer, GradAscentConfig),
    "graddiff": (GradDiffTrainer, GradDiffConfig),
    "rmu": (RMUTrainer, RMUConfig),
}
TOFU_RETAIN = {"forget01": "retain99", "forget05": "retain95", "forget10": "retain90"}


@dataclass
class UnlearnScriptArguments:
    """Where the forget and retain data come from.

    `dataset_name` is a local folder of JSON-lines files in TOFU's layout (`forget10.json`, `retain90.json`, ...), a
    local folder in MUSE's layout (`raw/forget.txt`, `raw/retain1.txt`), or a Hub dataset id: its configs are the
    splits (`locuslab/TOFU`), or with `dataset_config` its raw-text splits (`muse-bench/MUSE-News`, config `raw`).
    Rows already in a TRL format are used as they are; question/answer rows become prompt-completion rows with
    `prompt_template` (or conversational rows); raw text is cut into `max_length` windows (every token scored).
    """

    dataset_name: str | None = field(
        default=None, metadata={"help": "Local TOFU- or MUSE-layout folder, or Hub dataset id."}
    )
    dataset_config: str | None = field(
        default=None, metadata={"help": "Hub config holding raw-text splits (MUSE: 'raw'); default: configs = splits."}
    )
    forget_split: str = field(default="forget10", metadata={"help": "Forget split (file stem or Hub config)."})
    retain_split: str | None = field(
        default=None, metadata={"help": "Retain split (default: the complement of a TOFU forget split); 'none': none."}
    )
    question_column: str = field(default="question", metadata={"help": "Column holding the question."})
    answer_column: str = field(default="answer", metadata={"help": "Column holding the answer."})
    prompt_template: str = field(default=PROMPT_TEMPLATE, metadata={"help": "Prompt built from `{question}`."})
    conversational: bool = field(
        default=False, metadata={"help": "Build conversational rows (the model's chat template) instead."}
    )

    def retain(self) -> str | None:
        if self.retain_split is not None:
            return None if self.retain_split.lower() in ("", "none") else self.retain_split
        if self.forget_split not in TOFU_RETAIN:
            raise ValueError(f"`--retain_split` is needed ('none' for no retain data): {self.forget_split!r} is not "
                             "a TOFU forget split.")
        return TOFU_RETAIN[self.forget_split]

    def prompt_format(self) -> str:
        """What `trl-unlearn eval --prompt_format` takes to score as this run trained."""
        return "chat" if self.conversational else self.prompt_template


@dataclass
class StudyArguments:
    """Keys of the example studies (`examples/tofu.py`, `examples/muse.py`) that a recipe may hold. The training
    command trains one method and does not evaluate: it warns about the evaluation keys it leaves unused."""

    methods: str | None = field(default=None, metadata={"help": "Comma-separated methods (example scripts)."})
    npo_beta: float = field(default=0.1, metadata={"help": "β of NPO in a multi-method study (SimNPO's is `--beta`)."})
    retain_model_name_or_path: str | None = field(default=None, metadata={"help": "Retain model, for forget quality."})
    retain_report: str | None = field(default=None, metadata={"help": "Saved EvalReport of the retain model."})
    eval_batch_size: int = field(default=32, metadata={"help": "Batch size for evaluation scoring/generation."})
    max_new_tokens: int = field(default=64, metadata={"help": "Greedy answer length for ROUGE."})
    eval_dir: str | None = field(default=None, metadata={"help": "MUSE: verbmem/knowmem/privleak folder."})
    auc_retrain: float | None = field(default=None, metadata={"help": "MUSE: the retrained model's PrivLeak AUC."})


def is_text_corpus(args: UnlearnScriptArguments) -> bool:
    """Raw-text (MUSE-layout) data rather than QA / TRL rows."""
    name = args.dataset_name
    return args.dataset_config is not None or (name is not None and os.path.isdir(os.path.join(name, "raw")))


def load_split(args: UnlearnScriptArguments, split: str, tokenizer, max_length: int):
    """One split as a TRL dataset: raw-text corpora cut into windows, or `load_qa_split`."""
    if is_text_corpus(args):
        return text_windows(load_text_corpus(args.dataset_name, split, args.dataset_config or "raw"), tokenizer,
                            max_length)
    return load_qa_split(args, split)


def load_qa_split(args: UnlearnScriptArguments, split: str):
    """One split as a TRL dataset: a local TOFU-layout file or a Hub config, QA rows mapped to prompt-completion."""
    from datasets import Dataset, load_dataset

    if args.dataset_name is None:
        raise ValueError("`--dataset_name` is required: a local TOFU- or MUSE-layout folder or a Hub dataset id.")
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
    template = None if args.conversational else args.prompt_template
    return qa_to_trl(dataset, template, args.question_column, args.answer_column)


def make_parser(method: str):
    from trl import ModelConfig, TrlParser

    _, config_cls = METHODS[method]
    return TrlParser((UnlearnScriptArguments, StudyArguments, config_cls, ModelConfig), prog=f"trl-unlearn {method}")


def parse(parser, method: str, argv):
    """`(script_args, training_args, model_args)` from the command line and `--config`; study keys of a recipe are
    accepted (a warning names the evaluation keys left unused), any other unknown key is an error."""
    script, study, training, model, unknown_config, unknown_args = parser.parse_args_and_config(
        argv, return_remaining_strings=True, separate_remaining_strings=True
    )
    unknown = unknown_config + unknown_args
    if unknown:
        raise ValueError(f"Unknown arguments for `trl-unlearn {method}`: {unknown} (see `trl-unlearn {method} --help`).")
    if study.methods is not None and [m.strip() for m in study.methods.split(",")] != [method]:
        raise ValueError(
            f"The recipe says `methods: {study.methods}` but this command trains {method!r}: run `trl-unlearn "
            f"<method>` once per method, or run the example script, which trains several."
        )
    defaults = StudyArguments()
    if method == "npo" and study.npo_beta != defaults.npo_beta:  # the recipes name NPO's β `npo_beta`
        if training.beta not in (NPOConfig.beta, study.npo_beta):
            raise ValueError(f"`beta={training.beta}` and `npo_beta={study.npo_beta}` disagree: set one.")
        training.beta = study.npo_beta
    unused = [f.name for f in dataclasses.fields(StudyArguments)
              if f.name not in ("methods", "npo_beta") and getattr(study, f.name) != getattr(defaults, f.name)]
    if unused:
        logger.warning(
            f"Recipe keys {unused} drive the example scripts' evaluation; `trl-unlearn {method}` only trains. "
            "Evaluate the saved model with `trl-unlearn eval tofu|muse ...`."
        )
    return script, training, model


def run(method: str, script_args, training_args, model_args):
    """Build the trainer from parsed arguments, train, save (model card and prompt format included), push."""
    from trl import get_peft_config, get_quantization_config

    if model_args.model_name_or_path is None:
        raise ValueError("`--model_name_or_path` is required: a local model folder or a Hub model id.")
    trainer_cls, _ = METHODS[method]
    training_args.model_init_kwargs = {
        "revision": model_args.model_revision,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
        **(training_args.model_init_kwargs or {}),
    }
    retain_split = script_args.retain()
    tokenizer = load_tokenizer(model_args.model_name_or_path)
    forget = load_split(script_args, script_args.forget_split, tokenizer, training_args.max_length)
    retain = load_split(script_args, retain_split, tokenizer, training_args.max_length) if retain_split else None
    trainer = trainer_cls(
        model=model_args.model_name_or_path,
        args=training_args,
        forget_dataset=forget,
        retain_dataset=retain,
        processing_class=tokenizer,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
    )
    name = script_args.dataset_name
    hub = [] if os.path.isdir(name) else [name]
    trainer.card_data.update(
        forget_data=f"{name} ({script_args.forget_split}), {len(trainer.train_dataset.forget)} examples",
        retain_data=f"{name} ({retain_split}), {len(retain)} examples" if retain is not None else "none",
        datasets=hub, prompt_format=None if is_text_corpus(script_args) else script_args.prompt_format(),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    if trainer.is_world_process_zero() and not is_text_corpus(script_args):
        save_prompt_format(training_args.output_dir, script_args.prompt_format())
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=hub[0] if hub else None)
    return trainer


def method_config(method: str, base, output_dir: str, npo_beta: float | None = None):
    """The config of `method`, every shared field copied from `base` (a parsed config of another method, e.g. the
    `SimNPOConfig` an example script parses). `beta` is SimNPO's: NPO takes `npo_beta`, and GA / GradDiff, whose
    losses have no β, keep their default. Gradient ascent gets `retain_weight=0`; RMU keeps its own weights and lr."""
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
    if method == "rmu":  # RMU's own scales (α = retain_weight, its lr) are not the likelihood losses'
        for name in ("retain_weight", "forget_weight", "learning_rate", "retain_loss_type", "precompute_ref_log_probs"):
            values.pop(name, None)
    return config_cls(**values)
