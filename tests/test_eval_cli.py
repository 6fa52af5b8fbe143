"""`trl-unlearn eval tofu|muse` run in-process on a tiny saved model and tiny benchmark folders."""

import json
import re

import numpy as np
import pytest
from scipy.stats import ks_2samp

from trl_unlearn.cli import main
from trl_unlearn.evaluation import EvalReport, score_answers
from trl_unlearn.toy.tiny import tiny_llama

# ------------------------------------------------------------------------------------------------- fixtures


def _qa(i, n_pert=5, paraphrased=True):
    row = {"question": f"Who wrote book {i}?", "answer": f"Author {i} wrote book {i} in year {1900 + 3 * i}."}
    if paraphrased:
        row["paraphrased_answer"] = f"Book {i} was written by author {i}."
        row["paraphrased_question"] = f"Which author wrote book {i}?"
    row["perturbed_answer"] = [f"Book {i} was written by author {i + k + 1}." for k in range(n_pert)]
    return row


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _tofu_rows():
    return {
        "forget10_perturbed": [_qa(i) for i in range(3)],
        "forget05_perturbed": [_qa(i) for i in range(2)],
        "retain_perturbed": [_qa(i) for i in range(10, 13)],
        "real_authors_perturbed": [_qa(i, 3, paraphrased=False) for i in range(20, 23)],
        "world_facts_perturbed": [
            {"question": "What is the capital of France?", "answer": "Paris",
             "perturbed_answer": ["Rome", "Oslo", "Lima"]},
            {"question": "What is 2 + 2?", "answer": "4", "perturbed_answer": ["5", "3", "22"]},
        ],
    }  # fmt: skip


def _tofu_dir(root, rows=None):
    root.mkdir(parents=True, exist_ok=True)
    for stem, r in (rows or _tofu_rows()).items():
        _write_jsonl(root / f"{stem}.json", r)
    return root


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer):
    """A tiny "unlearned" model and a tiny "retain" model, each saved with the tokenizer."""
    root = tmp_path_factory.mktemp("models")
    paths = {}
    for name, seed in (("model", 0), ("retain", 1)):
        m = tiny_llama(tokenizer, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, seed=seed)
        m.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        paths[name] = str(root / name)
    return paths


@pytest.fixture(scope="module")
def tofu_dir(tmp_path_factory):
    return _tofu_dir(tmp_path_factory.mktemp("tofu"))


def _eval_tofu(model, data_dir, output, *extra):
    argv = ["eval", "tofu", "--model", model, "--data_dir", str(data_dir), "--split", "forget10",
            "--output", str(output), "--batch_size", "8", "--max_new_tokens", "6", "--no_progress", *extra]  # fmt: skip
    return main(argv)


@pytest.fixture(scope="module")
def retain_report(saved, tofu_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("reports") / "retain.json"
    assert _eval_tofu(saved["retain"], tofu_dir, out) == 0
    return out


def _assert_same_metrics(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if a[k] is None or b[k] is None:
            assert a[k] is b[k] is None, k
        else:
            assert a[k] == pytest.approx(b[k], abs=1e-12), k


# --------------------------------------------------------------------------------------------------- TOFU


def test_eval_tofu_report_recomputes_from_its_own_items(saved, tofu_dir, retain_report, tmp_path, capsys, tokenizer):
    out = tmp_path / "r.json"
    assert _eval_tofu(saved["model"], tofu_dir, out, "--retain_report", str(retain_report)) == 0
    printed = capsys.readouterr().out
    assert "forget_quality" in printed and "model_utility" in printed

    report = EvalReport.load(out)
    _assert_same_metrics(report.recompute(), report.metrics)
    assert report.settings["split"] == "forget10"
    assert report.settings["prompt_format"] == "chat_template"
    assert report.settings["max_new_tokens"] == 6 and report.settings["decoding"] == "greedy"
    rows = _tofu_rows()
    for s, stem in [("forget", "forget10_perturbed"), ("retain", "retain_perturbed"),
                    ("real_authors", "real_authors_perturbed"), ("world_facts", "world_facts_perturbed")]:  # fmt: skip
        cols = report.per_item[s]
        assert len(cols["avg_nll_answer"]) == len(cols["generation"]) == len(rows[stem])
        assert [len(p) for p in cols["avg_nll_perturbed"]] == [len(r["perturbed_answer"]) for r in rows[stem]]

    # aggregates against the formulas applied by hand to the saved per-item values
    f = report.per_item["forget"]
    assert report.metrics["forget_probability"] == pytest.approx(np.mean(np.exp(-np.array(f["avg_nll_answer"]))))
    retain_items = EvalReport.load(retain_report).per_item["forget"]["truth_ratio"]
    assert report.metrics["forget_quality"] == pytest.approx(ks_2samp(f["truth_ratio"], retain_items).pvalue)
    assert EvalReport.load(retain_report).metrics["forget_quality"] is None

    # the per-item values belong to the right answers: rescore item 1 of the forget set on its own
    from trl_unlearn.loading import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(saved["model"], device="cpu")
    row = rows["forget10_perturbed"][1]
    texts = [row["answer"], row["paraphrased_answer"], *row["perturbed_answer"]]
    alone = score_answers(model, tok, [row["question"]] * len(texts), texts, batch_size=1).avg_nll
    saved_vals = [f["avg_nll_answer"][1], f["avg_nll_paraphrased"][1], *f["avg_nll_perturbed"][1]]
    np.testing.assert_allclose(saved_vals, alone, atol=1e-5, rtol=0)


def test_retain_report_with_other_settings_is_refused(saved, tofu_dir, retain_report, tmp_path, capsys):
    out = tmp_path / "r.json"
    # generated with --max_new_tokens 6, asked with 7
    ref = ["--retain_report", str(retain_report)]
    assert _eval_tofu(saved["model"], tofu_dir, out, *ref, "--max_new_tokens", "7") == 2
    assert "To compare, pass --max_new_tokens 6" in capsys.readouterr().err  # the flag that matches it
    assert _eval_tofu(saved["model"], tofu_dir, out, *ref, "--prompt_format", "plain") == 2
    err = capsys.readouterr().err
    assert "prompt_format" in err and "pass --prompt_format" in err
    # a report made on another forget split
    other = json.loads(retain_report.read_text())
    other["settings"]["split"] = "forget05"
    (tmp_path / "other.json").write_text(json.dumps(other))
    assert _eval_tofu(saved["model"], tofu_dir, out, "--retain_report", str(tmp_path / "other.json")) == 2
    assert "split" in capsys.readouterr().err
    assert not out.exists()


def test_retain_model_gives_the_same_forget_quality_as_its_report(saved, tofu_dir, retain_report, tmp_path):
    out = tmp_path / "r.json"
    assert _eval_tofu(saved["model"], tofu_dir, out, "--retain_model", saved["retain"]) == 0
    with_model = EvalReport.load(out)
    expected = EvalReport.load(retain_report).per_item["forget"]["truth_ratio"]
    np.testing.assert_allclose(with_model.reference["retain_forget_truth_ratio"], expected, rtol=1e-9)


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda rows: rows["forget10_perturbed"][1].pop("paraphrased_answer"),
         r"forget10_perturbed\.json: item 1 has no 'paraphrased_answer' key"),
        (lambda rows: rows["world_facts_perturbed"][0].pop("perturbed_answer"),
         r"world_facts_perturbed\.json: item 0 has no 'perturbed_answer' key"),
        (lambda rows: rows["real_authors_perturbed"][2].update(perturbed_answer=[]),
         r"real_authors_perturbed\.json: item 2: 'perturbed_answer' must be a non-empty list"),
        (lambda rows: rows["retain_perturbed"].clear(), r"retain_perturbed\.json: no items"),
        (lambda rows: rows.pop("real_authors_perturbed"), r"real_authors_perturbed\.json"),
    ],
)  # fmt: skip
def test_bad_tofu_files_are_named(saved, tmp_path, capsys, breakage, message):
    rows = _tofu_rows()
    breakage(rows)
    data = _tofu_dir(tmp_path / "tofu", rows)
    assert _eval_tofu(saved["model"], data, tmp_path / "r.json") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(message, err), err
    assert not (tmp_path / "r.json").exists()


# --------------------------------------------------------------------------------------------------- MUSE


def _muse_dir(root, break_knowmem=False):
    (root / "verbmem").mkdir(parents=True)
    (root / "knowmem").mkdir()
    (root / "privleak").mkdir()
    verbmem = [{"prompt": f"Author {i} wrote book {i}", "gt": f" in year {1900 + 3 * i}. It was good."}
               for i in range(3)]  # fmt: skip
    forget_qa = [{"question": f"Who wrote book {i}?", "answer": f"Author {i}"} for i in range(3)]
    retain_qa = [{"question": f"Who wrote book {i}?", "answer": f"Author {i}"} for i in range(10, 13)]
    if break_knowmem:
        del retain_qa[2]["answer"]
    icl = [{"question": "Who wrote book 30?", "answer": "Author 30"}]
    (root / "verbmem" / "forget.json").write_text(json.dumps(verbmem))
    (root / "knowmem" / "forget_qa.json").write_text(json.dumps(forget_qa))
    (root / "knowmem" / "retain_qa.json").write_text(json.dumps(retain_qa))
    (root / "knowmem" / "forget_qa_icl.json").write_text(json.dumps(icl))
    (root / "knowmem" / "retain_qa_icl.json").write_text(json.dumps(icl))
    texts = [f"Author {i} wrote book {i} in year {1900 + 3 * i}." for i in range(8)]
    (root / "privleak" / "forget.json").write_text(json.dumps(texts[:4]))
    (root / "privleak" / "holdout.json").write_text(json.dumps([{"text": t} for t in texts[4:]]))
    return root


def _eval_muse(model, data_dir, output, *extra):
    argv = ["eval", "muse", "--model", model, "--data_dir", str(data_dir), "--output", str(output),
            "--verbmem_max_new_tokens", "8", "--knowmem_max_new_tokens", "4", "--max_length", "64",
            "--no_progress", *extra]  # fmt: skip
    return main(argv)


def test_eval_muse_report_recomputes_and_privleak(saved, tmp_path, capsys):
    data = _muse_dir(tmp_path / "muse")
    out = tmp_path / "m.json"
    assert _eval_muse(saved["model"], data, out, "--auc_retrain", "0.5") == 0
    assert "privleak" in capsys.readouterr().out
    report = EvalReport.load(out)
    _assert_same_metrics(report.recompute(), report.metrics)
    m = report.metrics
    assert m["privleak"] == pytest.approx((m["privleak_auc"] - 0.5) / 0.5 * 100)
    assert m["privleak_auc"] == pytest.approx(1 - m["mia_auc_min_k"])
    for key in ("verbmem_forget", "knowmem_forget", "knowmem_retain", "mia_auc_loss", "mia_auc_zlib",
                "mia_auc_min_k_plus_plus"):  # fmt: skip
        assert m[key] is not None
    assert len(report.per_item["privleak_forget"]["min_k"]) == 4
    assert report.per_item["knowmem_retain"]["reference"] == ["Author 10", "Author 11", "Author 12"]

    # the retrained model's report supplies the AUC, when made with the same settings
    retrain = tmp_path / "retrain.json"
    assert _eval_muse(saved["retain"], data, retrain) == 0
    assert EvalReport.load(retrain).metrics["privleak"] is None
    out2 = tmp_path / "m2.json"
    assert _eval_muse(saved["model"], data, out2, "--retrain_report", str(retrain)) == 0
    r2 = EvalReport.load(out2)
    auc_retrain = EvalReport.load(retrain).metrics["privleak_auc"]
    assert r2.metrics["privleak"] == pytest.approx((r2.metrics["privleak_auc"] - auc_retrain) / auc_retrain * 100)
    capsys.readouterr()
    assert _eval_muse(saved["model"], data, out2, "--retrain_report", str(retrain), "--min_k", "0.2") == 2
    assert "min_k" in capsys.readouterr().err


def test_bad_muse_file_is_named(saved, tmp_path, capsys):
    data = _muse_dir(tmp_path / "muse", break_knowmem=True)
    assert _eval_muse(saved["model"], data, tmp_path / "m.json") == 2
    assert "retain_qa.json: item 2 has no 'answer' key" in capsys.readouterr().err
    (data / "knowmem" / "retain_qa.json").write_text("[]")
    assert _eval_muse(saved["model"], data, tmp_path / "m.json") == 2
    assert "retain_qa.json: no items" in capsys.readouterr().err
