"""`UnlearningEvalCallback` with lm-eval tasks: the logged numbers are `evaluate_harness`'s on the same model state,
`harness_limit` documents are scored, the tasks are built once, early stop on a harness accuracy known by hand (the
constant model of test_harness.py, not moved by training at learning rate 0), train mode, RNG and training untouched.
"""

import importlib.util
import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import QA, cpu_args, prompt_completion
from test_harness import COLOURS, constant_model, tasks_dir  # noqa: F401 (tasks_dir: toy_mc, toy_a/b, toy_group)
from transformers import TrainerCallback

from trl_unlearn import SimNPOConfig, SimNPOTrainer
from trl_unlearn.evaluation.callback import UnlearningEvalCallback
from trl_unlearn.evaluation.lm_eval import evaluate_harness
from trl_unlearn.evaluation.lm_eval_callback import LMEvalGuardCallback
from trl_unlearn.toy.tiny import tiny_llama, train_tokenizer

needs_lm_eval = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="the lm-eval extra")
RETAIN = QA[8:12]


@pytest.fixture(scope="module")
def tok():
    """Colours one token each (the constant model's logits) and the QA texts the trainer trains on."""
    texts = [f"Which colour? Answer: {w}" for w in COLOURS] * 50 + [f"Question: {q}\nAnswer: {a}" for q, a in QA]
    tok = train_tokenizer(texts, vocab_size=400)
    assert all(len(tok(" " + w, add_special_tokens=False).input_ids) == 1 for w in COLOURS)
    return tok


class ModeSpy(TrainerCallback):
    """The model's train mode at every step end, after the probe callback (added after it)."""

    def __init__(self):
        self.modes = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.modes.append(model.training)


def trainer_for(model, tok, tmp_path, **kw):
    return SimNPOTrainer(model=model, args=cpu_args(SimNPOConfig, tmp_path, **kw), forget_dataset=prompt_completion(
        QA[:8]), retain_dataset=prompt_completion(QA[8:16]), processing_class=tok)  # fmt: skip


def harness_logs(trainer, key="probe/harness/toy_mc/acc"):
    return [h for h in trainer.state.log_history if key in h]


def harness(model, tok, tasks_dir, **kw):
    return evaluate_harness(model, tok, "toy_mc", include_path=tasks_dir, include_defaults=False, **kw)


@needs_lm_eval
def test_logged_values_are_evaluate_harness_on_the_same_model(tok, tasks_dir, tmp_path, monkeypatch):
    from lm_eval.api.task import ConfigurableTask

    built = []
    init = ConfigurableTask.__init__
    monkeypatch.setattr(ConfigurableTask, "__init__", lambda self, *a, **k: built.append(1) or init(self, *a, **k))

    model = tiny_llama(tok, hidden_size=16, num_hidden_layers=1, num_attention_heads=2)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    start = harness(model, tok, tasks_dir, limit=4)
    trainer = trainer_for(model, tok, tmp_path, max_steps=3, learning_rate=1e-2)
    qa = UnlearningEvalCallback(RETAIN, None, eval_steps=2, prompt_format="plain").attach(trainer)
    probe = LMEvalGuardCallback(
        "toy_mc", limit=4, include_path=tasks_dir, include_defaults=False, batch_size=3, eval_steps=2
    ).attach(trainer)
    spy = ModeSpy()
    trainer.add_callback(spy)
    built.clear()
    trainer.train()
    assert len(built) == 1  # toy_mc built once (at the first probe), reused by the next two

    logs = harness_logs(trainer)
    assert [h["step"] for h in logs] == [0, 2, 3]
    keys = ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr")
    assert [h["step"] for h in qa.history] == [0, 2, 3]  # the QA probe runs alongside
    assert all(h["forget_probability"] > 0 for h in qa.history)
    for k in keys:
        assert logs[0][f"probe/harness/toy_mc/{k}"] == start.metrics[f"toy_mc/{k}"]
    end = harness(model, tok, tasks_dir, limit=4)  # the final model, scored afresh
    for k in keys:
        assert logs[-1][f"probe/harness/toy_mc/{k}"] == end.metrics[f"toy_mc/{k}"]
    # the per-document log-likelihoods too; training moved them, so the equality means something
    last = probe.report.per_item["toy_mc"]

    def flat(items):
        return [x for doc in items["loglikelihoods"] for x in doc]

    assert flat(last) == pytest.approx(flat(end.per_item["toy_mc"]), abs=1e-5)
    assert flat(last) != pytest.approx(flat(start.per_item["toy_mc"]), abs=1e-3)
    # harness_limit: the first four of the five documents
    assert last["doc_id"] == [0, 1, 2, 3]
    assert probe.report.settings["n_samples"]["toy_mc"] == {"original": 5, "effective": 4}
    assert [h["step"] for h in probe.history] == [0, 2, 3] and "harness/toy_mc/acc" in probe.history[1]
    assert trainer.evaluation_summary["probe/harness/toy_mc/acc"] == logs[-1]["probe/harness/toy_mc/acc"]
    # train mode at every step; parameters trained, exactly as without the callback
    assert spy.modes == [True] * 3 and model.training
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, initial[n])]
    assert moved
    plain = tiny_llama(tok, hidden_size=16, num_hidden_layers=1, num_attention_heads=2)
    trainer_for(plain, tok, tmp_path / "plain", max_steps=3, learning_rate=1e-2).train()
    for (n, p), q in zip(model.named_parameters(), plain.parameters()):
        assert torch.equal(p, q), n


@needs_lm_eval
@pytest.mark.parametrize(
    "minimum,relative,stops",
    [(0.61, False, True), (0.6, False, False), (1.01, True, True), (1.0, True, False)],
)  # fmt: skip
def test_early_stop_on_harness_accuracy(minimum, relative, stops, tok, tasks_dir, tmp_path):
    """The constant model's toy_mc accuracy is 3/5 (test_harness.py), at every probe: learning rate 0."""
    model = constant_model(tok)
    trainer = trainer_for(model, tok, tmp_path, max_steps=4, learning_rate=0.0)
    probe = LMEvalGuardCallback(
        tasks=["toy_mc"],
        limit=None,
        include_path=tasks_dir,
        include_defaults=False,
        eval_steps=2,
        eval_on_train_begin=False,
        min_metrics={"toy_mc/acc": minimum},
        relative=relative,
    ).attach(trainer)
    trainer.train()
    accs = [h["harness/toy_mc/acc"] for h in probe.history]
    assert accs and all(a == pytest.approx(3 / 5) for a in accs)
    assert probe.baseline == ({"harness/toy_mc/acc": pytest.approx(3 / 5)} if relative else {})
    assert [h["step"] for h in probe.history] == ([0] if relative else []) + ([2] if stops else [2, 4])
    if stops:
        assert trainer.state.global_step == 2 and probe.stopped_at == 2
        assert harness_logs(trainer)[-1]["probe/early_stop"] == 1.0
        assert trainer.evaluation_summary["probe/early_stopped_at_step"] == 2
    else:
        assert trainer.state.global_step == 4 and probe.stopped_at is None
        assert not any("probe/early_stop" in h for h in trainer.state.log_history)


@needs_lm_eval
def test_group_logs_its_aggregate_and_probe_restores_mode_and_rng(tok, tasks_dir):
    model = constant_model(tok)
    model.train()
    probe = LMEvalGuardCallback(tasks="toy_group", include_path=tasks_dir,
                                   include_defaults=False, limit=2)  # fmt: skip
    rng = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
    metrics = probe.probe(model, tok)
    assert model.training
    assert random.getstate() == rng[0] and np.array_equal(np.random.get_state()[1], rng[1])  # lm-eval seeds them
    assert torch.equal(torch.get_rng_state(), rng[2])
    # toy_a's first two documents (acc 1, 0) and toy_b's two (1, 0): 2/4; its tasks are not logged
    assert set(metrics) == {"harness/toy_group/acc", "harness/toy_group/acc_stderr"}
    assert metrics["harness/toy_group/acc"] == pytest.approx(2 / 4)
    assert probe.report.metrics["toy_a/acc"] == pytest.approx(1 / 2)


@needs_lm_eval
def test_peft_model_is_scored_with_its_adapters(tok, tasks_dir, tmp_path):
    from peft import LoraConfig

    model = tiny_llama(tok, hidden_size=16, num_hidden_layers=1, num_attention_heads=2)
    trainer = SimNPOTrainer(
        model=model,
        args=cpu_args(SimNPOConfig, tmp_path, max_steps=2, learning_rate=5e-2),
        forget_dataset=prompt_completion(QA[:8]),
        retain_dataset=prompt_completion(QA[8:16]),
        processing_class=tok,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    probe = LMEvalGuardCallback(tasks="toy_mc", include_path=tasks_dir,
                                   include_defaults=False, eval_steps=1).attach(trainer)  # fmt: skip
    trainer.train()

    def flat(report):
        return [x for doc in report.per_item["toy_mc"]["loglikelihoods"] for x in doc]

    peft_model = trainer.model
    assert peft_model.training
    assert flat(probe.report) == pytest.approx(flat(harness(peft_model, tok, tasks_dir)), abs=1e-5)
    with peft_model.disable_adapter():  # the adapters moved it: the probe scored the adapted model
        assert flat(probe.report) != pytest.approx(flat(harness(peft_model, tok, tasks_dir)), abs=1e-4)


@needs_lm_eval
def test_bad_arguments(tok, tasks_dir, tmp_path):
    local = dict(include_path=tasks_dir, include_defaults=False)
    with pytest.raises(ValueError, match="forget_rows and/or retain_rows.*LMEvalGuardCallback"):
        UnlearningEvalCallback()
    with pytest.raises(ValueError, match="unknown lm-eval task.*'toy_mcc'.*toy_mc"):
        LMEvalGuardCallback(tasks="toy_mcc", **local)
    with pytest.raises(ValueError, match="'other/acc'.*task of `tasks`"):
        LMEvalGuardCallback(tasks="toy_mc", min_metrics={"other/acc": 0.5}, **local)
    with pytest.raises(ValueError, match="'toy_mc'.*task of `tasks`"):
        LMEvalGuardCallback(tasks="toy_mc", min_metrics={"toy_mc": 0.5}, **local)
    with pytest.raises(ValueError, match="must be >= 0"):
        LMEvalGuardCallback(tasks="toy_mc", min_metrics={"toy_mc/acc": -1}, **local)
    with pytest.raises(TypeError, match="min_harness_metrics"):  # the QA probe has no lm-eval thresholds
        UnlearningEvalCallback(RETAIN, min_harness_metrics={"toy_mc/acc": 0.5})
    with pytest.raises(ValueError, match="batch_size must be an int"):
        LMEvalGuardCallback(tasks="toy_mc", batch_size="auto", **local)
    with pytest.raises(ValueError, match="limit must be > 0"):
        LMEvalGuardCallback(tasks="toy_mc", limit=0, **local)
    with pytest.raises(FileNotFoundError, match="include_path not found"):
        LMEvalGuardCallback(tasks="toy_mc", include_path=tasks_dir / "no")
    with pytest.raises(ValueError, match="pass limit as LMEvalGuardCallback's limit"):
        LMEvalGuardCallback(tasks="toy_mc", harness_kwargs={"limit": 3}, **local)
    # a metric the task does not report: at the first probe (train begin), before any training step
    model = constant_model(tok)
    trainer = trainer_for(model, tok, tmp_path, max_steps=2)
    LMEvalGuardCallback(tasks="toy_mc", min_metrics={"toy_mc/f1": 0.5}, **local).attach(trainer)
    with pytest.raises(ValueError, match=r"no value for \['harness/toy_mc/f1'\].*harness/toy_mc/acc"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_missing_lm_eval_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now raises ImportError
    with pytest.raises(ImportError, match=r'pip install "trl-unlearn\[lm-eval\]"'):
        LMEvalGuardCallback(tasks="mmlu")


# --------------------------------------------------------------------------------------------------- distributed
# The same file is the worker script: `accelerate launch tests/test_eval_callback_harness.py ...` (DDP on gloo, or
# DeepSpeed ZeRO-3, on CPU): every rank runs lm-eval on its model; no rank may wait on another.
RUNS = {
    "trained": {"learning_rate": 1e-2, "max_steps": 3},  # a random tiny model that training moves
    "stopped": {"learning_rate": 0.0, "max_steps": 3, "min_harness_metrics": {"toy_mc/acc": 0.61}},  # acc 3/5
}
LAUNCH = {
    "ddp": ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--mixed_precision", "no"],
    "zero3": ["accelerate", "launch", "--use_deepspeed", "--zero_stage", "3", "--num_processes", "2",
              "--mixed_precision", "no", "--zero3_init_flag", "true", "--zero3_save_16bit_model", "true"],
}  # fmt: skip


def _worker(folder, tasks_dir):
    for run in RUNS:
        _worker_run(os.path.join(folder, run, "model"), tasks_dir, os.path.join(folder, run, "out"), run)


def _worker_run(model_dir, tasks_dir, out, run):
    import json

    from transformers import PreTrainedTokenizerFast

    settings = RUNS[run]
    tok = PreTrainedTokenizerFast.from_pretrained(model_dir)
    args = cpu_args(SimNPOConfig, Path(out), output_dir=out, per_device_train_batch_size=2, disable_tqdm=True,
                    learning_rate=settings["learning_rate"], max_steps=settings["max_steps"])  # fmt: skip
    trainer = SimNPOTrainer(model=model_dir, args=args, forget_dataset=prompt_completion(QA[:8]),
                            retain_dataset=prompt_completion(QA[8:16]), processing_class=tok)  # fmt: skip
    UnlearningEvalCallback(RETAIN, None, eval_steps=1, prompt_format="plain").attach(trainer)  # alongside
    probe = LMEvalGuardCallback(
        "toy_mc",
        eval_steps=1,
        limit=None,
        include_path=tasks_dir,
        include_defaults=False,
        min_metrics=settings.get("min_harness_metrics"),
    ).attach(trainer)
    trainer.train()
    trainer.save_model(out)
    rank = trainer.accelerator.process_index
    if probe.report is not None:
        probe.report.save(os.path.join(out, f"report_rank{rank}.json"))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(
            {
                "history": probe.history,
                "stopped_at": probe.stopped_at,
                "step": trainer.state.global_step,
                "world_size": trainer.accelerator.num_processes,
                "deepspeed": trainer.is_deepspeed_enabled,
            },
            f,
        )


@needs_lm_eval
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "zero3"])
def test_distributed_ranks_run_lm_eval_and_agree(mode, tok, tasks_dir, tmp_path):
    import json
    import subprocess

    from trl_unlearn.evaluation.lm_eval import HarnessReport

    models = {"trained": tiny_llama(tok, hidden_size=16, num_hidden_layers=1, num_attention_heads=2),
              "stopped": constant_model(tok)}  # fmt: skip
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        TQDM_DISABLE="1",
        OMP_NUM_THREADS="1",
        CUDA_VISIBLE_DEVICES="",
        PYTHONFAULTHANDLER="1",  # a rank killed by a signal (SIGABRT) prints every thread's Python stack
        PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
    )
    for run, model in models.items():
        model.save_pretrained(tmp_path / run / "model")
        tok.save_pretrained(tmp_path / run / "model")
    proc = subprocess.run(LAUNCH[mode] + [__file__, str(tmp_path), str(tasks_dir)], env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    (tmp_path / "launch.log").write_text(proc.stdout + proc.stderr)  # the whole of both ranks' output
    assert proc.returncode == 0, f"{tmp_path / 'launch.log'}:\n" + (proc.stdout + proc.stderr)[-4000:]
    for run, model in models.items():
        out = tmp_path / run / "out"
        ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
        assert ranks[0]["world_size"] == 2 and ranks[0]["deepspeed"] == (mode == "zero3")
        assert ranks[0] == ranks[1]  # rank 0's numbers, the same stop decision
        assert (out / "report_rank0.json").exists()  # rank 1's: lm-eval 0.4.13 returns results on local rank 0 only
        history = ranks[0]["history"]
        if run == "stopped":  # 3/5 < 0.61 at the first probe after a step: every rank stops there
            assert ranks[0]["step"] == 1 and ranks[0]["stopped_at"] == 1
            assert [h["harness/toy_mc/acc"] for h in history] == pytest.approx([3 / 5, 3 / 5])
            continue
        assert [h["step"] for h in history] == [0, 1, 2, 3] and ranks[0]["stopped_at"] is None
        # the last probe is the saved model's evaluate_harness (ZeRO-3: parameters gathered for every forward)
        from transformers import AutoModelForCausalLM

        saved = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        fresh = harness(saved, tok, tasks_dir)
        last = HarnessReport.load(out / "report_rank0.json").per_item["toy_mc"]["loglikelihoods"]
        assert [x for d in last for x in d] == pytest.approx(
            [x for d in fresh.per_item["toy_mc"]["loglikelihoods"] for x in d], abs=1e-3
        )
        assert history[-1]["harness/toy_mc/acc"] == fresh.metrics["toy_mc/acc"]
        before = harness(model, tok, tasks_dir).per_item["toy_mc"]["loglikelihoods"]  # training moved them
        assert [x for d in last for x in d] != pytest.approx([x for d in before for x in d], abs=1e-3)


if __name__ == "__main__":  # a worker of test_distributed_ranks_run_lm_eval_and_agree
    _worker(*sys.argv[1:])
