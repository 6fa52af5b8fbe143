"""`UnlearningEvalCallback`: probe numbers logged at the right steps through the trainer's loggers, equal to a direct
`score_answers`; early stop on lost utility; model card summary; train mode and PEFT models."""

import numpy as np
import pytest
from conftest import QA, cpu_args
from transformers import TrainerCallback

from trl_unlearn import GradAscentConfig, GradAscentTrainer, SimNPOConfig, SimNPOTrainer
from trl_unlearn.evaluation.callback import UnlearningEvalCallback
from trl_unlearn.evaluation.scoring import score_answers

FORGET = [{"question": q, "answer": a, "paraphrased_answer": "ignored"} for q, a in QA[:4]]  # TOFU-layout rows
RETAIN = [(q, a) for q, a in QA[8:12]]  # plain pairs


def probability(model, tokenizer, pairs):
    res = score_answers(model, tokenizer, [q for q, _ in pairs], [a for _, a in pairs], prompt_format="plain")
    return float(np.exp(-res.avg_nll).mean())


class ModeSpy(TrainerCallback):
    """Records the model's train mode at every step end, after the probe callback (added after it)."""

    def __init__(self):
        self.modes = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.modes.append(model.training)


def make_trainer(model, tokenizer, forget_ds, retain_ds, tmp_path, cls=SimNPOTrainer, cfg=SimNPOConfig, **kw):
    return cls(
        model=model,
        args=cpu_args(cfg, tmp_path, **kw),
        forget_dataset=forget_ds,
        retain_dataset=retain_ds if cls is not GradAscentTrainer else None,
        processing_class=tokenizer,
    )


def probe_logs(trainer, key="probe/forget_probability"):
    return [h for h in trainer.state.log_history if key in h]


def test_logs_at_the_right_steps_and_match_direct_scoring(model, tokenizer, forget_ds, retain_ds, tmp_path):
    trainer = make_trainer(model, tokenizer, forget_ds, retain_ds, tmp_path, max_steps=5)
    probe = UnlearningEvalCallback(FORGET, RETAIN, eval_steps=2, prompt_format="plain").attach(trainer)
    spy = ModeSpy()
    trainer.add_callback(spy)
    initial = probability(model, tokenizer, [(r["question"], r["answer"]) for r in FORGET])
    trainer.train()

    logs = probe_logs(trainer)
    assert [h["step"] for h in logs] == [0, 2, 4, 5]  # train begin, every 2 steps, train end
    assert all("probe/retain_probability" in h and "probe/forget_rougeL_recall" not in h for h in logs)
    assert logs[0]["probe/forget_probability"] == pytest.approx(initial, rel=1e-6)
    # the last probe is the final model: equal to scoring it directly
    final_forget = probability(model, tokenizer, [(r["question"], r["answer"]) for r in FORGET])
    final_retain = probability(model, tokenizer, RETAIN)
    assert logs[-1]["probe/forget_probability"] == pytest.approx(final_forget, rel=1e-6)
    assert logs[-1]["probe/retain_probability"] == pytest.approx(final_retain, rel=1e-6)
    assert final_forget != pytest.approx(initial, rel=1e-3)  # training moved it, so the equality above means something
    assert [h["step"] for h in probe.history] == [0, 2, 4, 5]
    # the trainer's own step logs still carry its training metrics at every step (the probe did not flush them)
    train_logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in train_logs] == [1, 2, 3, 4, 5]
    assert all("forget/loss" in h and "retain/loss" in h for h in train_logs)
    # left in train mode at every step; summary for the model card
    assert spy.modes == [True] * 5 and model.training
    summary = trainer.evaluation_summary
    assert summary["probe/step"] == 5
    assert summary["probe/forget_probability"] == logs[-1]["probe/forget_probability"]
    assert probe.stopped_at is None and trainer.state.global_step == 5
    trainer.save_model()
    assert "probe/retain_probability" in (tmp_path / "out" / "README.md").read_text()


def test_absolute_threshold_stops_training(model, tokenizer, forget_ds, retain_ds, tmp_path):
    trainer = make_trainer(
        model, tokenizer, forget_ds, retain_ds, tmp_path, cls=GradAscentTrainer, cfg=GradAscentConfig, max_steps=8
    )
    trainer.evaluation_summary = {"forget_quality": 0.5}
    probe = UnlearningEvalCallback(
        FORGET,
        RETAIN,
        trainer=trainer,
        eval_steps=3,
        prompt_format="plain",
        eval_on_train_begin=False,
        min_retain_probability=1.01,
    )  # above any probability
    trainer.add_callback(probe)
    trainer.train()
    assert trainer.state.global_step == 3 and probe.stopped_at == 3
    logs = probe_logs(trainer)
    assert [h["step"] for h in logs] == [3]  # no begin probe; the end probe is skipped (step 3 was just probed)
    assert logs[0]["probe/early_stop"] == 1.0
    s = trainer.evaluation_summary
    assert s["probe/early_stopped_at_step"] == 3 and s["forget_quality"] == 0.5  # other keys are kept


@pytest.mark.parametrize("fraction,stops", [(1.5, True), (0.0, False)])
def test_relative_threshold(fraction, stops, model, tokenizer, forget_ds, retain_ds, tmp_path):
    trainer = make_trainer(model, tokenizer, forget_ds, retain_ds, tmp_path, max_steps=4)
    probe = UnlearningEvalCallback(
        FORGET,
        RETAIN,
        eval_steps=2,
        prompt_format="plain",
        eval_on_train_begin=False,
        eval_on_train_end=False,
        min_retain_probability=fraction,
        relative=True,
    )
    probe.attach(trainer)
    start = probability(model, tokenizer, RETAIN)
    trainer.train()
    # the baseline is measured at train begin even though eval_on_train_begin is off
    assert probe.baseline_retain_probability == pytest.approx(start, rel=1e-6)
    assert probe.history[0]["step"] == 0
    if stops:  # retain probability did not grow by 50% in 2 steps
        assert probe.history[1]["retain_probability"] < 1.5 * start
        assert trainer.state.global_step == 2 and probe.stopped_at == 2
    else:
        assert trainer.state.global_step == 4 and probe.stopped_at is None
        assert [h["step"] for h in probe_logs(trainer)] == [0, 2, 4]


def test_rouge_and_peft_model(model, tokenizer, forget_ds, retain_ds, tmp_path):
    from peft import LoraConfig

    trainer = SimNPOTrainer(
        model=model,
        args=cpu_args(SimNPOConfig, tmp_path, max_steps=2, learning_rate=1e-2),
        forget_dataset=forget_ds,
        retain_dataset=retain_ds,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    probe = UnlearningEvalCallback(
        FORGET[:2], None, eval_steps=1, rouge=True, max_new_tokens=6, prompt_format="plain"
    ).attach(trainer)
    trainer.train()
    logs = probe_logs(trainer)
    assert [h["step"] for h in logs] == [0, 1, 2]
    assert all("probe/forget_rougeL_recall" in h and "probe/retain_probability" not in h for h in logs)
    peft_model = trainer.model
    assert peft_model.training
    pairs = [(r["question"], r["answer"]) for r in FORGET[:2]]
    assert logs[-1]["probe/forget_probability"] == pytest.approx(probability(peft_model, tokenizer, pairs), rel=1e-6)
    with peft_model.disable_adapter():  # the adapters moved it: the probe scored the adapted model
        assert probability(peft_model, tokenizer, pairs) != pytest.approx(
            logs[-1]["probe/forget_probability"], rel=1e-4
        )
    assert probe.history[-1]["forget_rougeL_recall"] == logs[-1]["probe/forget_rougeL_recall"]


def test_without_trainer_reference_still_records(model, tokenizer, forget_ds, retain_ds, tmp_path):
    probe = UnlearningEvalCallback(None, RETAIN, eval_steps=2, prompt_format="plain", eval_on_train_begin=False)
    trainer = SimNPOTrainer(
        model=model,
        args=cpu_args(SimNPOConfig, tmp_path, max_steps=2),
        forget_dataset=forget_ds,
        retain_dataset=retain_ds,
        processing_class=tokenizer,
        callbacks=[probe],
    )
    with pytest.warns(UserWarning, match="attach"):
        trainer.train()
    assert [h["step"] for h in probe_logs(trainer, "probe/retain_probability")] == [2]
    assert trainer.evaluation_summary is None


def test_bad_arguments():
    with pytest.raises(ValueError, match="forget_rows and/or retain_rows"):
        UnlearningEvalCallback()
    with pytest.raises(ValueError, match="needs retain_rows"):
        UnlearningEvalCallback(FORGET, min_retain_probability=0.5)
    with pytest.raises(ValueError, match="'question' and 'answer'"):
        UnlearningEvalCallback([{"prompt": "x", "completion": "y"}])
    with pytest.raises(ValueError, match="eval_steps"):
        UnlearningEvalCallback(FORGET, eval_steps=0)
