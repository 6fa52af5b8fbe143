"""Decoder-layer surgery for methods that act on a layer's activations (RMU): find the decoder layers, run the
backbone up to one layer (its output, no LM head), freeze all but chosen modules of chosen layers, and the fixed
random control vector."""

import torch

from .modeling import causal_lm


def decoder_layers(model) -> tuple[torch.nn.Module, str]:
    """`(owner, name)` such that `getattr(owner, name)` is the model's `ModuleList` of decoder layers: the first one
    of `num_hidden_layers` blocks in its backbone (`model.model.layers` for Llama, Mistral, Qwen, Gemma)."""
    lm = causal_lm(model)
    count = getattr(lm.config.get_text_config(), "num_hidden_layers", None)
    backbone = lm.base_model
    for name, module in backbone.named_modules():
        if isinstance(module, torch.nn.ModuleList) and count is not None and len(module) == count:
            owner, _, attr = name.rpartition(".")
            return backbone.get_submodule(owner), attr
    raise ValueError(
        f"{type(lm).__name__} has no accessible decoder layers (no ModuleList of config.num_hidden_layers={count} "
        "blocks in its backbone), so RMU can't read the activations of a layer. Use a decoder-only transformers model "
        "(Llama, Mistral, Qwen, Gemma, ...)."
    )


def layers_path(model) -> str:
    """The dotted path of the decoder-layer list inside the causal LM of `model` (e.g. `model.layers`)."""
    lm = causal_lm(model)
    owner, name = decoder_layers(lm)
    owner_path = next(path for path, module in lm.named_modules() if module is owner)
    return f"{owner_path}.{name}" if owner_path else name


def layer_output(
    lm, input_ids=None, attention_mask=None, *, layers: str, layer_id: int, grad_from: int = 0, **kwargs
) -> torch.Tensor:
    """Output `[B, T, H]` of decoder layer `layer_id` of the causal LM `lm` (its layer list at the dotted path
    `layers`), running only layers `0 .. layer_id` and no LM head: the list is cut to those layers for the call and
    restored after. The graph starts at the input of layer `grad_from` (the first trained layer): no backward runs
    below it, even when activation checkpointing has made the embeddings' output require grad (transformers does,
    for reentrant checkpointing). Pass it as `model(..., unlearning_forward=partial(layer_output, layers=...,
    layer_id=...))` (`modeling.add_unlearning_forward`)."""
    owner_path, _, name = layers.rpartition(".")
    owner = lm.get_submodule(owner_path)
    full = getattr(owner, name)
    captured = []

    def keep(module, args, output):
        captured.append(output[0] if isinstance(output, tuple) else output)

    def cut(module, args, kw):  # inside the layer's checkpoint, if any: a fresh leaf, recomputed with grad
        if args:
            return (args[0].detach().requires_grad_(torch.is_grad_enabled()), *args[1:]), kw
        return args, {**kw, "hidden_states": kw["hidden_states"].detach().requires_grad_(torch.is_grad_enabled())}

    handles = [
        full[layer_id].register_forward_hook(keep),
        full[grad_from].register_forward_pre_hook(cut, with_kwargs=True),
    ]
    setattr(owner, name, full[: layer_id + 1])
    try:
        kwargs = {k: v for k, v in kwargs.items() if v is not None and k not in ("labels", "return_dict")}
        lm.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
    finally:
        setattr(owner, name, full)
        for handle in handles:
            handle.remove()
    return captured[0]


def control_vector(hidden_size: int, steering_coeff: float, seed: int) -> torch.Tensor:
    """`c·u` `[H]` fp32: `u` with entries uniform in [0, 1), normalised, from a CPU generator seeded with `seed`."""
    u = torch.rand(hidden_size, generator=torch.Generator().manual_seed(seed))
    return steering_coeff * u / u.norm()


def select_parameters(model, layers, update_layers, update_modules) -> tuple[list[str], int]:
    """Freeze every parameter of `model` but the trainable ones inside `update_modules` of `update_layers`; returns
    (their names, how many trainable tensors were frozen)."""

    def inside(name):
        return any(name == m or name.startswith(m + ".") for m in update_modules)

    keep = {id(p) for i in update_layers for n, p in layers[i].named_parameters() if inside(n) and p.requires_grad}
    names, frozen = [], 0
    for n, p in model.named_parameters():
        if id(p) in keep:
            names.append(n)
        elif p.requires_grad:
            p.requires_grad_(False)
            frozen += 1
    return names, frozen
