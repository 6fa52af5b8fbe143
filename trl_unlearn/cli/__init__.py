"""The `trl-unlearn` command, the package's only command line.

    trl-unlearn METHOD --model_name_or_path M --dataset_name D [--config recipe.yaml] ...
        (METHOD: simnpo, npo, gradascent, graddiff, rmu, wga, satimp, idknll, idkdpo, undial, ceu, pdu)
    trl-unlearn eval tofu --model PATH --data_dir DIR --split forget10 --output report.json [--retain_report R]
    trl-unlearn eval muse --model PATH --data_dir DIR --output report.json [--auc_retrain X | --retrain_report R]
    trl-unlearn relearn --model PATH --data_dir DIR --split forget10 --output curve.json
    trl-unlearn tune simnpo --model_name_or_path M --data_dir DIR --retain_report R.json --output_dir O
    trl-unlearn audit --model PATH --base ORIGINAL --data_dir DIR --forget_split forget10 --output_dir OUT

Modules: `train` (training subcommands, TRL script style), `eval`, `relearn`, `tune`, `audit`. Nothing heavy is
imported until a command runs, so `--help` and argument errors come back at once.
Exit codes: 0 done; 2 an error in the data or settings (one line); 1 any other error (one line naming its type);
3 training stopped early by a callback (model and card saved, the card says where and why); 130 interrupted (Ctrl-C);
143 stopped by SIGTERM (preempted or cancelled: a checkpoint is saved, whose card says where, and no final model;
resume with `--resume_from_checkpoint true`). `--debug` or `TRL_UNLEARN_DEBUG=1` shows the traceback of an error.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

__all__ = ["METHOD_NAMES", "build_parser", "main"]

from ..methods import REGISTRY

METHOD_NAMES = tuple(REGISTRY)


def _register_train(subparsers) -> None:
    """`trl-unlearn <method> ...`: the rest of the line goes to the method's TrlParser (every config field is a
    flag, `--config recipe.yaml` reads them from YAML; `trl-unlearn <method> --help` lists them)."""
    for method in METHOD_NAMES:
        p = subparsers.add_parser(
            method, help=f"unlearn with {method} (TRL-style flags, --config YAML)", add_help=False
        )
        p.add_argument("rest", nargs=argparse.REMAINDER)


def _run_train(method: str, argv: list[str]) -> int:
    from .train import exit_code, make_parser, parse, run

    return exit_code(run(method, *parse(make_parser(method), method, argv)))


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def build_parser() -> argparse.ArgumentParser:
    from .audit import register_audit
    from .eval import register_eval
    from .relearn import register_relearn
    from .tune import register_tune

    parser = argparse.ArgumentParser(
        prog="trl-unlearn",
        description="LLM unlearning with TRL: train and evaluate.",
        epilog="Errors print one line; `trl-unlearn --debug COMMAND ...` or TRL_UNLEARN_DEBUG=1 shows the traceback.",
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _register_train(sub)
    register_eval(sub)
    register_relearn(sub)
    register_tune(sub)
    register_audit(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit code (2 with a one-line message on a data or settings error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv[:1] or os.environ.get("TRL_UNLEARN_DEBUG", "") not in ("", "0")
    try:
        if argv[:1] == ["--debug"]:
            argv = argv[1:]
        if (
            argv and argv[0] in METHOD_NAMES
        ):  # the whole line goes to the method's TrlParser (argparse would eat --help)
            return _run_train(argv[0], argv[1:])
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print("trl-unlearn: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, FileNotFoundError, OSError, ImportError) as e:
        if debug:
            raise
        print(f"trl-unlearn: error: {_one_line(e)}", file=sys.stderr)  # one line; --debug shows the traceback
        return 2
    except Exception as e:  # not foreseen: still one line, with its type; --debug shows where it came from
        if debug:
            raise
        print(
            f"trl-unlearn: error: {type(e).__name__}: {_one_line(e)} (`trl-unlearn --debug ...` shows the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
