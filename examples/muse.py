"""Unlearn a MUSE corpus (News or Books) and evaluate VerbMem, KnowMem and PrivLeak.

    accelerate launch --config_file examples/accelerate_configs/deepspeed_zero3.yaml examples/muse.py \
        --config examples/recipes/muse_news_simnpo.yaml

MUSE trains on raw text: the forget and retain corpora are cut into windows of `max_length` tokens and every token is
scored (language-modeling rows). `--dataset_name` is either a local folder in muse_bench's layout (`raw/forget.txt`,
`raw/retain1.txt`, plus the evaluation files `verbmem/`, `knowmem/`, `privleak/`, see docs/evaluation.md) or a Hub id
(`muse-bench/MUSE-News`, `muse-bench/MUSE-Books`: config `raw`, splits `forget`, `retain1`; the evaluation files must
then be given locally with `--eval_dir`). The same recipe trains one method with `trl-unlearn simnpo --config ...`.
PrivLeak needs the retrained model's AUC (`--auc_retrain`) or report.
"""

import json
import os
from dataclasses import dataclass, field

from accelerate import PartialState
from study import method_config
from trl import ModelConfig, TrlParser, get_peft_config, get_quantization_config

from trl_unlearn import SimNPOConfig
from trl_unlearn.cli.train import METHODS, StudyArguments, UnlearnScriptArguments, load_split
from trl_unlearn.evaluation import evaluate_muse
from trl_unlearn.loading import load_tokenizer


@dataclass
class MuseArguments(UnlearnScriptArguments, StudyArguments):
    """The training command's data keys and the study keys, so a recipe serves both; MUSE defaults."""

    forget_split: str = field(default="forget", metadata={"help": "Forget corpus: raw/<name>.txt or Hub split."})
    retain_split: str | None = field(
        default="retain1", metadata={"help": "Retain corpus: raw/<name>.txt or Hub split."}
    )
    methods: str | None = field(
        default="simnpo", metadata={"help": "Comma-separated: simnpo, npo, gradascent, graddiff."}
    )
    retrain_report: str | None = field(default=None, metadata={"help": "Retrained model's saved MUSE report."})
    eval_batch_size: int = field(default=8, metadata={"help": "Batch size for evaluation."})
    skip_eval: bool = field(default=False, metadata={"help": "Only unlearn and save."})


def main(args: MuseArguments, training_args: SimNPOConfig, model_args: ModelConfig):
    if args.dataset_name is None or model_args.model_name_or_path is None:
        raise ValueError("examples/muse.py needs --model_name_or_path and --dataset_name (see the module docstring).")
    tokenizer = load_tokenizer(model_args.model_name_or_path)
    args.dataset_config = args.dataset_config or "raw"
    forget = load_split(args, args.forget_split, tokenizer, training_args.max_length)
    retain = load_split(args, args.retain(), tokenizer, training_args.max_length, "retain")
    results = {}
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        trainer_cls, _ = METHODS[method]
        config = method_config(method, training_args, os.path.join(training_args.output_dir, method), args.npo_beta)
        config.model_init_kwargs = {
            "dtype": model_args.dtype,
            "revision": model_args.model_revision,
            "attn_implementation": model_args.attn_implementation,
        }
        trainer = trainer_cls(
            model=model_args.model_name_or_path,
            args=config,
            forget_dataset=forget,
            retain_dataset=retain,
            processing_class=tokenizer,
            quantization_config=get_quantization_config(model_args),
            peft_config=get_peft_config(model_args),
        )
        trainer.train()
        if not args.skip_eval and PartialState().is_main_process:
            model = trainer.accelerator.unwrap_model(trainer.model).eval()
            report = evaluate_muse(
                model,
                tokenizer,
                args.eval_dir or args.dataset_name,
                auc_retrain=args.auc_retrain,
                retrain_report=args.retrain_report,
                batch_size=args.eval_batch_size,
                max_length=training_args.max_length,
                progress=False,
            )
            report.save(os.path.join(config.output_dir, "muse_report.json"))
            report.print_table()
            results[trainer._name] = report.metrics
            trainer.evaluation_summary = {k: v for k, v in report.metrics.items() if v is not None}
        trainer.save_model(config.output_dir)
        if training_args.push_to_hub:
            trainer.push_to_hub(dataset_name=args.dataset_name)
    if results and PartialState().is_main_process:
        with open(os.path.join(training_args.output_dir, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main(*TrlParser((MuseArguments, SimNPOConfig, ModelConfig)).parse_args_and_config())
