"""Unlearning evaluation: TOFU and MUSE metrics, batched scoring and generation, JSON reports.

`metrics` holds the pure metric functions; `scoring` runs the model (batched, length-grouped); `tofu` and `muse`
run the benchmarks and return an `EvalReport` (`report`); `audit` attacks an unlearned model (quantization, relearning,
prompts, hidden states, membership) against the original. See docs/evaluation.md.
"""

from .audit import AuditConfig, AuditData, audit, load_audit_data
from .callback import UnlearningEvalCallback
from .lm_eval import HarnessReport, HarnessRunner, evaluate_harness
from .muse import evaluate_muse
from .probes import probe_metrics, qa_pairs
from .relearn import RelearnCurve, plot_relearn_curves, relearning_attack, select_relearn_indices
from .report import EvalReport
from .scoring import ScoreResult, generate_answers, score_answers, score_texts
from .tofu import evaluate_tofu, score_tofu_sets, truth_ratios

__all__ = [
    "AuditConfig",
    "AuditData",
    "audit",
    "load_audit_data",
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
    "ScoreResult",
    "evaluate_muse",
    "evaluate_tofu",
    "score_tofu_sets",
    "truth_ratios",
    "generate_answers",
    "score_answers",
    "score_texts",
]
