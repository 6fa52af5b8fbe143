"""`evaluate_muse` reproduces swj0419/muse_bench on the same inputs (docs/evaluation.md, "Parity with muse_bench").

The model's `generate` is replaced by a script (each prompt is continued by a chosen text, then EOS), so prompt
construction, tokenisation, the stop cut, decoding and the reference cut are checked exactly, without a trained
model. muse_bench's behaviour is written out here by hand from its metrics/knowmem.py, metrics/verbmem.py and
metrics/privleak.py (transformers 4.40, as its environment.yml pins).
"""

import copy
import json

import pytest
import torch
from tokenizers import processors

from trl_unlearn.evaluation.muse import evaluate_muse, knowmem_prompt
from trl_unlearn.toy.tiny import tiny_llama


@pytest.fixture(params=["no_bos", "bos"])
def tok(request, tokenizer):
    """The session tokenizer (adds no special token), or a copy that prepends BOS as Llama's does."""
    if request.param == "no_bos":
        return tokenizer
    t = copy.deepcopy(tokenizer)
    t.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", t.bos_token_id)]
    )
    assert t("a b")["input_ids"][0] == t.bos_token_id
    return t


class Script:
    """Stands in for `model.generate`: records each prompt's ids and continues it with `reply(prompt text)` + EOS."""

    def __init__(self, tokenizer, reply):
        self.tokenizer, self.reply, self.prompts = tokenizer, reply, []

    def __call__(self, input_ids, attention_mask, max_new_tokens, **kwargs):
        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            prompt = ids[mask.bool()].tolist()
            self.prompts.append(prompt)
            text = self.tokenizer.decode(prompt, skip_special_tokens=True)
            new = self.tokenizer(self.reply(text), add_special_tokens=False)["input_ids"]
            assert len(new) < max_new_tokens, "script longer than max_new_tokens"
            rows.append(new + [self.tokenizer.eos_token_id])
        out = torch.full((len(rows), max(map(len, rows))), self.tokenizer.pad_token_id, dtype=torch.long)
        for r, new in enumerate(rows):
            out[r, : len(new)] = torch.tensor(new)
        return torch.cat([input_ids, out.to(input_ids.device)], dim=1)


def _write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows))


def _scripted_model(monkeypatch, tokenizer, reply):
    model = tiny_llama(tokenizer, hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    script = Script(tokenizer, reply)
    monkeypatch.setattr(model, "generate", script)
    return model, script


# ------------------------------------------------------------------------------------------------------- KnowMem

SHOTS = [{"question": "Who wrote book 30?", "answer": "Author 30"}, {"question": "When?", "answer": "In 1990"}]


def test_knowmem_prompt_is_muse_bench_string():
    # muse_bench metrics/knowmem.py: shots as "Question: {q}\nAnswer: {a}\n\n", then "Question: {q}\nAnswer: "
    assert knowmem_prompt("Who wrote book 1?", SHOTS) == (
        "Question: Who wrote book 30?\nAnswer: Author 30\n\n"
        "Question: When?\nAnswer: In 1990\n\n"
        "Question: Who wrote book 1?\nAnswer: "
    )
    assert knowmem_prompt("Who?") == "Question: Who?\nAnswer: "


# (scripted continuation, muse_bench's generation): decoded with transformers 4.40's clean-up of tokenization spaces,
# then cut before "\n\n", then before "\nQuestion", then before "Question:"; never stripped
KNOWMEM_CASES = [
    ("Author 1\nQuestion 2: who?", "Author 1"),  # "\nQuestion" without the colon
    ("Author 1\nQuestions remain", "Author 1"),
    (" Author 1 \n\nQuestion: x", " Author 1 "),  # leading / trailing spaces kept
    ("Author 1. Question: next", "Author 1. "),
    ("It is n't Author 1 , is it ?", "It isn't Author 1, is it?"),  # clean-up of tokenization spaces
    ("Author 1 .\nQuestion", "Author 1."),
]


def test_knowmem_prompt_stop_cut_and_decoding(monkeypatch, tmp_path, tok):
    qa = [{"question": f"Who wrote book {i}?", "answer": "Author 1"} for i in range(len(KNOWMEM_CASES))]
    replies = {f"Who wrote book {i}?": c for i, (c, _) in enumerate(KNOWMEM_CASES)}
    _write(tmp_path / "knowmem" / "forget_qa.json", qa)
    _write(tmp_path / "knowmem" / "forget_qa_icl.json", SHOTS)
    _write(tmp_path / "knowmem" / "retain_qa.json", qa[:1])
    model, script = _scripted_model(
        monkeypatch, tok, lambda prompt: replies[prompt.rsplit("Question: ", 1)[1].split("\n")[0]]
    )
    report = evaluate_muse(model, tok, tmp_path, parts=["knowmem"], generation_batch_size=4, progress=False)

    # the model sees exactly muse_bench's prompt, tokenised with the tokenizer's special tokens
    # (retain_qa has no few-shot file here: zero-shot)
    texts = [knowmem_prompt(r["question"], SHOTS) for r in qa] + [knowmem_prompt(qa[0]["question"])]
    expected = {tuple(tok(t, add_special_tokens=True)["input_ids"]) for t in texts}
    assert set(map(tuple, script.prompts)) == expected
    assert all((p[0] == tok.bos_token_id) == (tok("a")["input_ids"][0] == tok.bos_token_id) for p in script.prompts)
    assert report.per_item["knowmem_forget"]["generation"] == [want for _, want in KNOWMEM_CASES]
    assert report.per_item["knowmem_retain"]["generation"] == [KNOWMEM_CASES[0][1]]
    # ROUGE-L F1 (no stemmer) against the raw answer, mean x 100
    assert report.per_item["knowmem_retain"]["rougeL_f1"] == [1.0]
    assert report.metrics["knowmem_retain"] == pytest.approx(100.0)


# ------------------------------------------------------------------------------------------------------- VerbMem


def test_verbmem_reference_cut_counts_special_tokens(monkeypatch, tmp_path, tok):
    # muse_bench metrics/verbmem.py: the reference is the continuation tokenised WITH special tokens, cut to
    # max_new_tokens ids, decoded without them: one text token fewer when the tokenizer adds BOS
    gt = " the quick brown fox jumps over the lazy dog and the quick brown fox jumps again"
    _write(tmp_path / "verbmem" / "forget.json", [{"prompt": "Author 1 wrote book 1", "gt": gt}])
    model, _ = _scripted_model(monkeypatch, tok, lambda prompt: " the dog")
    m = 8
    text_ids = tok(gt, add_special_tokens=False)["input_ids"]
    assert len(text_ids) > m
    adds_bos = tok("a")["input_ids"][0] == tok.bos_token_id
    expected = tok.decode(text_ids[: m - 1 if adds_bos else m])
    report = evaluate_muse(model, tok, tmp_path, parts=["verbmem"], verbmem_max_new_tokens=m, progress=False)
    assert report.per_item["verbmem_forget"]["reference"] == [expected]
    assert report.per_item["verbmem_forget"]["generation"] == [" the dog"]  # not stripped


@pytest.mark.parametrize("tokenizer_cleans", [False, True])
def test_verbmem_decoding_cleans_tokenization_spaces_once(monkeypatch, tmp_path, tokenizer, tokenizer_cleans):
    # muse_bench decodes both the reference and the generation with clean_up_tokenization_spaces=True, which
    # transformers 4.40 applies once to every tokenizer (transformers >= 5 skips it for BPE tokenizers unless
    # forced): " ." -> "." once, so "  ." (two spaces) keeps one space, whatever the tokenizer's own setting
    tok = copy.deepcopy(tokenizer)
    tok.clean_up_tokenization_spaces = tokenizer_cleans
    tok.clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output = tokenizer_cleans
    gt = " It is n't here , she said  ."
    _write(tmp_path / "verbmem" / "forget.json", [{"prompt": "Author 1 wrote book 1", "gt": gt}])
    model, _ = _scripted_model(monkeypatch, tok, lambda prompt: " They 're here  !")
    report = evaluate_muse(model, tok, tmp_path, parts=["verbmem"], progress=False)
    assert report.per_item["verbmem_forget"]["reference"] == [" It isn't here, she said ."]
    assert report.per_item["verbmem_forget"]["generation"] == [" They're here !"]
    assert tok.clean_up_tokenization_spaces is tokenizer_cleans  # the caller's tokenizer is left as it was


# ------------------------------------------------------------------------------------------------------ PrivLeak


def test_privleak_scores_the_whole_text_with_min_k_as_muse_bench(tmp_path, tok):
    # muse_bench metrics/privleak.py: the whole text, tokenised with special tokens, no length cut; the log-probs
    # of every token after the first; Min-40% = mean of the int(0.4 * n) lowest
    long_text = "the quick brown fox jumps over the lazy dog. " * 110
    texts = [long_text, "Author 3 wrote book 3 in year 1909."]
    _write(tmp_path / "privleak" / "forget.json", texts[:1])
    _write(tmp_path / "privleak" / "holdout.json", texts[1:])
    model = tiny_llama(tok, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=4096)
    report = evaluate_muse(model, tok, tmp_path, parts=["privleak"], min_k_plus_plus=False, progress=False)

    for name, text in zip(("privleak_forget", "privleak_holdout"), texts):
        ids = torch.tensor([tok(text, add_special_tokens=True)["input_ids"]])
        with torch.no_grad():
            logp = model(ids).logits.float().log_softmax(-1)[0, :-1].gather(-1, ids[0, 1:, None]).squeeze(-1)
        n = logp.numel()
        assert report.per_item[name]["num_tokens"] == [n]
        lowest = logp.double().sort().values[: int(0.4 * n)]
        assert report.per_item[name]["min_k"][0] == pytest.approx(lowest.mean().item(), rel=1e-4)
    assert report.per_item["privleak_forget"]["num_tokens"][0] > 2048
    # muse_bench's forget_holdout AUC: holdout texts are the positive class, scored by mean lowest log-prob
    f, h = report.per_item["privleak_forget"]["min_k"][0], report.per_item["privleak_holdout"]["min_k"][0]
    assert report.metrics["privleak_auc"] == (1.0 if h > f else 0.0)
