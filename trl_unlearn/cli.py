"""The `trl-unlearn` command.

    trl-unlearn eval tofu --model PATH --data_dir DIR --split forget10 --output report.json [--retain_report R]
    trl-unlearn eval muse --model PATH --data_dir DIR --output report.json [--auc_retrain X | --retrain_report R]
    trl-unlearn simnpo|npo|gradascent|graddiff --model_name_or_path M --dataset_name D [--config recipe.yaml] ...

Each command group is added by a `register(subparsers)` function listed in `COMMAND_GROUPS`; a group sets
`func` (called with the parsed arguments, returns an exit code) on each of its leaf parsers. Training commands
are another group appended there.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

__all__ = ["COMMAND_GROUPS", "build_parser", "load_model_and_tokenizer", "main"]


def load_model_and_tokenizer(model_path: str, tokenizer_path: str | None = None, dtype: str = "auto", device=None):
    """`AutoModelForCausalLM.from_pretrained(model_path)` in eval mode on `device` (default: CUDA when available),
    and its tokenizer (`PreTrainedTokenizerFast` when the folder has a ``tokenizer.json``, else `AutoTokenizer`)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

    tokenizer_path = tokenizer_path or model_path
    if os.path.isfile(os.path.join(tokenizer_path, "tokenizer.json")):
        tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_path)
    else:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    return model, tokenizer


# ------------------------------------------------------------------------------------------------------ eval


def _add_common_eval_args(p: argparse.ArgumentParser, batch_size: int, max_length: int) -> None:
    p.add_argument("--model", required=True, help="model folder (or Hub id) to evaluate")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model folder)")
    p.add_argument("--data_dir", required=True, help="benchmark data folder")
    p.add_argument("--output", required=True, help="where to write the JSON report")
    p.add_argument("--batch_size", type=int, default=batch_size, help="scoring batch size (default %(default)s)")
    p.add_argument("--generation_batch_size", type=int, default=None, help="default: --batch_size")
    p.add_argument("--max_length", type=int, default=max_length,
                   help="max tokens of a scored sequence (default %(default)s)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--no_progress", action="store_true", help="hide progress bars")


def _run_eval_tofu(args) -> int:
    from .evaluation import evaluate_tofu

    model, tokenizer = load_model_and_tokenizer(args.model, args.tokenizer, args.dtype, args.device)
    retain_model = None
    if args.retain_model:
        retain_model, _ = load_model_and_tokenizer(args.retain_model, args.tokenizer, args.dtype, args.device)
    report = evaluate_tofu(
        model,
        tokenizer,
        args.data_dir,
        split=args.split,
        retain_report=args.retain_report,
        retain_model=retain_model,
        prompt_format=args.prompt_format,
        batch_size=args.batch_size,
        generation_batch_size=args.generation_batch_size,
        max_length=args.max_length,
        max_new_tokens=args.max_new_tokens,
        progress=False if args.no_progress else None,
        model_path=args.model,
    )
    report.save(args.output)
    report.print_table()
    print(f"report written to {args.output}")
    return 0


def _run_eval_muse(args) -> int:
    from .evaluation import evaluate_muse

    model, tokenizer = load_model_and_tokenizer(args.model, args.tokenizer, args.dtype, args.device)
    report = evaluate_muse(
        model,
        tokenizer,
        args.data_dir,
        parts=args.parts,
        auc_retrain=args.auc_retrain,
        retrain_report=args.retrain_report,
        batch_size=args.batch_size,
        generation_batch_size=args.generation_batch_size,
        max_length=args.max_length,
        verbmem_max_new_tokens=args.verbmem_max_new_tokens,
        knowmem_max_new_tokens=args.knowmem_max_new_tokens,
        knowmem_shots=args.knowmem_shots,
        min_k=args.min_k,
        min_k_plus_plus=not args.no_min_k_plus_plus,
        rouge_use_stemmer=args.rouge_use_stemmer,
        progress=False if args.no_progress else None,
        model_path=args.model,
    )
    report.save(args.output)
    report.print_table()
    print(f"report written to {args.output}")
    return 0


def register_eval(subparsers) -> None:
    """`trl-unlearn eval {tofu,muse}`."""
    ev = subparsers.add_parser("eval", help="evaluate a model on an unlearning benchmark")
    bench = ev.add_subparsers(dest="benchmark", required=True, metavar="{tofu,muse}")

    t = bench.add_parser("tofu", help="TOFU: probability, ROUGE-L, truth ratio, forget quality, model utility")
    _add_common_eval_args(t, batch_size=16, max_length=512)
    t.add_argument("--split", default="forget10", help="forget01, forget05, forget10 (default %(default)s)")
    ref = t.add_mutually_exclusive_group()
    ref.add_argument("--retain_report", default=None,
                     help="report of the retain model on the same split (for forget quality)")
    ref.add_argument("--retain_model", default=None, help="retain model folder, scored here (forget quality)")
    t.add_argument("--max_new_tokens", type=int, default=200, help="greedy generation length (default %(default)s)")
    t.add_argument("--prompt_format", default="auto",
                   help="auto (chat template if any, else plain), chat, plain, or a string with {question}")
    t.set_defaults(func=_run_eval_tofu)

    m = bench.add_parser("muse", help="MUSE: VerbMem, KnowMem, PrivLeak (Min-K%% Prob)")
    _add_common_eval_args(m, batch_size=8, max_length=2048)
    m.add_argument("--parts", nargs="+", default=["verbmem", "knowmem", "privleak"],
                   choices=["verbmem", "knowmem", "privleak"])
    ref = m.add_mutually_exclusive_group()
    ref.add_argument("--auc_retrain", type=float, default=None, help="the retrained model's forget_holdout Min-K%% AUC")
    ref.add_argument("--retrain_report", "--retain_report", dest="retrain_report", default=None,
                     help="report of the retrained model on the same data (its privleak_auc)")
    m.add_argument("--verbmem_max_new_tokens", type=int, default=128)
    m.add_argument("--knowmem_max_new_tokens", type=int, default=32)
    m.add_argument("--knowmem_shots", type=int, default=None, help="few-shot examples per prompt (default: all)")
    m.add_argument("--min_k", type=float, default=0.4)
    m.add_argument("--no_min_k_plus_plus", action="store_true", help="skip Min-K%%++ (saves the vocab statistics)")
    m.add_argument("--rouge_use_stemmer", action="store_true", help="Porter stemmer in ROUGE (muse_bench: off)")
    m.set_defaults(func=_run_eval_muse)


# ---------------------------------------------------------------------------------------------------- train


def register_train(subparsers) -> None:
    """`trl-unlearn <method> ...`: the rest of the line goes to the method's TrlParser (TRL script style:
    every config field is a flag, `--config recipe.yaml` reads them from YAML; `--help` lists them)."""
    from .train_script import METHODS

    for method in METHODS:
        p = subparsers.add_parser(method, help=f"unlearn with {method} (TRL-style flags, --config YAML)", add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=lambda args, method=method: _run_train(method, args.rest))


def _run_train(method: str, argv: list[str]) -> int:
    from .train_script import make_parser, run

    script_args, training_args, model_args = make_parser(method).parse_args_and_config(argv)
    run(method, script_args, training_args, model_args)
    return 0


def register_relearn(subparsers) -> None:
    from .evaluation.relearn import register_relearn as register

    register(subparsers)


COMMAND_GROUPS: list[Callable] = [register_eval, register_relearn, register_train]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trl-unlearn", description="LLM unlearning with TRL: train and evaluate.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in COMMAND_GROUPS:
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit code (2 with a one-line message on a data or settings error)."""
    from .train_script import METHODS

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in METHODS:  # hand the whole line to the method's TrlParser (argparse would eat --help)
        return _run_train(argv[0], argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"trl-unlearn: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
