"""The audit end to end on a tiny model: relearning on forget rows brings back more than relearning on unrelated
rows, the full report (audit.json, one offline audit.html), the command line, and bad input."""

import base64
import copy
import json
from html.parser import HTMLParser

import pytest
from audit_toy import qa_batch, train, unlearn

from trl_unlearn.cli import main
from trl_unlearn.data.files import write_tofu_layout
from trl_unlearn.evaluation.unlearning_audit import ATTACKS, AuditConfig, AuditData, audit, load_audit_data
from trl_unlearn.toy.synthetic import iter_texts, make_tofu_like
from trl_unlearn.toy.tiny import tiny_llama, train_tokenizer

FAST = dict(relearn_learning_rate=3e-3, relearn_steps=10, max_new_tokens=24, num_samples=2, group_size=32)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """(tokenizer, base that learned every row, unlearned by gradient difference, TOFU-layout folder)."""
    data = make_tofu_like(num_authors=8, questions_per_author=6, seed=0)
    # non-members: the real-author questions, which no model here trains on (TOFU's holdoutNN naming)
    data["holdout10"] = [{"question": r["question"], "answer": r["answer"]} for r in data["real_authors"]]
    folder = write_tofu_layout(tmp_path_factory.mktemp("tofu"), data)
    tok = train_tokenizer(iter_texts(data), vocab_size=400)
    base = tiny_llama(tok, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, seed=0)
    train(base, qa_batch(tok, data["full"]), steps=150, lr=1e-2)
    model = copy.deepcopy(base)
    sets = load_audit_data(folder, "forget10")
    unlearn(model, qa_batch(tok, sets.forget), qa_batch(tok, sets.retain), steps=12, lr=2e-3)
    return tok, base, model, folder


@pytest.fixture(scope="module")
def full_report(toy, tmp_path_factory):
    tok, base, model, folder = toy
    out = tmp_path_factory.mktemp("audit")
    report = audit(
        model,
        tok,
        base,
        load_audit_data(folder, "forget10"),
        config=AuditConfig(**FAST),
        prompt_format="plain",
        output_dir=out,
        progress=False,
    )
    return report, out


def test_relearning_forget_rows_recovers_more_than_unrelated_rows(full_report):
    report, _ = full_report
    relearn = {r["variant"]: r for r in report["attacks"] if r["attack"] == "relearn"}
    inside, outside = relearn["in_domain"], relearn["out_of_domain"]
    key = "forget_probability"
    shares = {v: r["subsets"]["all"]["recovered_share"][key] for v, r in relearn.items()}
    assert shares["in_domain"] > shares["out_of_domain"] + 0.1
    # the rows it trained on come back more than the held-out ones
    assert (
        inside["subsets"]["relearned"]["recovered_share"][key] > inside["subsets"]["held_out"]["recovered_share"][key]
    )
    assert outside["settings"]["steps"] == inside["settings"]["steps"]  # equal budgets
    assert "no forget row" in outside["settings"]["train_source"]


def test_report_covers_every_attack_and_says_what_was_skipped(full_report):
    report, out = full_report
    on_disk = json.loads((out / "audit.json").read_text())
    assert on_disk["summary"] == report["summary"]
    assert {r["attack"] for r in report["attacks"]} == set(ATTACKS)
    variants = {r["variant"] for r in report["attacks"]}
    assert {
        "rtn8_channel",
        "rtn4_g32",
        "in_domain",
        "out_of_domain",
        "paraphrase",
        "few_shot_3",
        "other_format_chat",
        "sampling_2_t1",
        "linear_probe",
        "auc",
    } <= variants
    skipped = [r for r in report["attacks"] if r["status"] == "skipped"]
    assert [r["variant"] for r in skipped] == ["bnb_int8", "bnb_nf4"]  # no CUDA here: skipped, with the reason
    assert all("CUDA" in r["reason"] for r in skipped)
    assert report["complete"] is False
    for r in report["attacks"]:
        if r["status"] == "ok":
            for k, v in r["recovered_share"].items():
                assert (v is None) == (k in r["share_notes"])  # a missing share always says why


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.text = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def test_html_is_one_offline_page_with_inline_figures(full_report):
    _, out = full_report
    page = (out / "audit.html").read_text()
    parser = _Tags()
    parser.feed(page)
    parser.close()
    names = [t for t, _ in parser.tags]
    assert names.count("html") == 1 and "script" not in names and "link" not in names and "iframe" not in names
    images = [a["src"] for t, a in parser.tags if t == "img"]
    assert len(images) >= 5  # summary, quantization, relearning, prompt, probe, membership
    for src in images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    for _, attrs in parser.tags:
        for k, v in attrs.items():
            assert not (v or "").startswith(("http:", "https:", "//")), (k, v)
    assert "url(" not in page and "@import" not in page
    text = " ".join(parser.text)
    assert "Incomplete" in text and "need a CUDA device" in text


def test_command_line_writes_the_report_and_the_card(toy, tmp_path, capsys):
    tok, base, model, folder = toy
    for name, m in (("base", base), ("unlearned", model)):
        m.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    (tmp_path / "unlearned" / "README.md").write_text("---\nlicense: mit\n---\n# unlearned\n")
    args = [
        "audit",
        "--model",
        str(tmp_path / "unlearned"),
        "--base",
        str(tmp_path / "base"),
        "--data_dir",
        str(folder),
        "--forget_split",
        "forget10",
        "--output_dir",
        str(tmp_path / "out"),
        "--attacks",
        "quantization,membership",
        "--quant_bits",
        "4",
        "--no_bnb",
        "--max_new_tokens",
        "8",
        "--device",
        "cpu",
        "--prompt_format",
        "plain",
        "--no_progress",
        "--update_model_card",
        "--all_quant_variants",
        "--max_rows",
        "5",
        "--attack_items",
        "3",
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "audit complete" in printed and "rtn4_channel" in printed
    report = json.loads((tmp_path / "out" / "audit.json").read_text())
    assert report["complete"] and [r["variant"] for r in report["summary"]] == ["rtn4_channel", "rtn4_g128", "auc"]
    st = report["settings"]
    assert st["num_forget"] == st["num_retain"] == 5
    assert st["data"].endswith("5 of 6 forget, 5 of 12 retain, 5 of 20 non-member rows, evenly spaced")
    assert len(st["detail_items"]["forget"]) == 3 and st["detail_items"]["retain"] == [0, 1, 3]  # 5 // 3 spacing
    assert report["attacks"][0]["detail_items"] == {"forget": st["detail_items"]["forget"], "retain": [0, 1, 3]}
    card = (tmp_path / "unlearned" / "README.md").read_text()
    assert "### Audit" in card and "| quantization | rtn4_channel |" in card
    # the audit never writes into a model folder
    bad = [*args[:9], "--output_dir", str(tmp_path / "base" / "audit"), *args[11:]]
    assert main(bad) == 2
    assert "never writes into a model folder" in capsys.readouterr().err


def test_bad_input_gives_one_line_errors(toy, tmp_path, capsys):
    tok, base, model, folder = toy
    data = load_audit_data(folder, "forget10")
    with pytest.raises(ValueError, match="needs the original model"):
        audit(model, tok, None, data)
    with pytest.raises(ValueError, match="forget set is empty"):
        AuditData(forget=[], retain=data.retain)
    with pytest.raises(ValueError, match=r"max_rows must be >= 1 or None \(every item; --max_rows 0\), got 0"):
        AuditConfig(max_rows=0)  # at construction: the command line fails before loading a model
    with pytest.raises(ValueError, match="unknown attack"):
        audit(model, tok, base, data, attacks="quantization,jailbreak")
    other = train_tokenizer(["a completely different corpus of words"] * 3, vocab_size=280)
    with pytest.raises(ValueError, match="tokenizer differs"):
        audit(model, tok, base, data, base_tokenizer=other)
    assert main(["audit", "--model", str(tmp_path), "--data_dir", str(folder), "--output_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--base ORIGINAL is required" in err
    assert (
        main(
            [
                "audit",
                "--model",
                str(tmp_path),
                "--base",
                str(tmp_path),
                "--data_dir",
                str(folder),
                "--output_dir",
                str(tmp_path / "o"),
                "--attacks",
                "quantize",
            ]
        )
        == 2
    )
    assert "choose among" in capsys.readouterr().err


def test_truth_ratio_of_attacked_rows_only_when_asked(toy):
    """By default an attacked row scores probability and ROUGE-L (the truth ratio, 6 answers an item, stays on the
    clean rows); `attack_truth_ratio` adds it, its share computed from the same items' clean values."""
    tok, base, model, folder = toy
    data = load_audit_data(folder, "forget10")
    rows = {}
    for flag in (False, True):
        cfg = AuditConfig(quant_bits=(4,), bnb=False, max_new_tokens=4, attack_truth_ratio=flag, min_gap=0.0)
        report = audit(model, tok, base, data, attacks="quantization", config=cfg, prompt_format="plain")
        assert "forget_truth_ratio" in report["clean"]["unlearned"]["metrics"]
        rows[flag] = report["attacks"][0]
    assert set(rows[False]["recovered_share"]) == {"forget_probability", "forget_rougeL_recall"}
    assert "truth_ratio" not in rows[False]["per_item"]["attacked"]["forget"]
    m = rows[True]["metrics"]
    key = "forget_truth_ratio"
    expected = (m["attacked"][key] - m["unlearned"][key]) / (m["base"][key] - m["unlearned"][key])
    assert rows[True]["recovered_share"][key] == pytest.approx(expected)
    # the other shares do not depend on the flag
    for k, v in rows[False]["recovered_share"].items():
        assert rows[True]["recovered_share"][k] == pytest.approx(v)
