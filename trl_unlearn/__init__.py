"""trl-unlearn: LLM unlearning (SimNPO, NPO, GA, GradDiff, RMU, WGA, SatImp, IdkNLL, IdkDPO) as drop-in Hugging Face
TRL trainers.

The public names below load on first use (as in transformers and TRL), so `trl-unlearn --help` starts at once.
"""

import importlib

__version__ = "0.1.0.dev0"

_EXPORTS = {
    "methods.base_config": ["UnlearningConfig"],
    "methods.base": ["UnlearningTrainer"],
    "methods.simnpo": ["SimNPOConfig", "SimNPOTrainer"],
    "methods.npo": ["NPOConfig", "NPOTrainer"],
    "methods.grad_ascent": ["GradAscentConfig", "GradAscentTrainer"],
    "methods.grad_diff": ["GradDiffConfig", "GradDiffTrainer"],
    "methods.rmu": ["RMUConfig", "RMUTrainer"],
    "methods.wga": ["WGAConfig", "WGATrainer"],
    "methods.satimp": ["SatImpConfig", "SatImpTrainer"],
    "methods.idk_nll": ["IdkNLLConfig", "IdkNLLTrainer"],
    "methods.idk_dpo": ["IdkDPOConfig", "IdkDPOTrainer"],
    "methods.undial": ["UNDIALConfig", "UNDIALTrainer"],
    "methods.ceu": ["CEUConfig", "CEUTrainer"],
    "methods.pdu": ["PDUConfig", "PDUTrainer"],
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name):
    if name in _MODULE_OF:
        value = getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
