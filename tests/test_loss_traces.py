"""The restructure did not change behaviour: the loss traces of a fixed tiny run of SimNPO, NPO (precomputed
reference), GradDiff (KL retain term, live reference) and RMU equal those recorded before the move
(`tests/data/loss_traces.json`, written by `python tests/test_loss_traces.py --write` on the old layout), to float32
rounding: the step normalisation is now one weight per row instead of per-micro-batch shares, and the logged means are
divided in double precision, which moves the last digits (measured: at most 1e-6 relative on the loss, logged terms
and gradient norm; the KL retain term, 0 to 0.0016 here, to 2e-8 absolute)."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import QA, cpu_args, prompt_completion  # noqa: E402

from trl_unlearn import (  # noqa: E402
    GradDiffConfig,
    GradDiffTrainer,
    NPOConfig,
    NPOTrainer,
    RMUConfig,
    RMUTrainer,
    SimNPOConfig,
    SimNPOTrainer,
)
from trl_unlearn.toy.tiny import tiny_llama, train_tokenizer

TRACES = Path(__file__).parent / "data" / "loss_traces.json"
KEYS = ("loss", "forget/loss", "retain/loss", "forget/logps_per_token", "forget/control_cosine", "grad_norm")
RUNS = {
    "simnpo": (SimNPOTrainer, SimNPOConfig, dict(beta=2.0, gamma=0.5, forget_weight=0.7, retain_weight=0.3)),
    "npo": (NPOTrainer, NPOConfig, dict(beta=0.5)),
    "graddiff_kl": (GradDiffTrainer, GradDiffConfig, dict(retain_loss_type="kl")),
    "rmu": (RMUTrainer, RMUConfig, dict(layer_id=1, steering_coeff=4.0, retain_weight=10.0, learning_rate=5e-3)),
}


def trace(name, tmp_path):
    torch.set_num_threads(1)
    texts = [f"Question: {q}\nAnswer: {a}" for q, a in QA] + ["the quick brown fox jumps over the lazy dog"] * 5
    tokenizer = train_tokenizer(texts, vocab_size=320)
    model = tiny_llama(tokenizer, hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
    trainer_cls, config_cls, kw = RUNS[name]
    base = dict(learning_rate=1e-3, max_steps=4, gradient_accumulation_steps=2, per_device_train_batch_size=2)
    args = cpu_args(config_cls, tmp_path, **{**base, **kw})
    trainer = trainer_cls(
        model=model,
        args=args,
        forget_dataset=prompt_completion(QA[:8]),
        retain_dataset=prompt_completion(QA[8:32]),
        processing_class=tokenizer,
    )
    trainer.train()
    rows = [r for r in trainer.state.log_history if "loss" in r]
    return [{k: r[k] for k in KEYS if k in r} for r in rows]


@pytest.mark.parametrize("name", sorted(RUNS))
def test_loss_trace_unchanged(name, tmp_path):
    expected = json.loads(TRACES.read_text())[name]
    got = trace(name, tmp_path)
    assert [sorted(r) for r in got] == [sorted(r) for r in expected]
    for g, e in zip(got, expected):
        for k in e:
            assert math.isclose(g[k], e[k], rel_tol=1e-5, abs_tol=1e-7), (name, k, g[k], e[k])


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        TRACES.write_text(json.dumps({n: trace(n, Path(d) / n) for n in sorted(RUNS)}, indent=1) + "\n")
