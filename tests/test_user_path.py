"""A new user's path: every shipped recipe through `trl-unlearn <method> --config`, evaluation with the training
prompt format, the model card, CPU fallback, and the errors a user meets first."""

import glob
import json
import logging
import os
import re
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import QA, cpu_args, prompt_completion
from datasets import Dataset
from huggingface_hub import ModelCard

from trl_unlearn import NPOConfig, NPOTrainer, SimNPOConfig, SimNPOTrainer
from trl_unlearn.cli import main
from trl_unlearn.data.files import write_tofu_layout
from trl_unlearn.toy.synthetic import make_tofu_like
from trl_unlearn.toy.tiny import tiny_llama

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(glob.glob(os.path.join(ROOT, "examples", "recipes", "*.yaml")))


@pytest.fixture(scope="module")
def files(tmp_path_factory, tokenizer):
    """Tiny saved models (with a chat template; one 8 layers deep for RMU's layer 7), TOFU-layout files, a MUSE-layout
    corpus folder, and two JSON-lines corpus folders standing in for WMDP's forget corpus and WikiText."""
    root = tmp_path_factory.mktemp("user")
    for name, layers in (("model", 2), ("model8", 8)):
        model = tiny_llama(
            tokenizer, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, max_position_embeddings=2048
        )
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    tofu = write_tofu_layout(root / "tofu", make_tofu_like(num_authors=10, questions_per_author=4, seed=0))
    (root / "muse" / "raw").mkdir(parents=True)
    for name, rows in (("forget", QA[:6]), ("retain1", QA[6:12])):
        docs = [f"{q} {a}" for q, a in rows]
        (root / "muse" / "raw" / f"{name}.txt").write_text("\n\n".join(docs))
    for folder, split, rows in (("wmdp_forget", "train", QA[12:20]), ("wmdp_retain", "test", QA[20:28])):
        (root / folder).mkdir()
        docs = [""] + [f"{q} {a} {q} {a}" for q, a in rows]  # WikiText has empty rows; > 50 characters each
        (root / folder / f"{split}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return {
        "model": str(root / "model"),
        "model8": str(root / "model8"),
        "tofu": str(tofu),
        "muse": str(root / "muse"),
        "wmdp_forget": str(root / "wmdp_forget"),
        "wmdp_retain": str(root / "wmdp_retain"),
        "root": root,
    }


@pytest.mark.parametrize("recipe", RECIPES, ids=os.path.basename)
def test_every_recipe_runs_through_the_cli(recipe, files, tmp_path):
    """Only the model, the data, the output, the step count and the dtype are overridden."""
    config = yaml.safe_load(open(recipe))
    name = os.path.basename(recipe)
    if name.startswith("wmdp"):  # forget and retain text from two datasets
        data = ["--dataset_name", files["wmdp_forget"], "--retain_dataset_name", files["wmdp_retain"]]
    else:
        data = ["--dataset_name", files["muse"] if name.startswith("muse") else files["tofu"]]
    model = files["model8"] if config.get("layer_id", 0) >= 2 else files["model"]
    out = tmp_path / "out"
    code = main(
        [
            config["methods"],
            "--config",
            recipe,
            "--model_name_or_path",
            model,
            *data,
            "--output_dir",
            str(out),
            "--max_steps",
            "1",
            "--dtype",
            "float32",
        ]
    )
    assert code == 0
    assert (out / "README.md").is_file()
    assert (out / "adapter_config.json").is_file() or (out / "model.safetensors").is_file()


def test_cli_card_names_base_model_data_method_and_settings_then_eval_adds_results(files, tmp_path, caplog):
    out = tmp_path / "out"
    assert (
        main(
            [
                "simnpo",
                "--model_name_or_path",
                files["model"],
                "--dataset_name",
                files["tofu"],
                "--forget_split",
                "forget10",
                "--output_dir",
                str(out),
                "--max_steps",
                "1",
                "--beta",
                "3.5",
                "--report_to",
                "none",
            ]
        )
        == 0
    )
    card = ModelCard.load(out / "README.md")
    text = card.text
    assert files["model"] in text and "None" not in text.split("## Unlearning")[0]
    assert f"{files['tofu']} (forget10)" in text and f"{files['tofu']} (retain90)" in text
    assert "SimNPO" in text and "`beta` | 3.5" in text and "2410.07163" in text
    assert {"trl", "trl-unlearn", "unlearning", "simnpo"} <= set(card.data.tags)
    assert card.data.base_model is None  # a local folder is no Hub id
    # the training prompt format travels with the model ...
    assert json.load(open(out / "unlearning_prompt.json")) == {"prompt_format": "Question: {question}\nAnswer:"}
    # ... so eval scores with it although the tokenizer has a chat template (auto would pick the template)
    report = tmp_path / "report.json"
    assert (
        main(
            [
                "eval",
                "tofu",
                "--model",
                str(out),
                "--data_dir",
                files["tofu"],
                "--split",
                "forget10",
                "--output",
                str(report),
                "--max_new_tokens",
                "4",
                "--device",
                "cpu",
                "--no_progress",
                "--update_model_card",
            ]
        )
        == 0
    )
    saved = json.load(open(report))
    assert saved["settings"]["prompt_format"] == "Question: {question}\nAnswer:"
    card = ModelCard.load(out / "README.md")
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert results["model_utility"] == pytest.approx(saved["metrics"]["model_utility"])
    assert "model_utility" in card.text and "No evaluation was recorded" not in card.text
    # another format than the recorded one: a loud warning
    with caplog.at_level(logging.WARNING):
        assert (
            main(
                [
                    "eval",
                    "tofu",
                    "--model",
                    str(out),
                    "--data_dir",
                    files["tofu"],
                    "--split",
                    "forget10",
                    "--output",
                    str(tmp_path / "r2.json"),
                    "--max_new_tokens",
                    "4",
                    "--device",
                    "cpu",
                    "--no_progress",
                    "--prompt_format",
                    "chat",
                ]
            )
            == 0
        )
    assert "differs from the format this model was trained with" in caplog.text


def test_recipe_keys_for_another_method_or_unknown_are_errors(files, tmp_path, capsys):
    recipe = os.path.join(ROOT, "examples", "recipes", "tofu_forget10_npo.yaml")
    assert main(["simnpo", "--config", recipe, "--model_name_or_path", files["model"]]) == 2
    assert "methods: npo" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("beta: 3.0\nnot_a_key: 1\n")
    assert main(["simnpo", "--config", str(bad)]) == 2
    assert "not_a_key" in capsys.readouterr().err


def test_npo_explicit_reference_with_precomputed_logps(model, tokenizer, forget_ds, retain_ds, tmp_path):
    ref = tiny_llama(tokenizer, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, seed=7)
    args = cpu_args(NPOConfig, tmp_path, precompute_ref_log_probs=True, max_steps=1)
    trainer = NPOTrainer(
        model, ref_model=ref, args=args, forget_dataset=forget_ds, retain_dataset=retain_ds, processing_class=tokenizer
    )
    assert trainer.precompute_forget_ref and args.precompute_ref_log_probs is True  # the user's config unchanged
    rows = trainer.train_dataset.forget
    batch = trainer.data_collator([{"forget": rows[i], "retain": None} for i in range(len(rows))])
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    with torch.no_grad():
        logits = ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    target = labels[:, 1:]
    expected = logits.log_softmax(-1).gather(-1, target.clamp(min=0)[..., None]).squeeze(-1) * (target != -100)
    torch.testing.assert_close(torch.tensor(rows["ref_logps"]), expected.sum(-1), rtol=1e-5, atol=1e-4)
    trainer.train()


def test_users_config_is_not_modified(model, tokenizer, forget_ds, retain_ds, tmp_path):
    args = cpu_args(NPOConfig, tmp_path)
    NPOTrainer(model, args=args, forget_dataset=forget_ds, retain_dataset=retain_ds, processing_class=tokenizer)
    assert args.precompute_ref_log_probs is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="the fallback is for machines without a GPU")
def test_quick_start_config_runs_on_cpu(caplog):
    with caplog.at_level(logging.WARNING):
        args = SimNPOConfig(output_dir="out", beta=4.5, forget_weight=0.125, retain_loss_type="nll")
    assert args.bf16 is False and "No GPU found" in caplog.text
    explicit = SimNPOConfig(output_dir="out", bf16=True)  # a recipe's `bf16: true`
    assert explicit.bf16 is False


@pytest.mark.parametrize(
    "field,value",
    [
        ("loss_type", ["ipo"]),
        ("label_smoothing", 0.1),
        ("use_weighting", True),
        ("padding_free", True),
        ("sync_ref_model", True),
    ],
)
def test_dpo_only_fields_are_rejected(field, value, tmp_path):
    with pytest.raises(ValueError, match=f"`{field}`: DPO-only"):
        cpu_args(SimNPOConfig, tmp_path, **{field: value})


def test_dpo_only_fields_are_hidden_from_cli_help(capsys):
    with pytest.raises(SystemExit):
        main(["simnpo", "--help"])
    help_text = capsys.readouterr().out
    assert "usage: trl-unlearn simnpo" in help_text and "--forget_weight" in help_text
    for hidden in ("--label_smoothing", "--loss_type", "--use_weighting", "--discopop_tau"):
        assert re.search(rf"{hidden}[\s\]]", help_text) is None, hidden


def test_unused_data_and_negative_gamma_warn(model, tokenizer, forget_ds, retain_ds, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        SimNPOTrainer(
            model,
            args=cpu_args(SimNPOConfig, tmp_path, retain_weight=0.0),
            forget_dataset=forget_ds,
            retain_dataset=retain_ds,
            processing_class=tokenizer,
        )
        pref = Dataset.from_dict(
            {"prompt": ["Question: a?\nAnswer:"] * 4, "chosen": [" yes"] * 4, "rejected": [" no"] * 4}
        )
        SimNPOTrainer(
            model,
            args=cpu_args(SimNPOConfig, tmp_path),
            train_dataset=pref,
            retain_dataset=retain_ds,
            processing_class=tokenizer,
        )
        cpu_args(SimNPOConfig, tmp_path, gamma=-1.0)
    assert "the 24 retain examples are not used" in caplog.text
    assert "its 4 `chosen`" in caplog.text and "NOT used" in caplog.text
    assert "gamma=-1.0" in caplog.text


@pytest.mark.parametrize(
    "forget,error,match",
    [
        (Dataset.from_dict({"prompt": ["Q: a?"], "completion": [3]}), TypeError, r"`completion` is 3 \(int\)"),
        (Dataset.from_dict({"prompt": [None], "completion": [" x"]}), TypeError, r"`prompt` is None"),
        ([{"prompt": "Q: a?", "completion": " x"}], TypeError, r"not a `datasets.Dataset`: wrap it"),
    ],
)
def test_bad_rows_are_named(forget, error, match, model, tokenizer, retain_ds, tmp_path):
    with pytest.raises(error, match=match):
        SimNPOTrainer(
            model,
            args=cpu_args(SimNPOConfig, tmp_path),
            forget_dataset=forget,
            retain_dataset=retain_ds,
            processing_class=tokenizer,
        )


def test_conversational_data_needs_a_chat_template(model, tokenizer, tmp_path):
    no_template = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, eos_token="</s>", pad_token="<pad>")
    conv = prompt_completion(QA[:4], conversational=True)
    with pytest.raises(ValueError, match="no chat template"):
        SimNPOTrainer(
            model,
            args=cpu_args(SimNPOConfig, tmp_path, retain_weight=0.0),
            forget_dataset=conv,
            processing_class=no_template,
        )


def test_missing_model_path_is_one_clean_line(files, capsys):
    assert main(["simnpo", "--model_name_or_path", "/no/such/model", "--dataset_name", files["tofu"]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("trl-unlearn: error: The model '/no/such/model' is not an existing folder")
    assert len(err) == 1 and "Traceback" not in err[0]


def test_help_imports_nothing_heavy():
    code = (
        "import sys\nfrom trl_unlearn.cli import build_parser\nbuild_parser().format_help()\n"
        "print(sorted(m for m in ('torch', 'transformers', 'trl', 'datasets', 'lm_eval') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_readme_quick_start_runs_as_written_on_cpu(files, tmp_path, monkeypatch):
    """The README's Python quick start, with only the model and data paths filled in (and no Hub push)."""
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = readme.split("## Quick start (drop-in)", 1)[1]
    code = section.split("```python", 1)[1].split("```", 1)[0]
    data = tmp_path / "tofu"
    data.mkdir()
    for split in ("forget10", "retain90"):
        rows = [json.loads(line) for line in open(os.path.join(files["tofu"], f"{split}.json"))][:8]
        (data / f"{split}.json").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert "path/or/hub-id-of-your-finetuned-model" in code and "trainer.push_to_hub()" in code
    code = code.replace("path/or/hub-id-of-your-finetuned-model", files["model"]).replace("trainer.push_to_hub()", "")
    code = code.replace('"tofu/', f'"{data}/')
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, "README quick start", "exec"), namespace)
    trainer = namespace["trainer"]
    assert trainer.state.global_step > 0 and (torch.cuda.is_available() or trainer.args.bf16 is False)
    assert (tmp_path / "out" / "README.md").is_file()


def test_checkpointing_flag_old_and_new_names(tmp_path):
    """TRL scripts and recipes say `gradient_checkpointing`; transformers 5 calls it `activation_checkpointing` and
    warns about the old name. Both names work, the default (TRL's: on) comes without a warning."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        assert SimNPOConfig(output_dir=str(tmp_path), use_cpu=True).activation_checkpointing is True
        off = SimNPOConfig(output_dir=str(tmp_path), use_cpu=True, gradient_checkpointing=False)
    assert off.activation_checkpointing is False and off.gradient_checkpointing is False
    assert (
        SimNPOConfig(output_dir=str(tmp_path), use_cpu=True, activation_checkpointing=False).gradient_checkpointing
        is False
    )
