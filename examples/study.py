"""What the example studies (`tofu.py`, `muse.py`) share: building each method's config from the one config a
study script parses."""

import dataclasses

from trl_unlearn.methods import get_method
from trl_unlearn.methods.base_config import UnlearningConfig
from trl_unlearn.methods.npo import NPOConfig
from trl_unlearn.methods.simnpo import SimNPOConfig


def method_config(method: str, base, output_dir: str, npo_beta: float | None = None):
    """The config of `method` (a `trl_unlearn.methods.REGISTRY` name), every shared field copied from `base` (the
    `SimNPOConfig` a study script parses), except the fields whose default the method sets itself (e.g. gradient
    ascent's `retain_weight=0`, RMU's weights and learning rate, UNDIAL's and CE-U's `retain_weight=0`): those keep
    the method's default. `beta` is SimNPO's: NPO takes `npo_beta`; other methods keep their own β default."""
    _, config_cls = get_method(method)
    fields = {f.name: f for f in dataclasses.fields(config_cls) if f.init}
    shared = fields.keys() & {f.name for f in dataclasses.fields(base) if f.init}
    own_default = {name for name in shared if _default(config_cls, name) != _default(UnlearningConfig, name)}
    values = {n: getattr(base, n) for n in shared - own_default - {"beta", "gamma"}}
    values["output_dir"] = output_dir
    if config_cls is NPOConfig:
        values.update(beta=npo_beta if npo_beta is not None else NPOConfig.beta, precompute_ref_log_probs=None)
    elif config_cls is SimNPOConfig:
        values.update(beta=base.beta, gamma=base.gamma)
    return config_cls(**values)


def _default(config_cls, name):
    field = next((f for f in dataclasses.fields(config_cls) if f.name == name), None)
    if field is None:
        return None
    if field.default is not dataclasses.MISSING:
        return field.default
    return field.default_factory() if field.default_factory is not dataclasses.MISSING else None
