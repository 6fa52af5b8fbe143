"""Unlearning evaluation: TOFU and MUSE metrics, batched scoring and generation, JSON reports.

`metrics` holds the pure metric functions; `scoring` runs the model (batched, length-grouped); `tofu` and `muse`
run the benchmarks and return an `EvalReport` (`report`). See docs/evaluation.md.
"""

from .callback import UnlearningEvalCallback
from .harness import HarnessReport, HarnessRunner, evaluate_harness
from .muse import evaluate_muse
from .probes import probe_metrics, qa_pairs
from .relearn import RelearnCurve, plot_relearn_curves, relearning_attack, select_relearn_indices
from .report import EvalReport
from .scoring import PromptFormat, ScoreResult, generate_answers, resolve_prompt_format, score_answers, score_texts
from .tofu import evaluate_tofu, score_tofu_sets, truth_ratios

__all__ = [
    "EvalReport",
    "HarnessReport",
    "HarnessRunner",
    "evaluate_harness",
    "RelearnCurve",
    "UnlearningEvalCallback",
    "plot_relearn_curves",
    "probe_metrics",
    "relearning_attack",
    "select_relearn_indices",
    "qa_pairs",
    "PromptFormat",
    "ScoreResult",
    "evaluate_muse",
    "evaluate_tofu",
    "score_tofu_sets",
    "truth_ratios",
    "generate_answers",
    "resolve_prompt_format",
    "score_answers",
    "score_texts",
]
