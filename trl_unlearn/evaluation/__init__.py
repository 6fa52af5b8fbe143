"""Unlearning evaluation: TOFU, MUSE and lm-eval benchmarks, relearning attacks, probes during training, JSON reports.

The names users call are exported here; the rest is importable from its module: `metrics` (the pure metric
functions), `scoring` (batched scoring and generation: `score_texts`, `generate_answers`), `report`, `tofu`
(`score_tofu_sets`, `truth_ratios`), `muse`, `lm_eval` (`HarnessRunner`, `HarnessReport`), `probes`, `relearn`
(`select_relearn_indices`, `relearn_loop`), `relearn_curve` (`plot_relearn_curves`), `callback`
(`PeriodicEvalCallback`), `lm_eval_callback`, `unlearning_audit` (the attacks of `audit`: quantization,
relearning, prompts, hidden states, membership; `AuditData`, `load_audit_data`), `quantize`, `hidden_probe`,
`audit_html`. See docs/evaluation.md.
"""

from .callback import UnlearningEvalCallback
from .lm_eval import evaluate_harness
from .lm_eval_callback import LMEvalGuardCallback
from .muse import evaluate_muse
from .relearn import RelearnConfig, relearning_attack
from .relearn_curve import RelearnCurve
from .report import EvalReport
from .scoring import score_answers
from .tofu import evaluate_tofu
from .unlearning_audit import AuditConfig, audit

__all__ = [
    "AuditConfig",
    "EvalReport",
    "LMEvalGuardCallback",
    "RelearnConfig",
    "RelearnCurve",
    "UnlearningEvalCallback",
    "evaluate_harness",
    "evaluate_muse",
    "evaluate_tofu",
    "audit",
    "relearning_attack",
    "score_answers",
]
