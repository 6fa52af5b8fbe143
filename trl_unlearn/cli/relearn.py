"""`trl-unlearn relearn`: the relearning attack on a saved model (see `trl_unlearn.evaluation.relearn`)."""

from __future__ import annotations

import argparse
import os

from ..loading import load_model_and_tokenizer, saved_prompt_format


def register_relearn(subparsers) -> None:
    """Add `trl-unlearn relearn` to the subcommands of `trl_unlearn.cli`."""
    p = subparsers.add_parser("relearn", help="relearning attack: fine-tune on a few forget rows, track forget metrics")
    _add_relearn_args(p)
    p.set_defaults(func=run_relearn)


def _add_relearn_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="the unlearned model folder (or Hub id)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model folder)")
    p.add_argument("--data_dir", required=True, help="TOFU-layout folder")
    p.add_argument("--split", default="forget10", help="forget split (default %(default)s)")
    p.add_argument("--output", required=True, help="where to write the curve (JSON)")
    p.add_argument(
        "--retain_report", default=None, help="the retain model's TOFU report on the same split (for forget quality)"
    )
    p.add_argument(
        "--metrics",
        default="tofu",
        choices=["tofu", "probe"],
        help="tofu: full evaluate_tofu per checkpoint; probe: forget probability and ROUGE-L only",
    )
    p.add_argument("--fraction", type=float, default=0.1, help="share of forget rows relearned (default %(default)s)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: --epochs over the subset)")
    p.add_argument("--epochs", type=float, default=5.0, help="used when --steps is not given (default %(default)s)")
    p.add_argument("--eval_every", type=int, default=None, help="default: steps // 5")
    p.add_argument("--learning_rate", type=float, default=1e-5)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--prompt_format", default=None, help="default: the format the model was trained with (if recorded), else auto"
    )
    p.add_argument("--max_length", type=int, default=512)
    p.add_argument("--max_new_tokens", type=int, default=200)
    p.add_argument("--eval_batch_size", type=int, default=16)
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--plot", default=None, help="also save a plot of the forget probability here (needs matplotlib)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--no_progress", action="store_true", help="hide progress bars")


def run_relearn(args) -> int:
    """Run the attack from parsed `relearn` arguments: load the model, attack, save the curve, print its table."""
    from ..evaluation.relearn import relearning_attack
    from ..evaluation.relearn_curve import plot_relearn_curves

    model, tokenizer = load_model_and_tokenizer(args.model, args.tokenizer, args.dtype, args.device)
    common = dict(
        fraction=args.fraction,
        steps=args.steps,
        epochs=args.epochs,
        eval_every=args.eval_every,
        learning_rate=args.learning_rate,
        batch_size=args.batch_size,
        seed=args.seed,
        prompt_format=args.prompt_format or saved_prompt_format(args.model) or "auto",
        max_length=args.max_length,
        max_new_tokens=args.max_new_tokens,
        eval_batch_size=args.eval_batch_size,
        gradient_checkpointing=args.gradient_checkpointing,
        progress=False if args.no_progress else None,
        model_path=args.model,
    )
    if args.metrics == "tofu":
        curve = relearning_attack(
            model, tokenizer, data_dir=args.data_dir, split=args.split, retain_report=args.retain_report, **common
        )
    else:
        if args.retain_report:
            raise ValueError("--retain_report needs --metrics tofu")
        from ..evaluation.tofu import load_tofu_eval_sets

        rows = load_tofu_eval_sets(args.data_dir, args.split)["forget"][0]
        curve = relearning_attack(model, tokenizer, rows, **common)
        curve.settings.update(data_dir=os.fspath(args.data_dir), split=args.split)
    curve.save(args.output)
    print(curve.table())
    print(f"curve written to {args.output}")
    if args.plot:
        plot_relearn_curves({args.model: curve}, "forget_probability", path=args.plot)
        print(f"plot written to {args.plot}")
    return 0
