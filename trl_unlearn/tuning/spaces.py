"""Search spaces of `trl-unlearn tune`, one per method, in one place; a YAML recipe overrides them.

A space maps a name to a `Param`. Names are config fields of the method (`beta`, `gamma`, `forget_weight`,
`num_train_epochs`, `layer_id`, `steering_scale`, `retain_weight`, `learning_rate`, `beta1`, ...) or `lr_mult`, the
learning rate as a multiple of a base rate (`base_learning_rate`: the rate that fine-tuned the model, or the method's
default). Every default range reaches both sides of the published setting, so a search can strengthen a method
as well as weaken it (higher lr, more epochs, larger forget weight; SimNPO: smaller β).

SimNPO's per-sequence weight is `2σ(−β·NLL̄ − γ)` (NLL̄: the per-token NLL of a forget answer). Its β range is
tied to the NLL̄ measured on the forget set before tuning (`simnpo_beta_high`), so that the weight at the range's
strongest-damping corner (largest β and γ) stays at `MIN_SIMNPO_WEIGHT`; with the retain model's forget NLL̄ (the
target) known, the range's low end keeps that weight at the target. A range that drives the weight below
`SIMNPO_WEIGHT_FLOOR` at the start is refused (`check_simnpo_weight`): SimNPO then stops unlearning by construction.

YAML form (`search_space:` of a tune recipe, or a file of its own), per name: `{low, high}` (+ `log: true`,
`type: int`), a list of choices, or a single value (fixed). `null` removes a name from the default space.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

__all__ = [
    "MIN_SIMNPO_WEIGHT",
    "SIMNPO_WEIGHT_FLOOR",
    "Param",
    "check_simnpo_weight",
    "default_space",
    "resolve_space",
    "simnpo_beta_high",
    "simnpo_weight",
    "space_from_dict",
    "space_to_dict",
    "suggest",
    "to_config_values",
]

MIN_SIMNPO_WEIGHT = 0.1  # default β range: 2σ(−β·NLL̄ − γ) >= this at the largest β and γ
SIMNPO_WEIGHT_FLOOR = 1e-3  # below this at some corner of the range, SimNPO's forget gradient is ~0: refused
KINDS = ("float", "int", "categorical")


@dataclass(frozen=True)
class Param:
    """One searched name: a float or int range (`log`: sampled on a log scale) or a list of `choices`."""

    kind: str = "float"
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"search space: type {self.kind!r} is unknown; use one of {', '.join(KINDS)}.")
        if self.kind == "categorical":
            if not self.choices:
                raise ValueError("search space: an empty list of choices; give at least one value.")
        elif self.low is None or self.high is None or not self.low <= self.high:
            raise ValueError(f"search space: range [{self.low}, {self.high}] is empty; give low <= high.")
        elif self.log and self.low <= 0:
            raise ValueError(f"search space: log range [{self.low}, {self.high}] must be > 0; set log: false.")

    @property
    def largest(self):
        return max(self.choices) if self.kind == "categorical" else self.high


def simnpo_weight(beta: float, nll: float, gamma: float = 0.0) -> float:
    """SimNPO's per-sequence gradient weight `2σ(−β·nll − γ)` (1 at β = γ = 0, → 0 as β·nll grows)."""
    z = beta * nll + gamma
    return 2.0 / (1.0 + math.exp(z)) if z < 700 else 0.0


def simnpo_beta_high(forget_nll: float, gamma_high: float = 0.0, min_weight: float = MIN_SIMNPO_WEIGHT) -> float:
    """The largest β whose weight `2σ(−β·forget_nll − gamma_high)` is still `min_weight`."""
    if not forget_nll > 0:
        raise ValueError(f"forget NLL̄ must be > 0 to scale SimNPO's β, got {forget_nll}.")
    room = math.log((2.0 - min_weight) / min_weight) - gamma_high
    if room <= 0:
        raise ValueError(f"SimNPO γ up to {gamma_high} alone drives the weight below {min_weight}: lower gamma's high.")
    return room / forget_nll


def default_space(
    method: str, forget_nll: float | None = None, num_layers: int | None = None, target_nll: float | None = None
) -> dict[str, Param]:
    """The default space of `method`. SimNPO needs `forget_nll` (the original model's mean per-token NLL on the
    forget answers); with `target_nll` (the retain model's, the level unlearning aims at) above it, β's low end is
    the β whose weight is still `MIN_SIMNPO_WEIGHT` there, so the gentlest β keeps pushing up to the target
    (else: β_high / 30). RMU needs `num_layers` (decoder layers of the model)."""
    lr = {"lr_mult": Param(low=0.1, high=3.0, log=True), "num_train_epochs": Param("int", 2, 10)}
    if method == "simnpo":
        if forget_nll is None:
            raise ValueError("SimNPO's default β range needs the forget NLL̄ measured on the model.")
        gamma = Param(low=0.0, high=1.0)
        high = simnpo_beta_high(forget_nll, gamma.high)
        low = simnpo_beta_high(target_nll, gamma.high) if target_nll and target_nll > forget_nll else high / 30
        return {
            **lr,
            "forget_weight": Param(low=0.05, high=2.0, log=True),
            "beta": Param(low=low, high=high, log=True),
            "gamma": gamma,
        }
    if method == "npo":
        return {**lr, "forget_weight": Param(low=0.05, high=2.0, log=True), "beta": Param(low=0.02, high=1.0, log=True)}
    if method == "gradascent":
        return dict(lr)
    if method == "graddiff":
        return {**lr, "forget_weight": Param(low=0.05, high=2.0, log=True)}
    if method == "rmu":
        if not num_layers:
            raise ValueError("RMU's default layer range needs the model's number of decoder layers.")
        top = max(0, num_layers - 2)
        return {
            **lr,
            "layer_id": Param("int", min(1, top), top),
            # the control vector's norm as a multiple of the forget activations' (steering_coeff="auto")
            "steering_scale": Param(low=0.5, high=30.0, log=True),
            "retain_weight": Param(low=1.0, high=1e4, log=True),
        }
    weight = {"forget_weight": Param(low=0.05, high=2.0, log=True)}
    others = {  # around each published setting (docs/method.md §8), on both sides
        "wga": {"beta": Param(low=0.1, high=5.0, log=True)},
        "satimp": {"beta1": Param(low=0.5, high=10.0, log=True), "beta2": Param(low=0.1, high=5.0, log=True)},
        "idknll": {},
        "idkdpo": {"beta": Param(low=0.02, high=1.0, log=True)},
        "undial": {"beta": Param(low=1.0, high=30.0, log=True)},
        "ceu": {"ignore_first_n_answer_tokens": Param("int", 0, 2)},
        "pdu": {"dual_step_size": Param(low=0.1, high=10.0, log=True)},  # `retain_loss_eps` comes from the recipe
    }
    if method in others:
        return {**lr, **weight, **others[method]}
    raise ValueError(f"no search space for method {method!r}; give one with `search_space:` in the recipe.")


def _param(name: str, value) -> Param:
    if isinstance(value, Param):
        return value
    if isinstance(value, Mapping):
        unknown = set(value) - {"low", "high", "log", "type", "choices"}
        if unknown:
            raise ValueError(f"search space `{name}`: unknown key(s) {sorted(unknown)}; use low, high, log, type.")
        if "choices" in value:
            return Param("categorical", choices=tuple(value["choices"]))
        kind = value.get("type", "float")
        try:
            return Param(kind, value.get("low"), value.get("high"), bool(value.get("log", False)))
        except ValueError as e:
            raise ValueError(f"search space `{name}`: {str(e).removeprefix('search space: ')}") from None
    if isinstance(value, (list, tuple)):
        try:
            return Param("categorical", choices=tuple(value))
        except ValueError as e:
            raise ValueError(f"search space `{name}`: {str(e).removeprefix('search space: ')}") from None
    return Param("categorical", choices=(value,))


def space_from_dict(d: Mapping) -> dict[str, Param]:
    """A YAML mapping (see the module docstring) as a space; `null` entries are kept as None (removals)."""
    return {name: (None if v is None else _param(name, v)) for name, v in d.items()}


def space_to_dict(space: Mapping[str, Param]) -> dict:
    """JSON / YAML form (kept in the study's storage and in tuning.json; `space_from_dict` reads it back)."""
    out = {}
    for n, p in space.items():
        d = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(p).items() if v is not None}
        d["type"] = d.pop("kind")
        out[n] = {"choices": d["choices"]} if p.kind == "categorical" else d
    return out


def check_simnpo_weight(space: Mapping[str, Param], forget_nll: float) -> float:
    """The SimNPO weight `2σ(−β·NLL̄ − γ)` at the space's largest β and γ; an error when it is ~0."""
    beta = space["beta"].largest if "beta" in space else 2.5
    gamma = space["gamma"].largest if "gamma" in space else 0.0
    w = simnpo_weight(beta, forget_nll, gamma)
    if w < SIMNPO_WEIGHT_FLOOR:
        raise ValueError(
            f"SimNPO's weight 2σ(−β·NLL̄−γ) is {w:.1e} at β={beta:g}, γ={gamma:g} (forget NLL̄ {forget_nll:.2f} nats/"
            f"token): it switches itself off there. Lower beta's high to <= {simnpo_beta_high(forget_nll, gamma):.3g}."
        )
    return w


def resolve_space(
    method: str,
    overrides: Mapping | None = None,
    forget_nll: float | None = None,
    num_layers: int | None = None,
    target_nll: float | None = None,
) -> dict[str, Param]:
    """The default space of `method` with `overrides` (a YAML mapping) applied; checked (not empty; SimNPO's
    weight not ~0 over the range)."""
    overrides = space_from_dict(overrides or {})
    fixed_beta = overrides.get("beta") is not None
    nll = forget_nll if method != "simnpo" or not fixed_beta else 1.0
    space = default_space(method, nll, num_layers, target_nll if not fixed_beta else None)
    for name, p in overrides.items():
        if p is None:
            space.pop(name, None)
        else:
            space[name] = p
    if "lr_mult" in space and "learning_rate" in space:
        raise ValueError("search space has both `lr_mult` and `learning_rate`: keep one (set the other to null).")
    if not space:
        raise ValueError(f"the search space of {method} is empty: search at least one name (e.g. lr_mult).")
    if method == "simnpo" and forget_nll is not None:
        check_simnpo_weight(space, forget_nll)
    return space


def suggest(trial, space: Mapping[str, Param]) -> dict:
    """One point of `space` drawn by an Optuna trial."""
    out = {}
    for name, p in space.items():
        if p.kind == "categorical":
            out[name] = trial.suggest_categorical(name, list(p.choices))
        elif p.kind == "int":
            out[name] = trial.suggest_int(name, int(p.low), int(p.high), log=p.log)
        else:
            out[name] = trial.suggest_float(name, float(p.low), float(p.high), log=p.log)
    return out


def to_config_values(params: Mapping, base_learning_rate: float) -> dict:
    """Searched values as config fields: `lr_mult` becomes `learning_rate = lr_mult · base_learning_rate`."""
    values = {k: v for k, v in params.items() if k != "lr_mult"}
    if "lr_mult" in params:
        values["learning_rate"] = float(params["lr_mult"]) * base_learning_rate
    return values
