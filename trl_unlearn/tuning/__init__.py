"""`trl-unlearn tune`: each method's setting found the same way, on Optuna. `spaces` (search spaces per method),
`selection` (the declared rule, pure), `study` (the study: trials, storage, report seeds, outputs)."""

from .selection import NoTrialAboveFloor, SelectionRule, pareto_front, select
from .spaces import Param, default_space, resolve_space

__all__ = [
    "NoTrialAboveFloor",
    "Param",
    "SelectionRule",
    "default_space",
    "pareto_front",
    "resolve_space",
    "select",
    "tune",
]


def tune(*args, **kwargs):
    """`trl_unlearn.tuning.study.tune` (imported on first use: Optuna and the trainers load then)."""
    from .study import tune as _tune

    return _tune(*args, **kwargs)
