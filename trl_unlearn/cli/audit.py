"""`trl-unlearn audit`: does the unlearned model really forget? Quantization, relearning, prompt-side probes, a
hidden-state probe and membership inference against the original model, in ``audit.json`` and one offline
``audit.html`` (see `trl_unlearn.evaluation.unlearning_audit`, docs/evaluation.md "Audit")."""

from __future__ import annotations

import argparse
import os

from ..loading import check_model_path, load_model, load_tokenizer, saved_prompt_format


def register_audit(subparsers) -> None:
    """`trl-unlearn audit`: a `COMMAND_GROUPS` entry for `trl_unlearn.cli`."""
    p = subparsers.add_parser("audit", help="attacks that bring unlearned knowledge back, in one report")
    _add_audit_args(p)
    p.set_defaults(func=run_audit)


ATTACK_NAMES = "quantization,relearn,prompt,hidden_probe,membership"

# `AuditConfig` fields set from flags of the same name; a flag not given keeps the dataclass default (stated in help)
_CONFIG_FLAGS = {
    "group_size": (int, "inputs per scale of the group-wise RTN rows (default 128)"),
    "relearn_fraction": (float, "share of forget rows relearned; the rest is held out (default 0.5)"),
    "relearn_steps": (int, "steps of both relearning runs (default: 5 epochs over the relearned rows)"),
    "relearn_learning_rate": (float, "AdamW learning rate of relearning (default 1e-5)"),
    "relearn_batch_size": (int, "rows per relearning step (default 8)"),
    "few_shot": (int, "unrelated QA pairs before the question (default 3)"),
    "num_samples": (int, "samples per question in the sampling probe (default 5)"),
    "temperature": (float, "sampling temperature (default 1.0)"),
    "max_new_tokens": (int, "generated tokens per answer (default 64)"),
    "max_rows": (
        int,
        "audit at most this many forget, retain and non-member rows each, evenly spaced; every number of the report "
        "is about those rows (default 24; 0: every row)",
    ),
    "attack_items": (
        int,
        "attacked rows compute ROUGE-L (greedy answers) on at most this many of the rows, evenly spaced, the same "
        "for base, unlearned and attacked; probability on every row (default 40; 0: every row)",
    ),
    "batch_size": (int, "rows per scoring / generation batch (default 16)"),
    "max_length": (int, "tokens of prompt + answer scored (default 512)"),
    "min_gap": (float, "smallest |base - unlearned| for a recovered share (default 0.02)"),
    "seed": (int, "seed of row draws, sampling, relearning and the probe (default 0)"),
}


def _add_audit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="the unlearned model folder (or Hub id)")
    p.add_argument("--base", default=None, help="the original model, before unlearning (required)")
    p.add_argument("--retain_model", default=None, help="a model trained without the forget data (optional)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model folder)")
    p.add_argument(
        "--data_dir", required=True, help="folder of .json files (TOFU layout, or QA / prompt-completion / text rows)"
    )
    p.add_argument("--forget_split", default="forget10", help="forget file stem (default %(default)s)")
    p.add_argument("--retain_split", default=None, help="retain file stem outside the TOFU layout (default: retain)")
    p.add_argument("--nonmember_split", default=None, help="file stem of rows never trained on (membership)")
    p.add_argument("--output_dir", required=True, help="where audit.json and audit.html go (not a model folder)")
    p.add_argument("--attacks", default=ATTACK_NAMES, help="comma list among %(default)s")
    p.add_argument(
        "--prompt_format", default=None, help="default: the format the model was trained with (if recorded), else auto"
    )
    p.add_argument("--quant_bits", type=int, nargs="+", default=argparse.SUPPRESS, help="RTN bits (default 8 4)")
    p.add_argument(
        "--all_quant_variants",
        action="store_true",
        help="RTN per channel AND group-wise at every bit width (default: 8-bit per channel, group-wise below 8)",
    )
    p.add_argument("--no_bnb", action="store_true", help="leave out the bitsandbytes rows (they need CUDA)")
    p.add_argument(
        "--attack_truth_ratio",
        action="store_true",
        help="attacked rows also compute the truth ratio (6 answers per item; default: on the clean rows only)",
    )
    p.add_argument(
        "--paraphrase_file",
        default=None,
        help='JSON list or JSON lines of {"question", "paraphrased_question"} (matched by question) or '
        '{"question", "answer"} (a paraphrased question, matched by answer): the paraphrase probe\'s questions',
    )
    for name, (kind, text) in _CONFIG_FLAGS.items():
        p.add_argument(f"--{name}", type=kind, default=argparse.SUPPRESS, help=text)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument(
        "--update_model_card",
        action="store_true",
        help="add the summary to the unlearned model folder's README.md (its own Audit section)",
    )
    p.add_argument("--no_progress", action="store_true", help="hide the progress bar")


def _tokenizer_if_saved(path: str | None):
    """The tokenizer saved in a model folder, or None when the folder holds none (then it is taken to be the
    unlearned model's)."""
    if path is None or not os.path.isdir(path):
        return None
    if not any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    return load_tokenizer(path)


def run_audit(args) -> int:
    """Load the models and data, run the attacks, write audit.json / audit.html, print the summary."""
    from ..evaluation.unlearning_audit import (
        AuditConfig,
        apply_paraphrases,
        audit,
        load_audit_data,
        parse_attacks,
    )

    if not args.base:
        raise ValueError(
            "--base ORIGINAL is required: the model before unlearning (recovered share is measured against it)"
        )
    attacks = parse_attacks(args.attacks)  # before loading anything
    for path, what in ((args.model, "model"), (args.base, "base model"), (args.retain_model, "retain model")):
        if path:
            check_model_path(path, what)
    data = load_audit_data(args.data_dir, args.forget_split, args.retain_split, args.nonmember_split)
    if args.paraphrase_file:
        data = apply_paraphrases(data, args.paraphrase_file)
    given = {k: getattr(args, k) for k in _CONFIG_FLAGS if hasattr(args, k)}
    if hasattr(args, "quant_bits"):
        given["quant_bits"] = tuple(args.quant_bits)
    for name in ("attack_items", "max_rows"):
        if given.get(name) == 0:
            given[name] = None
    config = AuditConfig(
        bnb=not args.no_bnb,
        quant_all_variants=args.all_quant_variants,
        attack_truth_ratio=args.attack_truth_ratio,
        **given,
    )
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    base_tok, retain_tok = _tokenizer_if_saved(args.base), _tokenizer_if_saved(args.retain_model)
    paths = {"unlearned": args.model, "base": args.base}
    if args.retain_model:
        paths["retain_model"] = args.retain_model
    from ..evaluation.unlearning_audit import check_output_dir, check_same_tokenizer

    check_output_dir(args.output_dir, paths)  # before loading the models
    check_same_tokenizer(tokenizer, base_tok, "base model")
    check_same_tokenizer(tokenizer, retain_tok, "retain model")
    model = load_model(args.model, args.dtype, args.device)
    base = load_model(args.base, args.dtype, args.device)
    retain = load_model(args.retain_model, args.dtype, args.device) if args.retain_model else None
    report = audit(
        model,
        tokenizer,
        base,
        data,
        retain_model=retain,
        attacks=attacks,
        config=config,
        prompt_format=args.prompt_format or saved_prompt_format(args.model) or "auto",
        output_dir=args.output_dir,
        model_paths=paths,
        progress=False if args.no_progress else None,
    )
    for r in report["summary"]:
        share = r.get("max_share")
        value = ("n/a" if share is None else f"{share:.3f}") if r["status"] == "ok" else "skipped: " + r["reason"]
        print(f"{r['attack']:>13} {r['variant']:<22} {value}")
    state = "complete" if report["complete"] else "INCOMPLETE (skipped attacks listed above)"
    print(f"audit {state}, {report['timings_s']['total']:.1f} s: {args.output_dir}/audit.json, audit.html")
    if args.update_model_card:
        from ..model_card import add_audit

        card = add_audit(args.model, report["summary"], report["complete"], report["settings"]["data"])
        print(f"model card updated: {card}")
    return 0
