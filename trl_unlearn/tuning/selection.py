"""The declared selection rule of `trl-unlearn tune`, a pure function over a table of trials.

Default rule: among the trials whose utility is at least `utility_floor` × the original model's utility, the one
with the highest forget quality; ties go to the higher utility, then to the earlier trial. The rule is written into
`tuning.json` (`describe_rule`), so a reader knows how the setting was chosen.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

__all__ = ["NoTrialAboveFloor", "SelectionRule", "describe_rule", "pareto_front", "rank", "select"]


class NoTrialAboveFloor(ValueError):
    """No trial keeps the utility the rule asks for."""


@dataclass(frozen=True)
class SelectionRule:
    """`score` (maximised) among trials with `utility >= utility_floor × reference_utility`. The defaults are the
    TOFU scorer's names: forget quality (KS p-value) and model utility without ROUGE (no generation in the loop)."""

    utility_floor: float = 0.95
    score: str = "forget_quality"
    utility: str = "model_utility_no_rouge"

    def __post_init__(self):
        if not 0 <= self.utility_floor <= 1:
            raise ValueError(
                f"`utility_floor={self.utility_floor}` must lie in [0, 1] (a fraction of the original "
                "model's utility; 0.95 keeps trials within 5% of it)."
            )


def describe_rule(rule: SelectionRule, reference_utility: float) -> dict:
    return {
        **asdict(rule),
        "reference_utility": reference_utility,
        "utility_threshold": rule.utility_floor * reference_utility,
        "text": f"highest {rule.score} among trials with {rule.utility} >= {rule.utility_floor} x the original "
        f"model's ({rule.utility_floor * reference_utility:.4g}); ties: higher {rule.utility}, then the "
        "earlier trial",
    }


def rank(trials: Sequence[Mapping], rule: SelectionRule, reference_utility: float) -> list[Mapping]:
    """The trials above the floor, best first (`trials`: rows with `number`, `rule.score` and `rule.utility`)."""
    threshold = rule.utility_floor * reference_utility
    kept = [
        t for t in trials if t[rule.utility] is not None and t[rule.utility] >= threshold and t[rule.score] is not None
    ]
    return sorted(kept, key=lambda t: (-t[rule.score], -t[rule.utility], t["number"]))


def select(trials: Sequence[Mapping], rule: SelectionRule, reference_utility: float) -> Mapping:
    """The trial the rule picks; `NoTrialAboveFloor` (one line naming the best utility reached and the fix) when
    no trial keeps the utility."""
    if not trials:
        raise NoTrialAboveFloor("no finished trial to select from: run the study with --n_trials >= 1.")
    ranked = rank(trials, rule, reference_utility)
    if ranked:
        return ranked[0]
    values = [t[rule.utility] for t in trials if t[rule.utility] is not None]
    best = max(values) if values else float("nan")
    raise NoTrialAboveFloor(
        f"no trial reaches {rule.utility} >= {rule.utility_floor:g} x {reference_utility:.4g} = "
        f"{rule.utility_floor * reference_utility:.4g} (best of {len(trials)}: {best:.4g}): lower --utility_floor, "
        "or search gentler settings (lower lr_mult / forget_weight, fewer epochs) with more trials."
    )


def pareto_front(trials: Sequence[Mapping], rule: SelectionRule) -> list[Mapping]:
    """The trials no other trial beats on both score and utility (ties on both: all kept), by trial number."""
    rows = [t for t in trials if t[rule.score] is not None and t[rule.utility] is not None]

    def dominated(t):
        return any(
            o[rule.score] >= t[rule.score]
            and o[rule.utility] >= t[rule.utility]
            and (o[rule.score] > t[rule.score] or o[rule.utility] > t[rule.utility])
            for o in rows
        )

    return sorted((t for t in rows if not dominated(t)), key=lambda t: t["number"])
