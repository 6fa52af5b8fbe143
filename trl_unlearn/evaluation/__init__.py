"""Unlearning evaluation: TOFU and MUSE metrics, batched scoring and generation, JSON reports.

`metrics` holds the pure metric functions; `scoring` runs the model (batched, length-grouped); `tofu` and `muse`
run the benchmarks and return an `EvalReport` (`report`). See docs/evaluation.md.
"""

from .callback import UnlearningEvalCallback
from .lm_eval import HarnessReport, HarnessRunner, evaluate_harness
from .muse import evaluate_muse
from .probes import probe_metrics, qa_pairs
from .relearn import RelearnConfig, relearning_attack, select_relearn_indices
from .relearn_curve import RelearnCurve, plot_relearn_curves
from .report import EvalReport
from .scoring import ScoreResult, generate_answers, score_answers, score_texts
from .tofu import evaluate_tofu, score_tofu_sets, truth_ratios

__all__ = [
    "EvalReport",
    "HarnessReport",
    "HarnessRunner",
    "evaluate_harness",
    "RelearnConfig",
    "RelearnCurve",
    "UnlearningEvalCallback",
    "plot_relearn_curves",
    "probe_metrics",
    "relearning_attack",
    "select_relearn_indices",
    "qa_pairs",
    "ScoreResult",
    "evaluate_muse",
    "evaluate_tofu",
    "score_tofu_sets",
    "truth_ratios",
    "generate_answers",
    "score_answers",
    "score_texts",
]
