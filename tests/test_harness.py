"""lm-eval (lm-evaluation-harness) as the engine: a local multiple-choice task, a model whose answer is known.

The model ignores its input: every embedding is the all-ones vector and every attention / MLP block writes zero
into the residual stream, so the final hidden state (RMS-normed ones) is the same at every position, and the LM head
gives the same logits everywhere: 1 for " red", 3 for " green", 2 for " blue", 0 for " yellow" and every other token.
Each choice is one token, so its log-likelihood is ``logit - logZ`` (``Z = e + e^3 + e^2 + (V - 3)``) and

* acc picks the largest logit: green > blue > red > yellow;
* acc_norm picks the largest ``loglikelihood / len(choice)``: green (-2.77/5) > blue (-3.77/4) > yellow (-5.77/6)
  > red (-4.77/3) (with V = 294, logZ = 5.77), so red and yellow swap places.
"""

import importlib.util
import json
import math
import sys

import pytest
import torch

from trl_unlearn.cli import build_parser
from trl_unlearn.cli import main as cli_main
from trl_unlearn.evaluation.lm_eval import HarnessReport, evaluate_harness
from trl_unlearn.evaluation.report import EvalReport
from trl_unlearn.toy.tiny import tiny_llama, train_tokenizer

needs_lm_eval = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="the lm-eval extra")

COLOURS = ["red", "green", "blue", "yellow"]
LOGITS = {"red": 1.0, "green": 3.0, "blue": 2.0, "yellow": 0.0}
# (choices, answer index): the prediction by acc / acc_norm, worked out from the orders above
DOCS = [
    (["red", "green"], 1),                   # acc: green ✓   acc_norm: green ✓
    (["red", "blue", "yellow"], 0),          # acc: blue  ✗   acc_norm: blue  ✗
    (["yellow", "red"], 1),                  # acc: red   ✓   acc_norm: yellow ✗
    (["blue", "yellow", "green", "red"], 2), # acc: green ✓   acc_norm: green ✓
    (["green", "blue"], 1),                  # acc: green ✗   acc_norm: green ✗
]  # fmt: skip
ACC = [1.0, 0.0, 1.0, 1.0, 0.0]  # 3/5
ACC_NORM = [1.0, 0.0, 0.0, 1.0, 0.0]  # 2/5

TASK_YAML = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
fewshot_split: test
output_type: multiple_choice
doc_to_text: "Which colour? Answer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 2.0
"""

GROUP_YAML = """\
group: toy_group
task: [toy_a, toy_b]
aggregate_metric_list:
  - metric: acc
    aggregation: mean
    weight_by_size: true
metadata:
  version: 1.0
"""


def _write_task(folder, name, docs):
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps({"choices": c, "answer": a}) + "\n" for c, a in docs), encoding="utf-8")
    (folder / f"{name}.yaml").write_text(TASK_YAML.format(name=name, data=data), encoding="utf-8")


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    """toy_mc: the five documents; toy_group: the same five split into toy_a (three) and toy_b (two)."""
    folder = tmp_path_factory.mktemp("tasks")
    _write_task(folder, "toy_mc", DOCS)
    _write_task(folder, "toy_a", DOCS[:3])
    _write_task(folder, "toy_b", DOCS[3:])
    (folder / "toy_group.yaml").write_text(GROUP_YAML, encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def colour_tokenizer():
    tok = train_tokenizer([f"Which colour? Answer: {w}" for w in COLOURS] * 50, vocab_size=320)
    for w in COLOURS:
        assert len(tok(" " + w, add_special_tokens=False).input_ids) == 1, w  # one token per choice
    return tok


def constant_model(tok):
    """The input-independent model of the module docstring."""
    model = tiny_llama(tok, hidden_size=8, num_hidden_layers=1, num_attention_heads=2)
    h = model.config.hidden_size
    with torch.no_grad():
        model.model.embed_tokens.weight.fill_(1.0)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        for w, logit in LOGITS.items():
            model.lm_head.weight[tok.convert_tokens_to_ids("Ġ" + w)] = logit / h
    return model


def expected_loglikelihoods(tok):
    log_z = math.log(sum(math.exp(v) for v in LOGITS.values()) + (len(tok) - len(LOGITS)))
    return [[LOGITS[c] - log_z for c in choices] for choices, _ in DOCS]


@pytest.fixture(scope="module")
def report(tasks_dir, colour_tokenizer):
    model = constant_model(colour_tokenizer)
    model.train()
    rng_before = torch.get_rng_state()
    rep = evaluate_harness(model, colour_tokenizer, "toy_mc,toy_group", include_path=tasks_dir,
                           include_defaults=False, batch_size=4)  # fmt: skip
    assert model.training  # train mode restored
    assert torch.equal(torch.get_rng_state(), rng_before)  # lm-eval's global seeding undone
    return rep


@needs_lm_eval
def test_accuracy_matches_hand_computed_case(report, colour_tokenizer):
    m = report.metrics
    assert m["toy_mc/acc"] == pytest.approx(3 / 5)
    assert m["toy_mc/acc_norm"] == pytest.approx(2 / 5)
    # lm-eval's mean_stderr: sample std (ddof=1) / sqrt(n); acc: var = (3 * 0.4^2 + 2 * 0.6^2) / 4 = 0.3
    assert m["toy_mc/acc_stderr"] == pytest.approx(math.sqrt(0.3 / 5))
    assert m["toy_mc/acc_norm_stderr"] == pytest.approx(math.sqrt(0.3 / 5))  # 2 ones, 3 zeros: same variance
    items = report.per_item["toy_mc"]
    assert items["doc_id"] == [0, 1, 2, 3, 4]
    assert items["target"] == [a for _, a in DOCS]
    assert items["acc"] == ACC and items["acc_norm"] == ACC_NORM
    for got, want in zip(items["loglikelihoods"], expected_loglikelihoods(colour_tokenizer)):
        assert got == pytest.approx(want, abs=1e-4)


@needs_lm_eval
def test_group_is_size_weighted_mean_of_its_tasks(report):
    m = report.metrics
    assert m["toy_a/acc"] == pytest.approx(2 / 3) and m["toy_b/acc"] == pytest.approx(1 / 2)
    assert m["toy_group/acc"] == pytest.approx(3 / 5)  # (2 + 1) / (3 + 2)
    assert report.settings["group_subtasks"]["toy_group"] == ["toy_a", "toy_b"]


@needs_lm_eval
def test_settings_record_versions_and_shots(report, tasks_dir):
    s = report.settings
    assert s["benchmark"] == "lm-eval" and s["tasks"] == ["toy_mc", "toy_group"]
    assert s["versions"]["toy_mc"] == 2.0
    assert s["n_shot"]["toy_mc"] == 0 and s["num_fewshot"] is None
    assert s["n_samples"]["toy_mc"] == {"original": 5, "effective": 5}
    assert s["include_path"] == [str(tasks_dir)]
    assert s["configs"]["toy_mc"]["dataset_path"] == "json"
    from importlib.metadata import version

    import transformers

    assert s["lm_eval_version"] == version("lm_eval")
    assert s["transformers_version"] == transformers.__version__
    assert s["torch_version"] == torch.__version__ and s["package_version"]


@needs_lm_eval
def test_limit_and_fewshot(tasks_dir, colour_tokenizer):
    """limit=3 scores the first three documents; two shots leave an input-independent model's answers unchanged."""
    rep = evaluate_harness(constant_model(colour_tokenizer), colour_tokenizer, ["toy_mc"], include_path=tasks_dir,
                           include_defaults=False, limit=3, num_fewshot=2)  # fmt: skip
    assert rep.metrics["toy_mc/acc"] == pytest.approx(2 / 3)  # ACC[:3]
    assert rep.per_item["toy_mc"]["acc"] == ACC[:3]
    assert rep.settings["n_shot"]["toy_mc"] == 2 and rep.settings["limit"] == 3
    assert rep.settings["n_samples"]["toy_mc"] == {"original": 5, "effective": 3}
    assert "limit: 3" in rep.table()


@needs_lm_eval
def test_json_round_trip_and_recompute(report, tmp_path):
    path = tmp_path / "r" / "lm_eval.json"
    report.save(path)
    loaded = HarnessReport.load(path)
    assert isinstance(loaded, HarnessReport)
    assert loaded.to_dict() == report.to_dict()
    assert json.loads(path.read_text())["benchmark"] == "lm-eval"
    # tasks (not groups) are derived again from the per-item values
    again = loaded.recompute()
    assert set(again) == {f"{t}/{k}" for t in ("toy_mc", "toy_a", "toy_b")
                          for k in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr")}  # fmt: skip
    for k, v in again.items():
        assert v == pytest.approx(report.metrics[k])
    # a TOFU / MUSE report is refused
    other = tmp_path / "tofu.json"
    EvalReport("tofu", {}, {}, {}).save(other)
    with pytest.raises(ValueError, match="not an lm-eval report"):
        HarnessReport.load(other)


@needs_lm_eval
def test_table(report):
    table = report.table()
    lines = table.splitlines()
    assert lines[0].startswith("lm-eval ")
    row = next(line for line in lines if line.startswith("toy_mc "))
    assert "0.6000 ± 0.2449" in row and "0.4000 ± 0.2449" in row
    assert any(line.startswith("  toy_a ") for line in lines)  # a group's members, indented
    assert "limit" not in table


@needs_lm_eval
def test_model_index(report):
    index = report.model_index("tiny-unlearned")
    assert index[0]["name"] == "tiny-unlearned"
    by_dataset = {r["dataset"]["name"]: r for r in index[0]["results"]}
    assert set(by_dataset) == {"toy_mc", "toy_group"}
    toy = by_dataset["toy_mc"]
    assert toy["task"] == {"type": "multiple-choice", "name": "Multiple Choice"}
    # a task on local files has no Hub dataset id: the task name stands for it
    assert toy["dataset"] == {"name": "toy_mc", "type": "toy_mc", "split": "test", "args": {"num_few_shot": 0}}
    assert toy["metrics"] == [
        {"type": "acc", "value": 0.6, "name": "accuracy"},
        {"type": "acc_norm", "value": 0.4, "name": "normalized accuracy"},
    ]
    assert toy["source"]["name"] == "lm-evaluation-harness"
    assert by_dataset["toy_group"]["metrics"] == [{"type": "acc", "value": 0.6, "name": "accuracy"}]
    # it goes into a model card as is
    from huggingface_hub import ModelCardData

    card = ModelCardData(model_name="tiny-unlearned", eval_results=report.eval_results(["toy_mc"]))
    assert "model-index" in card.to_yaml()
    assert card.to_dict()["model-index"][0]["results"][0]["metrics"][0]["value"] == 0.6
    with pytest.raises(ValueError, match="no accuracy for 'nope'"):
        report.eval_results(["nope"])
    # a local copy of a Hub dataset names it in its YAML metadata
    copy = HarnessReport.from_dict(json.loads(json.dumps(report.to_dict())))
    copy.settings["configs"]["toy_mc"]["metadata"].update(hub_dataset="org/toy", hub_config="colours")
    dataset = copy.model_index("m", ["toy_mc"])[0]["results"][0]["dataset"]
    assert (dataset["type"], dataset["config"], dataset["name"]) == ("org/toy", "colours", "toy_mc")


@needs_lm_eval
def test_unknown_task_is_named(tasks_dir, colour_tokenizer):
    with pytest.raises(ValueError, match="unknown lm-eval task.*'toy_mcc'.*toy_mc"):
        evaluate_harness(constant_model(colour_tokenizer), colour_tokenizer, "toy_mcc", include_path=tasks_dir,
                         include_defaults=False)  # fmt: skip
    with pytest.raises(FileNotFoundError, match="include_path not found"):
        evaluate_harness(constant_model(colour_tokenizer), colour_tokenizer, "toy_mc", include_path=tasks_dir / "no")
    with pytest.raises(ValueError, match="tokenizer"):
        evaluate_harness(constant_model(colour_tokenizer), None, "toy_mc")


@needs_lm_eval
def test_main_reports_a_bad_task_in_one_line(tasks_dir, tmp_path, capsys):
    """The task names are checked before the model is loaded (here there is no model to load)."""
    argv = ["eval", "lm-eval", "--model", str(tmp_path / "no_model"), "--tasks", "toy_mcc", "--output",
            str(tmp_path / "r.json"), "--include_path", str(tasks_dir), "--no_builtin_tasks"]  # fmt: skip
    assert cli_main(argv) == 2
    assert "unknown lm-eval task(s): 'toy_mcc'" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_missing_lm_eval_names_the_extra(monkeypatch, colour_tokenizer, tmp_path):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now raises ImportError
    with pytest.raises(ImportError, match=r'pip install "trl-unlearn\[lm-eval\]"'):
        evaluate_harness(constant_model(colour_tokenizer), colour_tokenizer, "toy_mc")
    args = build_parser().parse_args(
        ["eval", "lm-eval", "--model", str(tmp_path / "absent"), "--tasks", "toy_mc", "--output", "r.json"]
    )
    with pytest.raises(ImportError, match=r"trl-unlearn\[lm-eval\]"):  # before trying to load the model
        args.func(args)


@needs_lm_eval
def test_run_from_args_on_saved_model(tasks_dir, colour_tokenizer, tmp_path, capsys):
    model_dir = tmp_path / "model"
    constant_model(colour_tokenizer).save_pretrained(model_dir)
    colour_tokenizer.save_pretrained(model_dir)
    out = tmp_path / "out" / "report.json"
    assert cli_main([
        "eval", "lm-eval", "--model", str(model_dir), "--tasks", "toy_mc", "--output", str(out), "--include_path",
        str(tasks_dir), "--no_builtin_tasks", "--batch_size", "2", "--device", "cpu", "--dtype", "float32",
    ]) == 0  # fmt: skip
    rep = HarnessReport.load(out)
    assert rep.metrics["toy_mc/acc"] == pytest.approx(3 / 5) and rep.metrics["toy_mc/acc_norm"] == pytest.approx(2 / 5)
    assert rep.settings["model"] == str(model_dir) and rep.settings["batch_size"] == 2
    assert rep.settings["dtype"] == "float32" and rep.settings["device"] == "cpu"
    printed = capsys.readouterr().out
    assert "0.6000 ± 0.2449" in printed and f"report written to {out}" in printed
    # --update_model_card records the task accuracy (model-index) in the folder's card
    from huggingface_hub import ModelCard

    ModelCard("---\nlicense: mit\n---\n# an unlearned model\n").save(model_dir / "README.md")
    assert cli_main(["eval", "lm-eval", "--model", str(model_dir), "--tasks", "toy_mc", "--output", str(out),
                     "--include_path", str(tasks_dir), "--no_builtin_tasks", "--device", "cpu",
                     "--update_model_card"]) == 0  # fmt: skip
    card = ModelCard.load(model_dir / "README.md")
    accs = [r.metric_value for r in card.data.eval_results if r.metric_type == "acc"]
    assert accs == [pytest.approx(3 / 5)] and "Evaluation" in card.text
    # a folder path straight to evaluate_harness: loaded there (tokenizer from the folder)
    rep = evaluate_harness(model_dir, tasks="toy_mc", include_path=tasks_dir, include_defaults=False, limit=2,
                           device="cpu")  # fmt: skip
    assert rep.settings["model"] == str(model_dir) and rep.metrics["toy_mc/acc"] == pytest.approx(0.5)  # ACC[:2]


def test_argument_parsing():
    parser = build_parser()
    head = ["eval", "lm-eval", "--model", "m", "--output", "o"]
    a = parser.parse_args(head + ["--tasks", "a,b", "--limit", "0.5", "--batch_size", "auto", "--include_path", "x",
                                  "--include_path", "y", "--num_fewshot", "5"])  # fmt: skip
    assert (a.limit, a.batch_size, a.include_path, a.num_fewshot) == (0.5, "auto", ["x", "y"], 5)
    assert parser.parse_args(head + ["--tasks", "a", "--limit", "10"]).limit == 10
    with pytest.raises(SystemExit):
        parser.parse_args(head + ["--tasks", "a", "--batch_size", "big"])


@needs_lm_eval
def test_runner_built_once_scores_several_models_as_evaluate_harness(tasks_dir, colour_tokenizer):
    """`HarnessRunner`: tasks made ready once, then each model scored as `evaluate_harness` scores it."""
    from trl_unlearn.evaluation.lm_eval import HarnessRunner

    runner = HarnessRunner("toy_mc", include_path=tasks_dir, include_defaults=False, env_info=False)
    constant, other = constant_model(colour_tokenizer), constant_model(colour_tokenizer)
    with torch.no_grad():  # " red" now has the largest logit: a different model, different answers
        other.lm_head.weight[colour_tokenizer.convert_tokens_to_ids("Ġred")] *= 5.0
    first, second = runner(constant, colour_tokenizer), runner(other, colour_tokenizer)
    assert first.metrics["toy_mc/acc"] == pytest.approx(3 / 5)
    direct = evaluate_harness(other, colour_tokenizer, "toy_mc", include_path=tasks_dir, include_defaults=False)
    assert second.per_item["toy_mc"]["acc"] == direct.per_item["toy_mc"]["acc"] != first.per_item["toy_mc"]["acc"]
    for got, want in zip(second.per_item["toy_mc"]["loglikelihoods"], direct.per_item["toy_mc"]["loglikelihoods"]):
        assert got == pytest.approx(want, abs=1e-6)
