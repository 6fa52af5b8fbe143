"""`trl-unlearn simnpo|npo|gradascent|graddiff|rmu`: the training scripts, in TRL's script style.

    trl-unlearn simnpo --model_name_or_path MODEL --dataset_name locuslab/TOFU --forget_split forget10 \
        --output_dir out [--config recipe.yaml] [--use_peft ...]
    trl-unlearn rmu --config examples/recipes/wmdp_rmu.yaml     # forget and retain text from two datasets

Every field of the method's config (`SimNPOConfig`, ...), TRL's `ModelConfig` (PEFT / quantization flags),
`UnlearnScriptArguments` and `StudyArguments` below is a flag or a YAML key (`--config`), so one recipe serves both
this command and the example scripts (`examples/tofu.py`), which also read the study keys. Works under
`accelerate launch`. The prompt format used for training is saved beside the model (`unlearning_prompt.json`),
so `trl-unlearn eval` scores with the same one.
"""

import argparse
import dataclasses
import logging
import os
import sys
from dataclasses import dataclass, field

from .. import outputs
from ..data.files import drop_short_documents, load_text_corpus, load_tofu_split
from ..data.formats import PROMPT_TEMPLATE, qa_to_trl
from ..data.tokenize import text_documents, text_windows
from ..loading import check_model_path, check_weights, load_tokenizer
from ..methods import REGISTRY, get_method
from ..methods.base import EARLY_STOP_EXIT_CODE, PREEMPTED_EXIT_CODE
from ..methods.npo import NPOConfig

logger = logging.getLogger(__name__)

METHODS = {name: get_method(name) for name in REGISTRY}  # name -> (trainer class, config class)
TOFU_RETAIN = {"forget01": "retain99", "forget05": "retain95", "forget10": "retain90"}


TEXT_ROWS = ("windows", "documents")


@dataclass
class UnlearnScriptArguments:
    """Where the forget and retain data come from, and how raw text becomes rows.

    `dataset_name` is a local folder of JSON-lines files in TOFU's layout (`forget10.json`, `retain90.json`, ...), a
    local folder of raw text in MUSE's layout (`raw/forget.txt`, `raw/retain1.txt`) or as JSON lines
    (`<split>.jsonl`, documents under `text_column`), or a Hub dataset id: its configs are the splits
    (`locuslab/TOFU`), or with `dataset_config` a config of raw-text splits (`muse-bench/MUSE-News`, config `raw`;
    `cais/wmdp-corpora`, config `cyber-forget-corpus`). The retain split comes from the same dataset, or from
    `retain_dataset_name` / `retain_dataset_config` (WMDP: retain text from `Salesforce/wikitext`); each dataset's
    kind is found on its own. Rows already in a TRL format are used as they are; question/answer rows become
    prompt-completion rows with `prompt_template` (or conversational rows); raw text becomes language-modeling rows:
    `max_length` windows of the concatenated documents (`text_rows="windows"`, MUSE) or one row per document,
    truncated to `max_length` tokens by the trainer (`"documents"`, the WMDP code).
    """

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Forget data: a local TOFU-, MUSE- or JSON-lines-layout folder, or a Hub dataset id."},
    )
    dataset_config: str | None = field(
        default=None, metadata={"help": "Hub config holding raw-text splits (MUSE: 'raw'); default: configs = splits."}
    )
    retain_dataset_name: str | None = field(
        default=None,
        metadata={"help": "Retain data from another dataset (same kinds of value); default: dataset_name."},
    )
    retain_dataset_config: str | None = field(
        default=None,
        metadata={
            "help": "Hub config of the retain data; default: dataset_config if the retain data come from "
            "dataset_name, else none."
        },
    )
    forget_split: str = field(default="forget10", metadata={"help": "Forget split (file stem or Hub config/split)."})
    retain_split: str | None = field(
        default=None, metadata={"help": "Retain split (default: the complement of a TOFU forget split); 'none': none."}
    )
    text_column: str = field(default="text", metadata={"help": "Raw text: the column / JSON key of the documents."})
    text_rows: str = field(
        default="windows",
        metadata={
            "help": "Raw text into rows: 'windows' (the documents concatenated and cut into max_length-token "
            "windows, MUSE) or 'documents' (one row per document, truncated to max_length, WMDP).",
            "choices": list(TEXT_ROWS),
        },
    )
    min_text_chars: int = field(
        default=0,
        metadata={
            "help": "Raw text: drop documents of at most this many characters (empty and whitespace-only ones "
            "are always dropped); the SimNPO authors' WMDP code: 50."
        },
    )
    question_column: str = field(default="question", metadata={"help": "Column holding the question."})
    answer_column: str = field(default="answer", metadata={"help": "Column holding the answer."})
    prompt_template: str = field(default=PROMPT_TEMPLATE, metadata={"help": "Prompt built from `{question}`."})
    conversational: bool = field(
        default=False, metadata={"help": "Build conversational rows (the model's chat template) instead."}
    )

    def __post_init__(self):
        if self.text_rows not in TEXT_ROWS:
            raise ValueError(f"`text_rows={self.text_rows!r}`: use 'windows' (MUSE) or 'documents' (WMDP).")
        if self.min_text_chars < 0:
            raise ValueError(f"`min_text_chars={self.min_text_chars}` must be >= 0 (0 drops only empty documents).")

    def retain(self) -> str | None:
        if self.retain_split is not None:
            return None if self.retain_split.lower() in ("", "none") else self.retain_split
        if self.forget_split not in TOFU_RETAIN:
            raise ValueError(
                f"No retain split for `--forget_split {self.forget_split}`: the retain split is inferred "
                f"only for TOFU's forget splits ({', '.join(TOFU_RETAIN)}). Check the forget split's "
                "name, or pass `--retain_split` ('none' for no retain data)."
            )
        return TOFU_RETAIN[self.forget_split]

    def source(self, role: str = "forget") -> tuple[str, str | None]:
        """`(dataset, config)` of the forget or retain data."""
        if self.dataset_name is None:
            raise ValueError(
                "`--dataset_name` is required: a local TOFU-, MUSE- or JSON-lines-layout folder or a Hub dataset id."
            )
        if role == "forget" or self.retain_dataset_name in (None, self.dataset_name):
            config = self.dataset_config if role == "forget" else self.retain_dataset_config or self.dataset_config
            return self.dataset_name, config
        return self.retain_dataset_name, self.retain_dataset_config

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


def is_text_corpus(name: str, config: str | None, split: str) -> bool:
    """Raw text (documents) rather than QA / TRL rows: a local MUSE-layout folder (`raw/`), a local folder with
    `<split>.jsonl` (or, without `<split>.json`, other `.jsonl` files), or a Hub dataset named with a config. A path
    that is no folder is an error naming the layouts."""
    if os.path.isdir(name):
        if os.path.isdir(os.path.join(name, "raw")) or os.path.isfile(os.path.join(name, f"{split}.jsonl")):
            return True
        jsonl = any(f.endswith(".jsonl") for f in os.listdir(name))
        return jsonl and not os.path.isfile(os.path.join(name, f"{split}.json"))
    if os.path.exists(name) or name.startswith(("/", "./", "../", "~")):
        raise ValueError(
            f"Dataset {name!r} is not a folder: give a folder in TOFU's layout (<folder>/<split>.json), MUSE's "
            "(<folder>/raw/<split>.txt) or of JSON lines (<folder>/<split>.jsonl, documents under `text_column`), or "
            "a Hub dataset id."
        )
    return config is not None


def load_split(args: UnlearnScriptArguments, split: str, tokenizer, max_length: int, role: str = "forget"):
    """The forget or retain split as a TRL dataset: raw text as `text_rows` (windows or documents) after dropping
    empty and short documents (counted warning), or `load_qa_split`."""
    name, config = args.source(role)
    if not is_text_corpus(name, config, split):
        return load_qa_split(args, split, name)
    texts = load_text_corpus(name, split, config, args.text_column)
    texts = drop_short_documents(texts, f"{role} ({name}, {split})", args.min_text_chars)
    return text_documents(texts) if args.text_rows == "documents" else text_windows(texts, tokenizer, max_length)


def describe_split(args: UnlearnScriptArguments, split: str, role: str, num_rows: int, max_length: int) -> str:
    """The model card's `forget_data` / `retain_data` line: dataset, config, split, rows and how text became rows."""
    name, config = args.source(role)
    line = f"{name} ({f'{config}, ' if config and not os.path.isdir(name) else ''}{split}), {num_rows} examples"
    if is_text_corpus(name, config, split):
        line += (
            f": documents truncated to {max_length} tokens"
            if args.text_rows == "documents"
            else f": {max_length}-token windows"
        )
    return line


def load_qa_split(args: UnlearnScriptArguments, split: str, dataset_name: str | None = None):
    """One split of `dataset_name` (default: `args.dataset_name`) as a TRL dataset: a local TOFU-layout file or a Hub
    config, QA rows mapped to prompt-completion."""
    from datasets import Dataset, load_dataset

    name = dataset_name or args.dataset_name
    if name is None:
        raise ValueError("`--dataset_name` is required: a local TOFU- or MUSE-layout folder or a Hub dataset id.")
    if os.path.isdir(name):
        dataset = Dataset.from_list(load_tofu_split(name, split))
    else:
        dataset = load_dataset(name, name=split, split="train")
    if {"prompt", "completion"} <= set(dataset.column_names) or "text" in dataset.column_names:
        return dataset
    missing = {args.question_column, args.answer_column} - set(dataset.column_names)
    if missing:
        raise ValueError(
            f"Split {split!r} of {name} has columns {dataset.column_names}; expected a TRL format or "
            f"the QA columns {sorted(missing)} (set `--question_column` / `--answer_column`)."
        )
    template = None if args.conversational else args.prompt_template
    return qa_to_trl(dataset, template, args.question_column, args.answer_column)


COMMON_FLAGS = (
    "model_name_or_path",
    "dataset_name",
    "forget_split",
    "retain_split",
    "output_dir",
    "overwrite_output_dir",
    "resume_from_checkpoint",
    "beta",
    "gamma",
    "forget_weight",
    "retain_weight",
    "retain_loss_type",
    "learning_rate",
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "max_length",
    "save_steps",
    "seed",
    "use_peft",
    "push_to_hub",
)  # `--help` lists these first, in this order, after `--config`


def make_parser(method: str):
    """The method's `TrlParser`; its `--help` shows `--config` first, then `COMMON_FLAGS`, then every other flag."""
    from trl import ModelConfig, TrlParser

    _, config_cls = METHODS[method]
    parser = TrlParser(
        (UnlearnScriptArguments, StudyArguments, config_cls, ModelConfig),
        prog=f"trl-unlearn {method}",
        usage=f"trl-unlearn {method} [--config RECIPE.yaml] [--FLAG VALUE ...]",
    )
    recipe = parser.add_argument_group("recipe")
    # TrlParser reads `--config` itself, before argparse: this entry is for `--help` (SUPPRESS: never a value)
    recipe.add_argument(
        "--config",
        metavar="RECIPE.yaml",
        default=argparse.SUPPRESS,
        help="YAML file whose keys are any of the flags below; flags on the command line win",
    )
    common = parser.add_argument_group("common flags (every flag is listed after them)")
    for group in parser._action_groups:
        for action in [a for a in group._group_actions if a.dest in COMMON_FLAGS]:
            group._group_actions.remove(action)
            common._group_actions.append(action)
    common._group_actions.sort(key=lambda a: COMMON_FLAGS.index(a.dest))
    parser._action_groups = [recipe, common] + [g for g in parser._action_groups if g not in (recipe, common)]
    return parser


def _config_path(argv) -> str | None:
    return argv[argv.index("--config") + 1] if "--config" in argv[:-1] else None


def parse(parser, method: str, argv):
    """`(script_args, training_args, model_args)` from the command line and `--config`; study keys of a recipe are
    accepted (a warning names the evaluation keys left unused), any other unknown key is an error."""
    import yaml

    argv = [part for a in argv for part in (a.split("=", 1) if a.startswith("--config=") else [a])]
    try:
        script, study, training, model, unknown_config, unknown_args = parser.parse_args_and_config(
            argv, return_remaining_strings=True, separate_remaining_strings=True
        )
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{_config_path(argv)}:{mark.line + 1}:{mark.column + 1}" if mark else _config_path(argv)
        problem = getattr(e, "problem", None) or type(e).__name__
        raise ValueError(
            f"{where}: malformed YAML ({problem}): fix the recipe there (`key: value`, one a line)."
        ) from e
    unknown = unknown_config + unknown_args
    if unknown:
        raise ValueError(
            f"Unknown arguments for `trl-unlearn {method}`: {unknown} (see `trl-unlearn {method} --help`)."
        )
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
    unused = [
        f.name
        for f in dataclasses.fields(StudyArguments)
        if f.name not in ("methods", "npo_beta") and getattr(study, f.name) != getattr(defaults, f.name)
    ]
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
    check_model_path(model_args.model_name_or_path)
    check_weights(model_args.model_name_or_path)
    reading = {
        "--model_name_or_path": model_args.model_name_or_path,
        "--dataset_name": script_args.dataset_name,
        "--retain_dataset_name": script_args.retain_dataset_name,
    }
    outputs.check_output_dir(training_args.output_dir, reading)
    resume = outputs.resume_flag(training_args.resume_from_checkpoint)
    outputs.check_previous_run(training_args.output_dir, training_args.overwrite_output_dir, bool(resume))
    trainer_cls, _ = METHODS[method]
    training_args.model_init_kwargs = {
        "revision": model_args.model_revision,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
        **(training_args.model_init_kwargs or {}),
    }
    tokenizer = load_tokenizer(model_args.model_name_or_path)
    max_length = training_args.max_length
    forget = load_split(script_args, script_args.forget_split, tokenizer, max_length)  # a wrong name fails here
    retain_split = script_args.retain()
    if retain_split is None and (script_args.retain_dataset_name or script_args.retain_dataset_config):
        logger.warning("`retain_split` is 'none': `retain_dataset_name` / `retain_dataset_config` are not used.")
    retain = load_split(script_args, retain_split, tokenizer, max_length, "retain") if retain_split else None
    trainer = trainer_cls(
        model=model_args.model_name_or_path,
        args=training_args,
        forget_dataset=forget,
        retain_dataset=retain,
        processing_class=tokenizer,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
    )
    rows = trainer.train_dataset
    sources = [script_args.source("forget")] + ([script_args.source("retain")] if rows.retain is not None else [])
    hub = list(dict.fromkeys(name for name, _ in sources if not os.path.isdir(name)))
    qa = not is_text_corpus(*script_args.source("forget"), script_args.forget_split)
    trainer.card_data.update(
        forget_data=describe_split(script_args, script_args.forget_split, "forget", len(rows.forget), max_length),
        retain_data=(
            describe_split(script_args, retain_split, "retain", len(rows.retain), max_length)
            if rows.retain is not None
            else "none"
        ),
        datasets=hub,
        prompt_format=script_args.prompt_format() if qa else None,
    )
    trainer.train(resume_from_checkpoint=resume)
    if trainer.preempted_at is not None:  # the checkpoint is the run's state; a final model would claim too much
        return trainer
    trainer.save_model(training_args.output_dir)  # with the card and the prompt format (`card_data`)
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=hub[0] if hub else None)
    return trainer


def exit_code(trainer) -> int:
    """0 for a run that took all its steps; `PREEMPTED_EXIT_CODE` (143) after a SIGTERM, `EARLY_STOP_EXIT_CODE` (3)
    after a callback stopped training, each with one line on stderr saying where it stopped and what is saved."""
    out = trainer.args.output_dir
    if trainer.preempted_at is not None:
        if trainer.is_world_process_zero():
            print(
                f"trl-unlearn: stopped by SIGTERM at step {trainer.preempted_at} of {trainer.state.max_steps}: "
                f"checkpoint {os.path.join(out, f'checkpoint-{trainer.preempted_at}')} saved, no final model. "
                "Resume with `--resume_from_checkpoint true`.",
                file=sys.stderr,
            )
        return PREEMPTED_EXIT_CODE
    if trainer.stop_reason is not None:
        if trainer.is_world_process_zero():
            print(f"trl-unlearn: {trainer.card_data['training']}. Model and card saved in {out}.", file=sys.stderr)
        return EARLY_STOP_EXIT_CODE
    return 0
