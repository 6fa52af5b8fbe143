"""The examples, recipes and the training CLI, end to end at tiny sizes."""

import glob
import importlib.util
import json
import os
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


sys.path.insert(0, os.path.join(ROOT, "examples"))
from study import method_config  # noqa: E402


def load_example(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "examples", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("recipe", sorted(glob.glob(os.path.join(ROOT, "examples", "recipes", "*.yaml"))))
def test_recipes_parse(recipe, monkeypatch):
    """Every recipe is valid for its script's parser: no unknown or mistyped key."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    name = os.path.basename(recipe)
    if name.startswith("wmdp"):  # training-command recipes (no example script): the CLI's parser
        from trl_unlearn.cli.train import make_parser, parse

        method = name[len("wmdp_") : -len(".yaml")]
        args, config, model_args = parse(make_parser(method), method, ["--config", recipe])
        assert args.retain_dataset_name != args.dataset_name and args.text_rows == "documents"
        assert config.max_length == 512 and model_args.model_name_or_path == "HuggingFaceH4/zephyr-7b-beta"
        return
    method = next((m for m in ("undial", "ceu", "pdu") if name.endswith(f"_{m}.yaml")), None)
    if method:  # training-command recipes of methods whose own settings the example studies don't carry
        from trl_unlearn.cli.train import make_parser, parse

        args, config, model_args = parse(make_parser(method), method, ["--config", recipe])
        assert (
            args.forget_split in name
            and config.num_train_epochs == 10
            and type(config).__name__.lower().startswith(method)
        )
        return
    example = load_example("tofu" if name.startswith("tofu") else "muse")
    if name.startswith("tofu"):
        args, config, model_args = example.parse(["--config", recipe, "--use_cpu", "true", "--bf16", "false"])
        assert args.forget_split in name and args.methods in name
        assert config.learning_rate in (1e-5, 1e-4) and config.num_train_epochs == 10
        retain = method_config(args.methods, config, "out", args.npo_beta)
        assert retain.retain_weight == (0.1 if args.methods == "satimp" else 1.0)  # SatImp's published α
        assert args.methods != "simnpo" or retain.beta in (2.5, 4.5)
    else:
        from trl import ModelConfig, TrlParser

        from trl_unlearn import SimNPOConfig

        parser = TrlParser((example.MuseArguments, SimNPOConfig, ModelConfig))
        args, config, model_args = parser.parse_args_and_config(
            ["--config", recipe, "--use_cpu", "true", "--bf16", "false"]
        )
        assert config.max_length == 2048 and config.retain_weight == 0.1
    assert model_args.model_name_or_path


def test_tofu_example_embedded_study_runs(tmp_path, capsys):
    """The default study at toy size: three trained models (the ceiling's second Retrain), a tune per method with
    the same budget, the selected settings reported on two fresh seeds, a results table, the trials and a plot."""
    example = load_example("tofu")
    argv = [
        "--output_dir",
        str(tmp_path),
        "--num_authors",
        "4",
        "--finetune_epochs",
        "1",
        "--max_steps",
        "1",
        "--max_new_tokens",
        "8",
        "--n_trials",
        "2",
        "--report_seeds",
        "1,2",
    ]
    results = example.main(*example.parse(argv))
    assert list(results) == ["Retrain", "Retrain, seed 1", "Original", "NPO", "SimNPO"]
    for metrics in results.values():
        assert 0.0 <= metrics["model_utility"] <= 1.0 and metrics["forget_quality"] is not None
        assert 0.0 <= metrics["ks_d"] <= 1.0
    assert results["Retrain"]["forget_quality"] == pytest.approx(1.0)  # identical truth ratios: KS p-value 1
    for name, method in (("NPO", "npo"), ("SimNPO", "simnpo")):
        assert [s["seed"] for s in results[name]["per_seed"]] == [1, 2]  # report seeds, not the tuning seed 0
        tuning = json.load(open(tmp_path / f"tune_{method}" / "tuning.json"))
        assert len(tuning["trials"]) == 2 and tuning["tuning_seeds"] == [0]
        assert results[name]["setting"] == tuning["selected"]["config"]
        assert (tmp_path / f"tune_{method}" / "best.yaml").is_file()
    trials = json.load(open(tmp_path / "trials.json"))
    assert [t["method"] for t in trials["trials"]] == ["NPO", "NPO", "SimNPO", "SimNPO"]
    saved = json.load(open(tmp_path / "results.json"))
    assert saved.keys() == results.keys()
    assert (tmp_path / "results.png").stat().st_size > 1000
    for folder in ("original", "retrain", "npo", "simnpo"):  # what the closing line says is there
        assert (tmp_path / folder / "config.json").is_file(), folder
    card = (tmp_path / "simnpo" / "README.md").read_text()
    assert "forget_quality" in card and "SimNPO" in card
    assert str(tmp_path / "original") in card and "unknown" not in card  # the real base model
    printed = capsys.readouterr().out
    assert "{'" not in printed  # no raw log dicts


def test_ks_test_and_utility_without_rouge_on_hand_computed_cases():
    example = load_example("tofu")
    d, p = example.ks_test([1, 2, 3, 4], [5, 6, 7, 8])  # disjoint: D = 1, exact p = 2 / C(8, 4)
    assert d == 1.0 and p == pytest.approx(2 / 70)
    assert example.ks_test([1, 2, 3, 4], [3, 4, 5, 6])[0] == 0.5  # ECDF gap 2/4 at x = 2 (and at x = 4)
    assert example.ks_test([1, 2, 3], [1, 2, 3]) == (0.0, 1.0)
    sets, measures = ("retain", "real_authors", "world_facts"), ("probability", "truth_ratio")
    metrics = {f"{s}_{m}": 0.5 for s in sets for m in measures}
    metrics["retain_probability"] = 1.0
    metrics["retain_rougeL_recall"] = 0.0  # ROUGE is not part of it
    assert example.utility_without_rouge(metrics) == pytest.approx(6 / (5 * 2 + 1))


def test_tofu_small_tunes_every_method_with_one_budget():
    spec = importlib.util.spec_from_file_location("tofu_small", os.path.join(ROOT, "benchmarks", "tofu_small.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    a = bench.parse(["--data_dir", "unused"])
    assert a.methods.split(",") == ["gradascent", "graddiff", "npo", "simnpo", "rmu"]
    assert a.n_trials == 20 and a.tuning_seed == 0
    assert a.tuning_seed not in [int(s) for s in a.report_seeds.split(",")]  # report seeds never select
    r = bench.recipe(a, num_forget=40)
    assert r["warmup_steps"] == 3  # one epoch: ceil(40 / 16)
    assert r["per_device_train_batch_size"] == 16 and r["weight_decay"] == 0.01
    assert r["lr_scheduler_type"] == "linear"


def test_train_cli_with_yaml_config(tmp_path, tokenizer):
    from trl_unlearn.cli import main
    from trl_unlearn.data.files import write_tofu_layout
    from trl_unlearn.toy.synthetic import make_tofu_like
    from trl_unlearn.toy.tiny import tiny_llama

    data_dir = write_tofu_layout(tmp_path / "tofu", make_tofu_like(num_authors=4, seed=1))
    model = tiny_llama(tokenizer, hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    config = tmp_path / "recipe.yaml"
    config.write_text(
        f"model_name_or_path: {tmp_path / 'model'}\ndataset_name: {data_dir}\nforget_split: forget10\n"
        "retain_split: retain90\nbeta: 3.0\nmax_steps: 2\nper_device_train_batch_size: 2\n"
        "use_cpu: true\nbf16: false\nreport_to: none\ngradient_checkpointing: false\n"
    )
    out = tmp_path / "out"
    assert main(["simnpo", "--config", str(config), "--output_dir", str(out), "--learning_rate", "1e-3"]) == 0
    trained = AutoModelForCausalLM.from_pretrained(out)
    changed = [n for n, p in trained.state_dict().items() if not torch.equal(p, model.state_dict()[n])]
    assert changed
    card = (out / "README.md").read_text()
    assert "`beta` | 3.0" in card and "`learning_rate` | 0.001" in card


def test_train_cli_reports_bad_columns(tmp_path, tokenizer):
    from trl_unlearn.cli.train import UnlearnScriptArguments, load_qa_split

    (tmp_path / "forget10.json").write_text(json.dumps({"q": "x", "a": "y"}) + "\n")
    with pytest.raises(ValueError, match=r"expected a TRL format or the QA columns \['answer', 'question'\]"):
        load_qa_split(UnlearnScriptArguments(dataset_name=str(tmp_path)), "forget10")


def test_muse_example_runs_on_a_tiny_corpus(tmp_path, tokenizer):
    example = load_example("muse")
    root = tmp_path / "muse"
    for sub in ["raw", "verbmem", "knowmem", "privleak"]:
        (root / sub).mkdir(parents=True)
    docs = [f"Author {i} wrote book {i} in year {1900 + 3 * i}." for i in range(12)]
    (root / "raw" / "forget.txt").write_text("\n\n".join(docs[:6]))
    (root / "raw" / "retain1.txt").write_text("\n\n".join(docs[6:]))
    (root / "verbmem" / "forget.json").write_text(json.dumps([{"prompt": "Author 1 wrote", "gt": " book 1."}]))
    qa = [{"question": "Who wrote book 1?", "answer": "Author 1"}]
    (root / "knowmem" / "forget_qa.json").write_text(json.dumps(qa))
    (root / "knowmem" / "retain_qa.json").write_text(json.dumps(qa))
    (root / "privleak" / "forget.json").write_text(json.dumps(docs[:3]))
    (root / "privleak" / "holdout.json").write_text(json.dumps(docs[9:]))
    from trl_unlearn.toy.tiny import tiny_llama

    tiny_llama(tokenizer, hidden_size=32, num_hidden_layers=2, num_attention_heads=2).save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    from trl import ModelConfig, TrlParser

    from trl_unlearn import SimNPOConfig

    parser = TrlParser((example.MuseArguments, SimNPOConfig, ModelConfig))
    parsed = parser.parse_args_and_config(
        [
            "--model_name_or_path",
            str(tmp_path / "m"),
            "--dataset_name",
            str(root),
            "--output_dir",
            str(tmp_path / "o"),
            "--max_length",
            "16",
            "--max_steps",
            "1",
            "--use_cpu",
            "true",
            "--bf16",
            "false",
            "--report_to",
            "none",
            "--gradient_checkpointing",
            "false",
            "--auc_retrain",
            "0.5",
            "--methods",
            "simnpo,npo",
        ]
    )
    results = example.main(*parsed)
    assert set(results) == {"SimNPO", "NPO"}
    assert all(m["privleak"] is not None for m in results.values())
    from trl_unlearn.data.tokenize import text_windows

    windows = text_windows(docs, tokenizer, 16)
    assert all(len(tokenizer(t, add_special_tokens=False)["input_ids"]) <= 16 for t in windows["text"])
