"""Raw-text corpora through the training command: forget and retain text from two datasets (WMDP: a forget corpus and
WikiText), packed windows vs one row per document, empty documents dropped with a count, the model card's data lines,
and the errors a user meets first. No network: local folders, and a stand-in for `datasets.load_dataset`."""

import json
import logging

import pytest
from conftest import QA
from datasets import Dataset
from huggingface_hub import ModelCard
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from trl_unlearn.cli import main
from trl_unlearn.cli.train import UnlearnScriptArguments, load_split
from trl_unlearn.data.files import load_text_corpus, write_tofu_layout
from trl_unlearn.data.tokenize import tokenize_dataset
from trl_unlearn.toy.tiny import tiny_llama

WORDS = list("abcdefghij")
DOCS = ["a b c", "", "d e f g h", "   \n", "i j"]  # 3, 0, 5, 0, 2 words


@pytest.fixture(scope="module")
def words():
    """One token per space-separated word, no BOS: token counts can be worked out by hand."""
    vocab = {t: i for i, t in enumerate(["<pad>", "</s>", "<unk>"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


def write_jsonl(folder, split, texts, key="text"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{split}.jsonl").write_text("".join(json.dumps({key: t}) + "\n" for t in texts))
    return str(folder)


@pytest.fixture(scope="module")
def files(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("corpora")
    model = tiny_llama(tokenizer, hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    forget = write_jsonl(root / "cyber", "train", [f"{q} {a}" for q, a in QA[:6]] + ["", " "])
    (root / "wiki" / "raw").mkdir(parents=True)  # the retain corpus in MUSE's layout: another kind of folder
    (root / "wiki" / "raw" / "test.txt").write_text("\n\n".join(f"{q} {a}" for q, a in QA[10:18]))
    return {"model": str(root / "model"), "forget": forget, "retain": str(root / "wiki"), "root": root}


def test_windows_and_documents_row_counts_by_hand(words, tmp_path, caplog):
    folder = write_jsonl(tmp_path / "c", "train", DOCS)
    args = dict(dataset_name=folder, forget_split="train", retain_split="none")
    with caplog.at_level(logging.WARNING):
        documents = load_split(UnlearnScriptArguments(**args, text_rows="documents"), "train", words, 5)
    # documents: one row per non-empty document, as stored
    assert documents["text"] == ["a b c", "d e f g h", "i j"]
    assert "Dropped 2 of 5 documents of the forget" in caplog.text and "empty or whitespace-only" in caplog.text
    # windows: 3+1, 5+1, 2+1 = 13 ids (each document + EOS) in windows of max_length - 1 = 4 ids: 4, 4, 4, 1; the
    # last, of one token, is dropped
    windows = load_split(UnlearnScriptArguments(**args), "train", words, 5)
    assert windows["text"] == ["a b c", "d e f g", "h i j"]
    # max_length 4: windows of 3 ids: 3, 3, 3, 3, 1 -> 4 rows
    assert len(load_split(UnlearnScriptArguments(**args), "train", words, 4)) == 4
    # documents are truncated by the trainer's tokenisation, keeping the start: + EOS = 4, 6, 3 ids, at most 4 kept;
    # position 0 is never scored -> 3, 3, 2 scored tokens
    rows = tokenize_dataset(documents, words, "forget", max_length=4)
    assert rows["num_scored"] == [3, 3, 2]


def test_min_text_chars_drops_short_documents_with_a_count(words, tmp_path, caplog):
    folder = write_jsonl(tmp_path / "c", "train", DOCS)
    args = UnlearnScriptArguments(
        dataset_name=folder, forget_split="train", retain_split="none", text_rows="documents", min_text_chars=3
    )
    with caplog.at_level(logging.WARNING):
        rows = load_split(args, "train", words, 8)
    assert rows["text"] == ["a b c", "d e f g h"]  # "i j" has 3 characters: at most 3, dropped
    assert "Dropped 3 of 5 documents" in caplog.text and "at most 3 characters" in caplog.text


def test_two_local_datasets_of_different_kinds_through_the_cli(files, tmp_path, caplog):
    """Forget text from a JSON-lines folder, retain text from a MUSE-layout folder; the card names both."""
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        code = main(
            [
                "simnpo",
                "--model_name_or_path",
                files["model"],
                "--dataset_name",
                files["forget"],
                "--forget_split",
                "train",
                "--retain_dataset_name",
                files["retain"],
                "--retain_split",
                "test",
                "--text_rows",
                "documents",
                "--max_length",
                "64",
                "--output_dir",
                str(out),
                "--max_steps",
                "1",
                "--report_to",
                "none",
            ]
        )
    assert code == 0
    assert "Dropped 2 of 8 documents of the forget" in caplog.text
    text = ModelCard.load(out / "README.md").text
    assert f"{files['forget']} (train), 6 examples: documents truncated to 64 tokens" in text
    assert f"{files['retain']} (test), 8 examples: documents truncated to 64 tokens" in text
    assert not (out / "unlearning_prompt.json").exists()  # raw text has no prompt format


def test_hub_datasets_card_lines_and_config_defaults(files, tmp_path, monkeypatch):
    """Two Hub datasets, each with its own config (loading stubbed: no network): the card's data lines and `datasets`
    name both; the retain config defaults to the forget one only when the retain data come from the same dataset."""
    import datasets

    corpora = {
        ("cais/wmdp-corpora", "cyber-forget-corpus", "train"): [f"{q} {a}" for q, a in QA[:5]],
        ("Salesforce/wikitext", "wikitext-2-raw-v1", "test"): ["", " = Heading = \n"] + [a for _, a in QA[5:9]],
    }
    calls = []

    def load_dataset(name, config=None, split=None, **kwargs):
        calls.append((name, config, split))
        return Dataset.from_dict({"text": corpora[(name, config, split)]})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    out = tmp_path / "out"
    assert (
        main(
            [
                "npo",
                "--model_name_or_path",
                files["model"],
                "--dataset_name",
                "cais/wmdp-corpora",
                "--dataset_config",
                "cyber-forget-corpus",
                "--forget_split",
                "train",
                "--retain_dataset_name",
                "Salesforce/wikitext",
                "--retain_dataset_config",
                "wikitext-2-raw-v1",
                "--retain_split",
                "test",
                "--text_rows",
                "documents",
                "--min_text_chars",
                "15",
                "--max_length",
                "32",
                "--output_dir",
                str(out),
                "--max_steps",
                "1",
                "--report_to",
                "none",
            ]
        )
        == 0
    )
    assert calls == [
        ("cais/wmdp-corpora", "cyber-forget-corpus", "train"),
        ("Salesforce/wikitext", "wikitext-2-raw-v1", "test"),
    ]
    card = ModelCard.load(out / "README.md")
    assert card.data.datasets == ["cais/wmdp-corpora", "Salesforce/wikitext"]
    assert "cais/wmdp-corpora (cyber-forget-corpus, train), 5 examples: documents truncated to 32 tokens" in card.text
    # "" and " = Heading = \n" (14 characters <= 15) dropped
    assert "Salesforce/wikitext (wikitext-2-raw-v1, test), 4 examples" in card.text

    same = UnlearnScriptArguments(
        dataset_name="cais/wmdp-corpora",
        dataset_config="cyber-forget-corpus",
        retain_dataset_config="cyber-retain-corpus",
    )
    assert same.source("retain") == ("cais/wmdp-corpora", "cyber-retain-corpus")
    assert UnlearnScriptArguments(dataset_name="m", dataset_config="raw").source("retain") == ("m", "raw")
    other = UnlearnScriptArguments(dataset_name="m", dataset_config="raw", retain_dataset_name="w")
    assert other.source("retain") == ("w", None)


def test_hub_corpus_without_the_text_column_names_the_fix(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: Dataset.from_dict({"content": ["x"]}))
    with pytest.raises(ValueError, match=r"has columns \['content'\], not 'text': set `text_column`"):
        load_text_corpus("org/corpus", "train", "cfg")
    assert load_text_corpus("org/corpus", "train", "cfg", text_column="content") == ["x"]


def test_errors_name_the_fix(files, words, tmp_path, capsys, caplog):
    base = [
        "simnpo",
        "--model_name_or_path",
        files["model"],
        "--output_dir",
        str(tmp_path / "o"),
        "--max_steps",
        "1",
        "--overwrite_output_dir",
        "true",
    ]  # one run below saves a model there; the later ones fail on their data
    with pytest.raises(ValueError, match="use 'windows' \\(MUSE\\) or 'documents'"):
        UnlearnScriptArguments(text_rows="packed")
    with pytest.raises(ValueError, match="min_text_chars=-1"):
        UnlearnScriptArguments(min_text_chars=-1)
    # a JSON-lines row without the text key
    bad = write_jsonl(tmp_path / "bad", "train", ["x y"], key="content")
    assert main(base + ["--dataset_name", bad, "--forget_split", "train", "--retain_split", "none"]) == 2
    assert "expected a JSON object with a 'text' key" in capsys.readouterr().err
    with caplog.at_level(logging.WARNING):
        assert (
            main(
                base
                + [
                    "--dataset_name",
                    bad,
                    "--forget_split",
                    "train",
                    "--retain_split",
                    "none",
                    "--retain_dataset_name",
                    "unused",
                    "--text_column",
                    "content",
                    "--retain_weight",
                    "0",
                ]
            )
            == 0
        )
    assert "`retain_dataset_name` / `retain_dataset_config` are not used" in caplog.text
    # a missing split file names both layouts
    assert (
        main(
            base
            + [
                "--dataset_name",
                files["forget"],
                "--forget_split",
                "train",
                "--retain_dataset_name",
                files["forget"],
                "--retain_split",
                "test",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "test.jsonl" in err and "raw/test.txt" in err
    # a file instead of a folder
    assert (
        main(
            base
            + ["--dataset_name", f"{files['forget']}/train.jsonl", "--forget_split", "train", "--retain_split", "none"]
        )
        == 2
    )
    assert "is not a folder" in capsys.readouterr().err
    # nothing left after dropping empty documents
    empty = write_jsonl(tmp_path / "empty", "train", ["", "  "])
    with pytest.raises(ValueError, match="no document left: all 2 are empty"):
        load_split(UnlearnScriptArguments(dataset_name=empty, forget_split="train"), "train", words, 8)
    # a document that is not a string
    (tmp_path / "null").mkdir()
    (tmp_path / "null" / "train.jsonl").write_text('{"text": "a b"}\n{"text": null}\n')
    with pytest.raises(TypeError, match="document 1 is None"):
        load_text_corpus(str(tmp_path / "null"), "train")
    # raw-text forget data with question/answer retain data: the trainer's format check, before any model is loaded
    tofu = write_tofu_layout(tmp_path / "tofu", {"retain90": [{"question": "q?", "answer": "a."}] * 2})
    assert (
        main(
            base
            + [
                "--dataset_name",
                files["forget"],
                "--forget_split",
                "train",
                "--retain_dataset_name",
                str(tofu),
                "--retain_split",
                "retain90",
            ]
        )
        == 2
    )
    assert (
        "Forget data is standard language-modeling but retain data is standard prompt-completion"
        in capsys.readouterr().err
    )
