"""`trl-unlearn eval tofu|muse`: evaluate a saved model and write a JSON report."""

from __future__ import annotations

import argparse
import logging

from ..loading import load_model_and_tokenizer, saved_prompt_format

logger = logging.getLogger(__name__)

__all__ = ["register_eval"]


def _add_common_eval_args(p: argparse.ArgumentParser, batch_size: int, max_length: int | None) -> None:
    p.add_argument("--model", required=True, help="model folder (or Hub id) to evaluate")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model folder)")
    p.add_argument("--data_dir", required=True, help="benchmark data folder")
    p.add_argument("--output", required=True, help="where to write the JSON report")
    p.add_argument("--batch_size", type=int, default=batch_size, help="scoring batch size (default %(default)s)")
    p.add_argument("--generation_batch_size", type=int, default=None, help="default: --batch_size")
    p.add_argument(
        "--max_length",
        type=int,
        default=max_length,
        help="max tokens of a scored sequence (default %(default)s"
        + (": whole texts, as muse_bench)" if max_length is None else ")"),
    )
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--no_progress", action="store_true", help="hide progress bars")
    p.add_argument(
        "--update_model_card",
        action="store_true",
        help="record the results in the model folder's README.md (model-index), for push_to_hub",
    )


def _tofu_prompt_format(args) -> str:
    """`--prompt_format`, defaulting to the one the model was trained with (recorded beside it by `trl-unlearn
    <method>`); a loud warning when the two differ."""
    recorded = saved_prompt_format(args.model)
    if args.prompt_format is None:
        return recorded or "auto"
    if recorded is not None and args.prompt_format != recorded:
        logger.warning(
            f"WARNING: --prompt_format {args.prompt_format!r} differs from the format this model was trained with "
            f"({recorded!r}, recorded in {args.model}): the scores will not measure what training changed."
        )
    return args.prompt_format


def _data_label(benchmark: str, data_dir: str, split: str | None = None) -> str:
    """What the evaluation ran on, for the model card: the data folder as given (a TOFU- or MUSE-layout folder may
    hold other data than the benchmark's), its split, and the benchmark's protocol."""
    return f"{data_dir}{f' ({split})' if split else ''}, {benchmark} evaluation"


def _run_eval_tofu(args):
    from ..evaluation import evaluate_tofu

    model, tokenizer = load_model_and_tokenizer(args.model, args.tokenizer, args.dtype, args.device)
    retain_model = None
    if args.retain_model:
        retain_model, _ = load_model_and_tokenizer(args.retain_model, args.tokenizer, args.dtype, args.device)
    return (
        evaluate_tofu(
            model,
            tokenizer,
            args.data_dir,
            split=args.split,
            retain_report=args.retain_report,
            retain_model=retain_model,
            prompt_format=_tofu_prompt_format(args),
            batch_size=args.batch_size,
            generation_batch_size=args.generation_batch_size,
            max_length=args.max_length,
            max_new_tokens=args.max_new_tokens,
            progress=False if args.no_progress else None,
            model_path=args.model,
        ),
        _data_label("TOFU", args.data_dir, args.split),
        {"forget_quality": "--retain_report or --retain_model"},
    )


def _run_eval_muse(args):
    from ..evaluation import evaluate_muse

    model, tokenizer = load_model_and_tokenizer(args.model, args.tokenizer, args.dtype, args.device)
    return (
        evaluate_muse(
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
        ),
        _data_label("MUSE", args.data_dir),
        {"privleak": "--auc_retrain or --retrain_report"},
    )


def _run_eval_lm_eval(args):
    from ..evaluation.lm_eval import evaluate_harness

    report = evaluate_harness(
        args.model,
        args.tokenizer,
        args.tasks,
        include_path=args.include_path,
        include_defaults=not args.no_builtin_tasks,
        limit=args.limit,
        batch_size=args.batch_size,
        num_fewshot=args.num_fewshot,
        device=args.device,
        dtype=args.dtype,
    )
    return report, f"lm-eval {args.tasks}", {}


def _limit(text: str) -> int | float:
    x = float(text)
    if x <= 0:
        raise argparse.ArgumentTypeError(f"--limit must be > 0, got {text}")
    return int(x) if x >= 1 and x.is_integer() else x


def _batch_size(text: str) -> int | str:
    if text.startswith("auto"):
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--batch_size must be an integer or 'auto', got {text!r}") from None


def _run(evaluate):
    """A `func` for a benchmark parser: evaluate, save the report, print its table (with the flag that fills each
    n/a metric), and with `--update_model_card` record the numbers in the model folder's card."""

    def run(args) -> int:
        report, dataset, hints = evaluate(args)
        report.save(args.output)
        report.print_table()
        for metric, flag in hints.items():
            if metric in report.metrics and report.metrics[metric] is None:
                print(f"{metric} is n/a: pass {flag} to compute it.")
        print(f"report written to {args.output}")
        if args.update_model_card:
            from ..model_card import add_evaluation

            directions, reference = {}, None
            if hasattr(report, "eval_results"):  # lm-eval: the requested tasks' accuracies, not every subtask
                results = report.eval_results()
                numbers = {f"{r.dataset_name} {r.metric_type}": r.metric_value for r in results}
            else:
                from ..evaluation.report import direction

                results, numbers = None, {k: v for k, v in report.metrics.items() if v is not None}
                directions = {k: direction(k) for k in numbers if direction(k)}
                reference = report.reference.get("source")
            path = add_evaluation(args.model, numbers, dataset, results, directions=directions, reference=reference)
            print(f"model card updated: {path}")
        return 0

    return run


def register_eval(subparsers) -> None:
    """`trl-unlearn eval {tofu,muse,lm-eval}`."""
    ev = subparsers.add_parser("eval", help="evaluate a model on an unlearning benchmark")
    bench = ev.add_subparsers(dest="benchmark", required=True, metavar="{tofu,muse,lm-eval}")

    t = bench.add_parser("tofu", help="TOFU: probability, ROUGE-L, truth ratio, forget quality, model utility")
    _add_common_eval_args(t, batch_size=16, max_length=512)
    t.add_argument("--split", default="forget10", help="forget01, forget05, forget10 (default %(default)s)")
    ref = t.add_mutually_exclusive_group()
    ref.add_argument(
        "--retain_report", default=None, help="report of the retain model on the same split (for forget quality)"
    )
    ref.add_argument("--retain_model", default=None, help="retain model folder, scored here (forget quality)")
    t.add_argument("--max_new_tokens", type=int, default=200, help="greedy generation length (default %(default)s)")
    t.add_argument(
        "--prompt_format",
        default=None,
        help="default: the format the model was trained with (recorded by trl-unlearn <method>), else "
        "auto (chat template if any, else plain); or chat, plain, or a string with {question}",
    )
    t.set_defaults(func=_run(_run_eval_tofu))

    m = bench.add_parser("muse", help="MUSE: VerbMem, KnowMem, PrivLeak (Min-K%% Prob)")
    _add_common_eval_args(m, batch_size=8, max_length=None)
    m.add_argument(
        "--parts", nargs="+", default=["verbmem", "knowmem", "privleak"], choices=["verbmem", "knowmem", "privleak"]
    )
    ref = m.add_mutually_exclusive_group()
    ref.add_argument("--auc_retrain", type=float, default=None, help="the retrained model's forget_holdout Min-K%% AUC")
    ref.add_argument(
        "--retrain_report",
        "--retain_report",
        dest="retrain_report",
        default=None,
        help="report of the retrained model on the same data (its privleak_auc)",
    )
    m.add_argument("--verbmem_max_new_tokens", type=int, default=128)
    m.add_argument("--knowmem_max_new_tokens", type=int, default=32)
    m.add_argument("--knowmem_shots", type=int, default=None, help="few-shot examples per prompt (default: all)")
    m.add_argument("--min_k", type=float, default=0.4)
    m.add_argument("--no_min_k_plus_plus", action="store_true", help="skip Min-K%%++ (saves the vocab statistics)")
    m.add_argument("--rouge_use_stemmer", action="store_true", help="Porter stemmer in ROUGE (muse_bench: off)")
    m.set_defaults(func=_run(_run_eval_muse))

    h = bench.add_parser("lm-eval", help="WMDP, MMLU or any lm-evaluation-harness task (docs/wmdp.md)")
    h.add_argument("--model", required=True, help="model folder (or Hub id) to evaluate")
    h.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model folder)")
    h.add_argument("--tasks", required=True, help="comma-separated lm-eval tasks, e.g. wmdp_bio,wmdp_cyber,mmlu")
    h.add_argument("--output", required=True, help="where to write the JSON report")
    h.add_argument(
        "--include_path",
        action="append",
        default=None,
        help="folder of extra task YAML files (local data); may be repeated",
    )
    h.add_argument(
        "--no_builtin_tasks",
        action="store_true",
        help="index only the --include_path tasks, not lm-eval's built-in ones (faster start)",
    )
    h.add_argument(
        "--limit",
        type=_limit,
        default=None,
        help="documents per task (int) or fraction (< 1); for smoke tests, not for reported numbers",
    )
    h.add_argument("--batch_size", type=_batch_size, default=8, help="int or 'auto' (default %(default)s)")
    h.add_argument("--num_fewshot", type=int, default=None, help="default: each task's own (WMDP, MMLU: 0)")
    h.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    h.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    h.add_argument(
        "--update_model_card",
        action="store_true",
        help="record the accuracies in the model folder's README.md (model-index), for push_to_hub",
    )
    h.set_defaults(func=_run(_run_eval_lm_eval))
