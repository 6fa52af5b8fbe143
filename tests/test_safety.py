"""Nothing lost, nothing silently wrong (issue 22): refused runs leave every existing file byte-identical, saves are
atomic, a card never claims training that did not happen, and bad input gets one line naming the cause and the fix.
The table of these inputs and what each gets is docs/robustness.md."""

import hashlib
import json
import logging
import os

import pytest
from conftest import QA, cpu_args, prompt_completion
from datasets import Dataset
from transformers import TrainerCallback

from trl_unlearn import SimNPOConfig, SimNPOTrainer
from trl_unlearn.cli import main
from trl_unlearn.data.files import write_tofu_layout
from trl_unlearn.data.formats import PROMPT_TEMPLATE
from trl_unlearn.loading import PROMPT_FILE
from trl_unlearn.preemption import PreemptionCallback
from trl_unlearn.toy.synthetic import make_tofu_like
from trl_unlearn.toy.tiny import tiny_llama


def digest(folder) -> dict[str, str]:
    """sha256 of every file under `folder`, by relative path."""
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            out[os.path.relpath(path, folder)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory, tokenizer):
    """A saved tiny base model (with its tokenizer) and TOFU-layout data (10 authors x 4 questions)."""
    root = tmp_path_factory.mktemp("safety")
    model = tiny_llama(tokenizer, hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    tofu = write_tofu_layout(root / "tofu", make_tofu_like(num_authors=10, questions_per_author=4, seed=0))
    return {"base": str(root / "base"), "tofu": str(tofu), "root": root}


def cli(files, out, *extra):
    return main(["simnpo", "--model_name_or_path", files["base"], "--dataset_name", files["tofu"], "--output_dir",
                 str(out), "--max_steps", "2", "--per_device_train_batch_size", "2", "--use_cpu", "true", "--bf16",
                 "false", "--report_to", "none", "--activation_checkpointing", "false", "--save_strategy", "no",
                 "--learning_rate", "1e-3", "--disable_tqdm", "true", *extra])  # fmt: skip


def trainer_for(model, tokenizer, tmp_path, forget=None, retain=None, **kw):
    return SimNPOTrainer(model=model, args=cpu_args(SimNPOConfig, tmp_path, **kw),
                         forget_dataset=forget if forget is not None else prompt_completion(QA[:8]),
                         retain_dataset=retain if retain is not None else prompt_completion(QA[8:16]),
                         processing_class=tokenizer)  # fmt: skip


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("trl-unlearn: error:"), err
    return err[0]


# ------------------------------------------------------------------------------------------- configuration --
@pytest.mark.parametrize("field,value,match", [
    ("beta", "4.5", r"`beta` must be a number, got '4.5' \(str\): pass `beta=4.5`"),
    ("beta", float("nan"), "`beta` is nan: it must be a finite number"),
    ("beta", float("inf"), "`beta` is inf"),
    ("gamma", float("nan"), "`gamma` is nan"),
    ("forget_weight", float("nan"), "`forget_weight` is nan"),
    ("retain_weight", True, "`retain_weight` must be a number, got True"),
    ("learning_rate", float("inf"), "`learning_rate` is inf"),
    ("max_grad_norm", float("nan"), "`max_grad_norm` is nan"),
    ("learning_rate", -1e-5, "`learning_rate` must be >= 0, got -1e-05"),
    ("num_train_epochs", 0, "no optimizer step would be taken"),
])  # fmt: skip
def test_config_refuses_meaningless_numbers_naming_the_field(field, value, match, tmp_path):
    kw = {field: value} if field != "num_train_epochs" else {field: value, "max_steps": -1}
    with pytest.raises(ValueError, match=match):
        cpu_args(SimNPOConfig, tmp_path, **kw)


def test_settings_that_do_nothing_warn(model, tokenizer, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        trainer = trainer_for(model, tokenizer, tmp_path, gamma=1e9, enable_jit_checkpoint=True,
                              precompute_ref_log_probs=True)  # fmt: skip
    assert "`gamma=1000000000.0` > 20.0: the sigmoid saturates" in caplog.text
    assert "`enable_jit_checkpoint` is not used" in caplog.text and trainer.args.enable_jit_checkpoint is False
    assert "`precompute_ref_log_probs=True` does nothing for SimNPO" in caplog.text


# ------------------------------------------------------------------------------------------------------ data --
def test_blank_completions_are_dropped_by_name_and_all_blank_is_an_error(model, tokenizer, tmp_path, caplog):
    rows = prompt_completion(QA[:8]).to_dict()
    rows["completion"][2], rows["completion"][5] = "", "  \n"
    with caplog.at_level(logging.WARNING):
        trainer = trainer_for(model, tokenizer, tmp_path, forget=Dataset.from_dict(rows))
    assert len(trainer.train_dataset.forget) == 6  # 8 rows, 2 blank
    assert "Dropped 2 of 8 forget rows with an empty or whitespace-only `completion` (rows 2, 5)" in caplog.text
    rows["completion"] = [" "] * 8
    with pytest.raises(ValueError, match="Every forget row has an empty or whitespace-only `completion`"):
        trainer_for(model, tokenizer, tmp_path, forget=Dataset.from_dict(rows))


def test_forget_rows_that_are_retain_rows(model, tokenizer, tmp_path, caplog):
    with pytest.raises(ValueError, match=r"Every forget row is also a retain row \(8 of 8\)"):
        trainer_for(model, tokenizer, tmp_path, forget=prompt_completion(QA[:8]), retain=prompt_completion(QA[:8]))
    with caplog.at_level(logging.WARNING):
        trainer_for(model, tokenizer, tmp_path, forget=prompt_completion(QA[:8]), retain=prompt_completion(QA[5:16]))
    assert "3 of 8 forget rows are also retain rows (forget rows 5, 6, 7)" in caplog.text  # QA[5:8] in both


def test_tokenizer_larger_than_the_embedding_is_refused_before_training(model, tokenizer, tmp_path):
    model.resize_token_embeddings(100)  # the tokenizer has 320 tokens; the QA rows use ids above 100
    with pytest.raises(ValueError, match=r"input embedding has 100 rows \(tokenizer size 320\).*own tokenizer"):
        trainer_for(model, tokenizer, tmp_path)


# ------------------------------------------------------------------------------------------- output folder --
def test_output_dir_that_is_the_model_folder_is_refused_and_untouched(files, tokenizer, tmp_path, capsys):
    before = digest(files["base"])
    with pytest.raises(ValueError, match="is the folder of `model` being read"):
        SimNPOTrainer(model=files["base"], args=cpu_args(SimNPOConfig, tmp_path, output_dir=files["base"]),
                      forget_dataset=prompt_completion(QA[:8]), retain_dataset=prompt_completion(QA[8:16]),
                      processing_class=tokenizer)  # fmt: skip
    assert cli(files, files["base"]) == 2
    assert "is the folder of `--model_name_or_path` being read" in one_line_error(capsys)
    assert digest(files["base"]) == before


def test_output_dir_that_is_a_file_or_unwritable(files, tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert cli(files, tmp_path / "f") == 2
    assert "is a file, not a folder: give a folder path" in one_line_error(capsys)
    assert cli(files, tmp_path / "f" / "out") == 2
    assert f"is inside a file ({tmp_path / 'f'}), not a folder" in one_line_error(capsys)
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere: the permission check cannot be exercised")
    (tmp_path / "ro").mkdir(mode=0o500)
    assert cli(files, tmp_path / "ro" / "out") == 2
    assert "is not writable" in one_line_error(capsys)


def test_trained_output_dir_is_refused_then_overwritten_on_request(files, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli(files, out) == 0
    (out / "checkpoint-6").mkdir()  # a stale checkpoint of that earlier run
    before = digest(out)
    assert cli(files, out) == 2
    assert "already holds a trained model or checkpoints (model.safetensors, checkpoint-6)" in one_line_error(capsys)
    assert digest(out) == before
    assert cli(files, out, "--overwrite_output_dir", "true", "--seed", "1") == 0
    assert not (out / "checkpoint-6").exists()
    assert digest(out)["model.safetensors"] != before["model.safetensors"]  # the new run's weights


def test_an_interrupted_save_leaves_the_previous_model_intact(model, tokenizer, tmp_path):
    trainer = trainer_for(model, tokenizer, tmp_path, max_steps=1)
    trainer.train()
    trainer.save_model()
    before = digest(tmp_path / "out")

    def interrupted(folder, **kwargs):  # half a weights file, then the process is stopped
        with open(os.path.join(folder, "model.safetensors"), "wb") as f:
            f.write(b"\0" * 100)
        raise KeyboardInterrupt

    model.save_pretrained = interrupted
    with pytest.raises(KeyboardInterrupt):
        trainer.save_model()
    after = digest(tmp_path / "out")
    assert {k: v for k, v in after.items() if not k.startswith(".trl-unlearn-saving")} == before


def test_saving_over_another_model_needs_overwrite(model, tokenizer, files, tmp_path):
    trainer = trainer_for(model, tokenizer, tmp_path, max_steps=1)
    trainer.train()
    other = tmp_path / "other"
    os.makedirs(other)
    (other / "model.safetensors").write_bytes(open(os.path.join(files["base"], "model.safetensors"), "rb").read())
    before = digest(other)
    with pytest.raises(ValueError, match="already holds a model .* `overwrite_output_dir=True`"):
        trainer.save_model(str(other))
    assert digest(other) == before


# ------------------------------------------------------------------------------------------ honest training --
def test_no_step_no_save(model, tokenizer, tmp_path):
    trainer = trainer_for(model, tokenizer, tmp_path)
    with pytest.raises(ValueError, match="no optimizer step was taken, so the model is the base model"):
        trainer.save_model()
    assert digest(tmp_path / "out") == {}  # the trainer made the folder; nothing was written into it


class StopAtStep(TrainerCallback):
    """Stops training at `step`, as UnlearningEvalCallback does (`stopped_at`)."""

    def __init__(self, step):
        self.step, self.stopped_at = step, None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop, self.stopped_at = True, state.global_step


def test_early_stop_card_says_where_and_why(model, tokenizer, tmp_path):
    trainer = trainer_for(model, tokenizer, tmp_path, max_steps=3)
    trainer.add_callback(StopAtStep(1))
    trainer.train()
    assert trainer.stop_reason.startswith("stopped early by StopAtStep")
    trainer.save_model()
    card = (tmp_path / "out" / "README.md").read_text()
    assert "- Training: stopped at optimizer step 1 of 3: stopped early by StopAtStep" in card


def test_sigterm_exits_143_with_a_checkpoint_card_and_no_final_model(files, tmp_path, capsys, monkeypatch):
    step_end = PreemptionCallback.on_step_end

    def sigterm_during_step_1(self, args, state, control, **kwargs):
        self.requested = True  # what the SIGTERM handler sets
        return step_end(self, args, state, control, **kwargs)

    monkeypatch.setattr(PreemptionCallback, "on_step_end", sigterm_during_step_1)
    out = tmp_path / "out"
    assert cli(files, out, "--max_steps", "3") == 143
    assert "stopped by SIGTERM at step 1 of 3" in capsys.readouterr().err
    assert not (out / "model.safetensors").exists()
    card = (out / "checkpoint-1" / "README.md").read_text()
    assert "- Training: stopped at optimizer step 1 of 3: SIGTERM" in card


# --------------------------------------------------------------------------------------------------- cards --
def test_python_save_records_prompt_format_base_model_and_readable_settings(files, tokenizer, tmp_path):
    trainer = SimNPOTrainer(model=files["base"], args=cpu_args(SimNPOConfig, tmp_path, max_steps=1),
                            forget_dataset=prompt_completion(QA[:8]), retain_dataset=prompt_completion(QA[8:16]),
                            processing_class=tokenizer)  # fmt: skip
    trainer.train()
    trainer.evaluation_summary = {"forget_quality": 0.25, "model_utility": 0.5}
    trainer.save_model()
    out = tmp_path / "out"
    assert json.loads((out / PROMPT_FILE).read_text()) == {"prompt_format": PROMPT_TEMPLATE}
    card = (out / "README.md").read_text()
    for needle in [f"- Base model: `{files['base']}`", "| `lr_scheduler_type` | linear |",
                   "- Training: completed: 1 of 1 optimizer steps", "- forget_quality: 0.25 (better: higher)",
                   "- Prompt format: `'Question: {question}\\nAnswer:'`"]:  # fmt: skip
        assert needle in card, needle
    assert "SchedulerType" not in card and "unknown" not in card
    assert "`num_train_epochs`" not in card  # `max_steps=1` overrides it


def test_in_memory_model_card_says_so(model, tokenizer, tmp_path):
    trainer = trainer_for(model, tokenizer, tmp_path, max_steps=1)
    trainer.train()
    trainer.save_model()
    assert "an in-memory model (not loaded from a folder or the Hub" in (tmp_path / "out" / "README.md").read_text()


# ---------------------------------------------------------------------------------------- one-line errors --
def test_truncated_weights_name_the_file(files, tmp_path, capsys):
    broken = tmp_path / "broken"
    os.makedirs(broken)
    for name in os.listdir(files["base"]):
        data = open(os.path.join(files["base"], name), "rb").read()
        (broken / name).write_bytes(data[: len(data) // 2] if name == "model.safetensors" else data)
    assert main(["simnpo", "--model_name_or_path", str(broken), "--dataset_name", files["tofu"], "--output_dir",
                 str(tmp_path / "out")]) == 2  # fmt: skip
    line = one_line_error(capsys)
    assert f"The model weights {broken}/model.safetensors are corrupt (truncated" in line


def test_resume_from_a_corrupt_checkpoint_names_the_previous_one(model, tokenizer, tmp_path):
    trainer = trainer_for(model, tokenizer, tmp_path, max_steps=2, save_strategy="steps", save_steps=1)
    trainer.train()
    weights = tmp_path / "out" / "checkpoint-2" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(
        ValueError,
        match=r"checkpoint-2/model.safetensors are corrupt \(truncated.*resume from the "
        r"previous checkpoint, .*checkpoint-1, instead",
    ):
        trainer.train(resume_from_checkpoint="true")


def test_resume_true_as_a_string(model, tokenizer, tmp_path):
    trainer = trainer_for(model, tokenizer, tmp_path, max_steps=2, save_strategy="steps", save_steps=1)
    with pytest.raises(ValueError, match="`resume_from_checkpoint=True` but .* holds no `checkpoint-N` folder"):
        trainer.train(resume_from_checkpoint="true")
    trainer.train()
    trainer.args.max_steps = 3
    trainer.train(resume_from_checkpoint="true")  # the command line's `--resume_from_checkpoint true`
    assert trainer.state.global_step == 3


def test_malformed_yaml_names_file_line_and_column(files, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("beta: 2.5\nlearning_rate: [1e-5\nseed: 3\n")
    assert main(["simnpo", "--config", str(recipe)]) == 2
    line = one_line_error(capsys)
    assert f"{recipe}:3:5: malformed YAML" in line


def test_misleading_messages_fixed(files, tmp_path, capsys):
    assert cli(files, tmp_path / "o", "--forget_split", "forget07") == 2
    line = one_line_error(capsys)
    assert "forget07.json" in line and "retain_split" not in line  # the split that is wrong, not the retain flag
    write_tofu_layout(tmp_path / "d", {"forget07": make_tofu_like(4, 2)["forget10"]})
    assert main(["simnpo", "--model_name_or_path", files["base"], "--dataset_name", str(tmp_path / "d"),
                 "--forget_split", "forget07", "--output_dir", str(tmp_path / "o")]) == 2  # fmt: skip
    assert "only for TOFU's forget splits (forget01, forget05, forget10)" in one_line_error(capsys)
    no_tokenizer = tmp_path / "weights_only"
    os.makedirs(no_tokenizer)
    for name in ("config.json", "model.safetensors"):
        (no_tokenizer / name).write_bytes(open(os.path.join(files["base"], name), "rb").read())
    assert main(["eval", "tofu", "--model", str(no_tokenizer), "--data_dir", files["tofu"], "--output",
                 str(tmp_path / "r.json")]) == 2  # fmt: skip
    assert "holds no tokenizer" in (line := one_line_error(capsys)) and "`--tokenizer`" in line


def test_help_lists_config_first_then_common_flags_then_all(capsys):
    with pytest.raises(SystemExit):
        main(["simnpo", "--help"])
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert lines[0] == "usage: trl-unlearn simnpo [--config RECIPE.yaml] [--FLAG VALUE ...]"
    order = [text.index(s) for s in ("--config RECIPE.yaml  YAML", "--model_name_or_path", "--output_dir",
                                     "--overwrite_output_dir", "--beta", "--adam_beta1")]  # fmt: skip
    assert order == sorted(order)  # --config, then common flags, then the rest (every flag is still listed)


def test_eval_card_names_the_data_directions_and_reference(files, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli(files, out) == 0
    common = ["--data_dir", files["tofu"], "--split", "forget10", "--batch_size", "8", "--max_new_tokens", "4",
              "--no_progress"]  # fmt: skip
    reference = tmp_path / "retain.json"
    assert main(["eval", "tofu", "--model", files["base"], "--output", str(reference), *common]) == 0
    assert main(["eval", "tofu", "--model", str(out), "--output", str(tmp_path / "r.json"), "--retain_report",
                 str(reference), *common]) == 2  # fmt: skip
    assert "pass --prompt_format 'chat'" in one_line_error(capsys)  # the trained model records the plain format
    assert main(["eval", "tofu", "--model", files["base"], "--output", str(reference), "--prompt_format", "plain",
                 *common]) == 0  # fmt: skip
    assert main(["eval", "tofu", "--model", str(out), "--output", str(tmp_path / "r.json"), "--retain_report",
                 str(reference), "--update_model_card", *common]) == 0  # fmt: skip
    card = (out / "README.md").read_text()
    assert f"On {files['tofu']} (forget10), TOFU evaluation:" in card  # the folder evaluated, not "TOFU forget10"
    assert "- model_utility: " in card and "(better: higher)" in card
    assert f"Reference (retain / retrained model) behind forget quality / PrivLeak: {reference}" in card


def test_output_dir_holding_a_checkpoint_being_read_is_refused(tmp_path):
    from trl_unlearn.outputs import check_output_dir

    (tmp_path / "run" / "checkpoint-500").mkdir(parents=True)
    with pytest.raises(ValueError, match="as a checkpoint, which checkpoint rotation or `overwrite_output_dir` would"):
        check_output_dir(str(tmp_path / "run"), {"model": str(tmp_path / "run" / "checkpoint-500")})
    check_output_dir(str(tmp_path / "elsewhere"), {"model": str(tmp_path / "run" / "checkpoint-500")})  # allowed


def test_replace_files_removes_the_previous_models_extra_shards(tmp_path):
    from trl_unlearn.outputs import replace_files, staging_dir

    out = tmp_path / "out"
    out.mkdir()
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json",
                 "report.json"):  # fmt: skip
        (out / name).write_text("old")
    staging = staging_dir(str(out))
    for name in ("model.safetensors", "config.json"):
        (tmp_path / "out" / ".trl-unlearn-saving" / name).write_text("new")
    assert replace_files(staging, str(out)) == ["config.json", "model.safetensors"]  # weights moved last
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "report.json"]  # the user's file stays


def test_exit_codes_of_stopped_runs(capsys):
    from types import SimpleNamespace

    from trl_unlearn.cli.train import exit_code

    def run(preempted_at, stop_reason):
        return SimpleNamespace(preempted_at=preempted_at, stop_reason=stop_reason, args=SimpleNamespace(output_dir="o"),
                               state=SimpleNamespace(max_steps=9), is_world_process_zero=lambda: True,
                               card_data={"training": f"stopped at optimizer step 4 of 9: {stop_reason}"})  # fmt: skip

    assert exit_code(run(None, None)) == 0
    assert exit_code(run(None, "stopped early by UnlearningEvalCallback")) == 3
    assert "stopped at optimizer step 4 of 9: stopped early by UnlearningEvalCallback" in capsys.readouterr().err
    assert exit_code(run(4, "SIGTERM (preempted or cancelled)")) == 143
    assert "checkpoint o/checkpoint-4 saved, no final model" in capsys.readouterr().err
