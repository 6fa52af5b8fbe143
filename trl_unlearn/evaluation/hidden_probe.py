"""Hidden-state readings of an answer token, per decoder layer: is the forgotten answer still linearly
decodable after the output stops showing it?

* `probe_targets`: what each row is probed on: the answer's first token given the prompt, or, for TOFU rows, the
  fact token (where the paraphrased answer first differs from a perturbed one) given the prompt and the
  paraphrase up to it.
* `layer_states`: each decoder layer's output at the last context position, `[L, N, H]` fp32.
* `logit_lens`: per layer, the model's final norm and LM head applied to that layer's state (nostalgebraist 2020,
  "interpreting GPT: the logit lens"); top-1 accuracy and mean probability of the first answer token. The last
  layer's reading is the model's own next-token distribution.
* `linear_probe_accuracy`: a scikit-learn logistic regression (standardised features) trained on one set's states
  and labels, tested on another's (the audit trains on retain answers, tests on forget answers).
* `hidden_probe`: both, for every layer, and the best layer.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from ..data.formats import PromptFormat
from ..modeling import head_logits
from .scoring import eval_mode, model_device, pad_id

__all__ = ["decoder_layers", "hidden_probe", "layer_states", "linear_probe_accuracy", "logit_lens", "probe_targets"]


def decoder_layers(model) -> tuple[Sequence[torch.nn.Module], torch.nn.Module | None]:
    """The decoder layers (`model.get_decoder().layers`) and the final norm (`.norm`, None when the architecture
    names it otherwise); `ValueError` naming the fix when the model has no `.layers` list."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise ValueError(
            f"{type(model).__name__}: no decoder `.layers` found (model.get_decoder().layers); the hidden-state probe "
            "supports Llama-style models: leave 'hidden_probe' out of --attacks for this one"
        )
    return list(layers), getattr(decoder, "norm", None)


def probe_targets(tokenizer, rows: Sequence[Mapping], fmt: PromptFormat) -> tuple[list[list[int]], list[int]]:
    """`(contexts, labels)`: the token ids read by the model and the answer token to predict, per row.

    A row with ``paraphrased_answer`` and ``perturbed_answer`` (TOFU layout) is probed at its fact token: the first
    token where the paraphrased answer differs from the first perturbed answer (they share a template and differ
    where the fact is), the context being the prompt and the paraphrase up to there. Any other row (or one whose
    paraphrase never differs) is probed at the answer's first token, the context being the prompt.
    """
    contexts, labels = [], []
    for r in rows:
        prompt = fmt.prompt_ids(tokenizer, r["question"])
        pert = r.get("perturbed_answer")
        pert = pert[0] if isinstance(pert, list) and pert else pert
        j = None
        if isinstance(r.get("paraphrased_answer"), str) and isinstance(pert, str):
            para, wrong = fmt.answer_ids(tokenizer, r["paraphrased_answer"]), fmt.answer_ids(tokenizer, pert)
            j = next((k for k, (a, b) in enumerate(zip(para, wrong)) if a != b), None)
        if j is None:
            contexts.append(prompt)
            labels.append(fmt.answer_ids(tokenizer, r["answer"])[0])
        else:
            contexts.append(prompt + para[:j])
            labels.append(para[j])
    return contexts, labels


def layer_states(model, tokenizer, contexts: Sequence[list[int]], batch_size: int = 16) -> torch.Tensor:
    """Every decoder layer's output at the last token of each context: `[L, N, H]` fp32 on CPU (right-padded
    batches; forward hooks on the layers)."""
    layers, _ = decoder_layers(model)
    captured: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        captured.append(output[0] if isinstance(output, tuple) else output)

    handles = [layer.register_forward_hook(hook) for layer in layers]
    pad, device = pad_id(tokenizer), model_device(model)
    out = []
    try:
        with eval_mode(model):
            for s in range(0, len(contexts), batch_size):
                chunk = contexts[s : s + batch_size]
                width = max(len(p) for p in chunk)
                ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                attn = torch.zeros((len(chunk), width), dtype=torch.long)
                for r, p in enumerate(chunk):
                    ids[r, : len(p)] = torch.tensor(p, dtype=torch.long)
                    attn[r, : len(p)] = 1
                captured.clear()
                model(input_ids=ids.to(device), attention_mask=attn.to(device), use_cache=False)
                last = torch.tensor([len(p) - 1 for p in chunk])
                rows = torch.arange(len(chunk))
                out.append(torch.stack([h[rows, last.to(h.device)].float().cpu() for h in captured]))
    finally:
        for h in handles:
            h.remove()
    return torch.cat(out, dim=1)


def logit_lens(model, states: torch.Tensor, labels: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per layer: (top-1 accuracy, mean probability) of `labels` under `head(norm(state))`. Without a `.norm` the
    head is applied to the raw state."""
    _, norm = decoder_layers(model)
    weight = model.get_output_embeddings().weight
    acc, prob = [], []
    with torch.no_grad():
        for h in states:
            h = h.to(device=weight.device, dtype=weight.dtype)
            logp = torch.log_softmax(head_logits(model, norm(h) if norm is not None else h), dim=-1).cpu()
            acc.append(float((logp.argmax(-1) == labels).float().mean()))
            prob.append(float(logp.gather(-1, labels[:, None]).exp().mean()))
    return acc, prob


def linear_probe_accuracy(train_x, train_y, test_x, test_y, seed: int = 0, max_iter: int = 2000) -> float | None:
    """Test accuracy of `LogisticRegression` (after `StandardScaler`) fitted on `(train_x [N, H], train_y [N])`;
    None when the training labels hold a single class (nothing to fit). Test items whose label never occurs in
    training count as wrong (the probe cannot name a class it never saw)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    train_y = np.asarray(train_y)
    if np.unique(train_y).size < 2:
        return None
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter, random_state=seed))
    with warnings.catch_warnings():
        # answer tokens are many classes with few examples each: expected here, not a mislabelled regression target
        warnings.filterwarnings("ignore", message="The number of unique classes is greater than 50%")
        clf.fit(np.asarray(train_x), train_y)
    return float(np.mean(clf.predict(np.asarray(test_x)) == np.asarray(test_y)))


def hidden_probe(
    model, tokenizer, train_rows, test_rows, fmt: PromptFormat, *, batch_size: int = 16, seed: int = 0
) -> dict:
    """Per layer: logit-lens accuracy / probability of `test_rows`' targets (`probe_targets`), and the accuracy on
    them of a linear probe fitted on `train_rows`' states. Returns ``lens_accuracy``, ``lens_probability``,
    ``probe_accuracy`` (lists, one per layer), ``output_accuracy`` (the last layer's lens = the model's own top-1),
    ``best_probe_layer``, ``best_probe_accuracy`` (layers numbered from 1), ``test_labels_unseen_in_training``."""
    train_ctx, train_y = probe_targets(tokenizer, train_rows, fmt)
    test_ctx, test_y = probe_targets(tokenizer, test_rows, fmt)
    train_y, test_y = torch.tensor(train_y), torch.tensor(test_y)
    train_states = layer_states(model, tokenizer, train_ctx, batch_size)
    test_states = layer_states(model, tokenizer, test_ctx, batch_size)
    lens_acc, lens_prob = logit_lens(model, test_states, test_y)
    probe = [
        linear_probe_accuracy(tr.numpy(), train_y.numpy(), te.numpy(), test_y.numpy(), seed)
        for tr, te in zip(train_states, test_states)
    ]
    scored = [(a, i) for i, a in enumerate(probe) if a is not None]
    best_acc, best_layer = max(scored, key=lambda t: (t[0], -t[1])) if scored else (None, None)
    return {
        "lens_accuracy": lens_acc,
        "lens_probability": lens_prob,
        "probe_accuracy": probe,
        "output_accuracy": lens_acc[-1],
        "best_probe_layer": None if best_layer is None else best_layer + 1,
        "best_probe_accuracy": best_acc,
        "test_labels_unseen_in_training": int(np.sum(~np.isin(test_y.numpy(), train_y.numpy()))),
    }
