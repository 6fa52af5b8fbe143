"""`trl-unlearn tune METHOD`: find a method's setting with Optuna, under a declared rule (`trl_unlearn.tuning`).

    trl-unlearn tune simnpo --model_name_or_path M --data_dir D --forget_split forget10 --retain_report R.json \
        --n_trials 20 --output_dir O [--storage sqlite:///O.db] [--config recipe.yaml]

`--config`: a training recipe (keys of `trl-unlearn METHOD`) every trial starts from, with an optional
`search_space:` mapping that overrides the default space. Writes `O/tuning.json`, `O/pareto.png`, `O/best.yaml`.
The data are read as `trl-unlearn METHOD` reads them (the recipe's `prompt_template`, `conversational`, QA
columns); scoring uses the TOFU evaluation sets of `--data_dir`. The search itself: `trl_unlearn.tuning`.
"""

from __future__ import annotations

import argparse
import os

__all__ = ["register_tune"]


def _seeds(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated integers, e.g. 1,2,3") from None


def register_tune(subparsers) -> None:
    from ..methods import REGISTRY

    p = subparsers.add_parser(
        "tune",
        help="tune a method with Optuna under a declared selection rule",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("method", help=f"one of {', '.join(REGISTRY)}")
    p.add_argument("--model_name_or_path", required=True, help="the model to unlearn from (folder or Hub id)")
    p.add_argument("--data_dir", required=True, help="TOFU-layout folder: forget/retain splits and evaluation sets")
    p.add_argument("--forget_split", default="forget10")
    p.add_argument("--retain_split", default=None, help="default: the complement of a TOFU forget split")
    p.add_argument(
        "--retain_report",
        default=None,
        help="the retain model's report on this split (`trl-unlearn eval tofu`), for forget quality",
    )
    p.add_argument("--output_dir", required=True, help="where tuning.json, pareto.png and best.yaml go")
    p.add_argument("--config", default=None, help="training recipe YAML; its `search_space:` overrides the space")
    p.add_argument("--search_space", default=None, help="a YAML file of search-space overrides (or use --config)")
    p.add_argument("--n_trials", type=int, default=20, help="finished trials the study should hold (default 20)")
    p.add_argument("--timeout", type=float, default=None, help="stop starting trials after this many seconds")
    p.add_argument(
        "--storage",
        default=None,
        help="Optuna storage: RDB URL or journal:PATH (default sqlite:///OUTPUT_DIR/study.db)",
    )
    p.add_argument("--study_name", default=None, help="default: METHOD-FORGET_SPLIT")
    p.add_argument("--tuning_seeds", type=_seeds, default=[0], help="seeds a trial trains with (default 0)")
    p.add_argument(
        "--report_seeds",
        type=_seeds,
        default=[1, 2, 3],
        help="fresh seeds the selected setting is reported on (default 1,2,3; '' for none)",
    )
    p.add_argument(
        "--utility_floor",
        type=float,
        default=0.95,
        help="keep trials with utility >= this x the original model's (default 0.95)",
    )
    p.add_argument(
        "--base_learning_rate",
        type=float,
        default=None,
        help="lr_mult multiplies this (e.g. the fine-tuning lr); default: the method's default lr",
    )
    p.add_argument("--sampler_seed", type=int, default=0, help="seed of Optuna's TPE sampler (default 0)")
    p.add_argument(
        "--no_report_generation", action="store_true", help="report seeds scored without generation only (no ROUGE)"
    )
    p.add_argument("--eval_batch_size", type=int, default=32)
    p.set_defaults(func=_run_tune)


def _read_yaml(path: str, what: str) -> dict:
    import yaml

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path!r}")
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a {what} is a YAML mapping of keys to values.")
    return data


def _recipe_parts(method: str, recipe: dict, data_dir: str, forget_split: str, retain_split: str | None):
    """Split a recipe into (data keys, config keys, model keys) with the training command's parser; unknown keys
    are an error. The data keys get `--data_dir` / `--forget_split` / `--retain_split`."""
    import dataclasses

    from trl import ModelConfig

    from .train import METHODS, StudyArguments, UnlearnScriptArguments, make_parser

    recipe = {k: v for k, v in recipe.items() if k != "search_space"}
    data = {**recipe, "dataset_name": data_dir, "forget_split": forget_split}
    if retain_split is not None:
        data["retain_split"] = retain_split
    try:
        parsed = make_parser(method).parse_dict({**data, "output_dir": "unused"})
    except ValueError as e:
        raise ValueError(f"recipe: {str(e).splitlines()[0]} (see `trl-unlearn {method} --help`).") from None
    names = [{f.name for f in dataclasses.fields(c)} for c in (UnlearnScriptArguments, StudyArguments)]
    config_fields = {f.name for f in dataclasses.fields(METHODS[method][1])}
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    data_keys = {k: v for k, v in data.items() if k in names[0]}
    config_keys = {k: v for k, v in recipe.items() if k in config_fields and k not in data_keys}
    model_keys = {k: v for k, v in recipe.items() if k in model_fields and k not in config_fields}
    return parsed, data_keys, config_keys, model_keys


def _run_tune(args) -> int:
    from ..methods import REGISTRY

    if args.method not in REGISTRY:
        raise ValueError(f"Unknown method {args.method!r}: choose one of {', '.join(REGISTRY)}.")
    from trl import get_peft_config, get_quantization_config

    from ..loading import check_model_path, load_tokenizer
    from ..tuning.selection import SelectionRule
    from ..tuning.study import tune
    from .train import load_split

    recipe = _read_yaml(args.config, "recipe") if args.config else {}
    space = _read_yaml(args.search_space, "search space") if args.search_space else None
    if "search_space" in recipe:
        if space is not None:
            raise ValueError("search space given twice (recipe `search_space:` and --search_space): keep one.")
        space = recipe["search_space"]
    (script, _, config, model_args), data_keys, config_keys, model_keys = _recipe_parts(
        args.method, recipe, args.data_dir, args.forget_split, args.retain_split
    )
    if not os.path.isdir(args.data_dir):
        raise FileNotFoundError(f"--data_dir {args.data_dir!r} is not a folder: give a TOFU-layout folder.")
    check_model_path(args.model_name_or_path)
    tokenizer = load_tokenizer(args.model_name_or_path)
    retain_split = script.retain()
    forget = load_split(script, args.forget_split, tokenizer, config.max_length)
    retain = load_split(script, retain_split, tokenizer, config.max_length, "retain") if retain_split else None
    if model_keys:
        config_keys["model_init_kwargs"] = {
            "revision": model_args.model_revision,
            "dtype": model_args.dtype,
            "attn_implementation": model_args.attn_implementation,
            **(config_keys.get("model_init_kwargs") or {}),
        }
    tune(
        args.method,
        args.model_name_or_path,
        args.data_dir,
        output_dir=args.output_dir,
        forget_split=args.forget_split,
        retain_split=args.retain_split,
        retain_report=args.retain_report,
        recipe=config_keys,
        search_space=space,
        forget_dataset=forget,
        retain_dataset=retain,
        prompt_format=script.prompt_format(),
        peft_config=get_peft_config(model_args),
        quantization_config=get_quantization_config(model_args),
        recipe_data={**data_keys, **model_keys},
        n_trials=args.n_trials,
        timeout=args.timeout,
        storage=args.storage,
        study_name=args.study_name,
        tuning_seeds=args.tuning_seeds,
        report_seeds=args.report_seeds,
        rule=SelectionRule(utility_floor=args.utility_floor),
        base_learning_rate=args.base_learning_rate,
        sampler_seed=args.sampler_seed,
        report_generation=not args.no_report_generation,
        eval_batch_size=args.eval_batch_size,
    )
    return 0
