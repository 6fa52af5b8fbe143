"""One module per unlearning method: its config, its trainer and what is special about its loss. `base` holds the
machinery every method shares (`UnlearningTrainer`), `base_config` the shared fields (`UnlearningConfig`).

| module | method |
|---|---|
| `simnpo` | SimNPO: length-normalised NPO without a reference |
| `npo` | NPO, against a reference |
| `grad_ascent` | gradient ascent (TOFU's GA) |
| `grad_diff` | GradDiff: GA on forget, NLL / KL on retain |
| `rmu` | RMU: steer a layer's activations on forget text |
| `wga` | WGA: token-level GA weighted by the detached `p_t^β` |
| `satimp` | SatImp: token-level GA weighted by the detached `p_t^β1 (1 − p_t)^β2` |
| `idk_nll` | IdkNLL: NLL on "I don't know" answers to the forget prompts |
| `idk_dpo` | IdkDPO: DPO with the IdK answer chosen and the forget answer rejected |
| `undial` | UNDIAL: distil the frozen model with the target's logit lowered (full vocabulary) |
| `ceu` | CE-U: cross-entropy to the model's distribution without the target (full vocabulary) |
| `pdu` | PDU: logit-margin flattening under a retain-loss constraint, primal-dual |
"""

import importlib

# Command-line name -> (module, trainer class). A new method adds one line here; the CLI, `tune` and the examples
# read this table. Light to import: nothing loads until `get_method` runs.
REGISTRY = {
    "simnpo": ("simnpo", "SimNPOTrainer"),
    "npo": ("npo", "NPOTrainer"),
    "gradascent": ("grad_ascent", "GradAscentTrainer"),
    "graddiff": ("grad_diff", "GradDiffTrainer"),
    "rmu": ("rmu", "RMUTrainer"),
    "wga": ("wga", "WGATrainer"),
    "satimp": ("satimp", "SatImpTrainer"),
    "idknll": ("idk_nll", "IdkNLLTrainer"),
    "idkdpo": ("idk_dpo", "IdkDPOTrainer"),
    "undial": ("undial", "UNDIALTrainer"),
    "ceu": ("ceu", "CEUTrainer"),
    "pdu": ("pdu", "PDUTrainer"),
}


def get_method(name: str):
    """`(trainer class, config class)` of the method `name` (a key of `REGISTRY`)."""
    if name not in REGISTRY:
        raise ValueError(f"Unknown method {name!r}: choose one of {', '.join(REGISTRY)}.")
    module, trainer = REGISTRY[name]
    cls = getattr(importlib.import_module(f".{module}", __name__), trainer)
    return cls, cls.config_class
