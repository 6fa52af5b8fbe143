"""Tests for the synthetic TOFU-shaped QA set (`trl_unlearn.toy.synthetic`). Fast, offline, no real TOFU needed."""

import json

import pytest

from trl_unlearn.data.files import load_tofu_split, write_tofu_layout
from trl_unlearn.data.formats import PROMPT_TEMPLATE, qa_to_trl
from trl_unlearn.toy.synthetic import (
    FACT_TYPES,
    PERTURBED_KEYS,
    REAL_AUTHORS,
    TOFU_STEMS,
    WORLD_FACTS,
    forget_author_count,
    iter_texts,
    make_fictitious_authors,
    make_tofu_like,
)

FORGET_RETAIN = {"forget01": "retain99", "forget05": "retain95", "forget10": "retain90"}
PERTURBED_STEMS = ("forget01_perturbed", "forget05_perturbed", "forget10_perturbed", "retain_perturbed")


@pytest.fixture(scope="module")
def data():
    return make_tofu_like(num_authors=20, questions_per_author=10, seed=0)


def _pairs(rows):
    return [(r["question"], r["answer"]) for r in rows]


def test_authors_deterministic_and_seeded():
    a = make_fictitious_authors(20, seed=0)
    assert a == make_fictitious_authors(20, seed=0)
    assert a != make_fictitious_authors(20, seed=1)
    assert len(a) == 20
    assert len({x["name"] for x in a}) == 20
    assert len({x["book"] for x in a}) == 20
    assert len({(x["birth_city"], x["birth_year"]) for x in a}) == 20
    for x in a:
        assert x["book_year"] > x["birth_year"]
        assert x["father_job"] != x["mother_job"]


def test_tofu_like_deterministic_and_seeded(data):
    assert make_tofu_like(20, 10, seed=0) == data
    other = make_tofu_like(20, 10, seed=1)
    assert other["full"] != data["full"]
    assert other["forget10_perturbed"] != data["forget10_perturbed"]


def test_stems_and_sizes_20_authors(data):
    assert tuple(data) == TOFU_STEMS
    sizes = {stem: len(rows) for stem, rows in data.items()}
    assert sizes == {
        "full": 200,
        "forget01": 10,
        "forget05": 10,
        "forget10": 20,
        "retain99": 190,
        "retain95": 190,
        "retain90": 180,
        "forget01_perturbed": 10,
        "forget05_perturbed": 10,
        "forget10_perturbed": 20,
        "retain_perturbed": 40,  # first min(2 * k10, 20 - k10) = 4 authors
        "real_authors": len(REAL_AUTHORS),
        "real_authors_perturbed": len(REAL_AUTHORS),
        "world_facts": len(WORLD_FACTS),
        "world_facts_perturbed": len(WORLD_FACTS),
    }


@pytest.mark.parametrize(
    ("num_authors", "expected"),
    [(200, (2, 10, 20)), (20, (1, 1, 2)), (40, (1, 2, 4)), (50, (1, 3, 5)), (5, (1, 1, 1)), (2, (1, 1, 1))],
)
def test_forget_author_count(num_authors, expected):
    assert tuple(forget_author_count(p, num_authors) for p in (1, 5, 10)) == expected


def test_sizes_other_configs():
    d = make_tofu_like(num_authors=200, questions_per_author=3, seed=0)
    assert [len(d[s]) for s in ("full", "forget01", "forget05", "forget10")] == [600, 6, 30, 60]
    assert [len(d[s]) for s in ("retain99", "retain95", "retain90", "retain_perturbed")] == [594, 570, 540, 120]
    d = make_tofu_like(num_authors=20, questions_per_author=4, seed=0, retain_eval_authors=2)
    assert len(d["retain_perturbed"]) == 8
    d = make_tofu_like(num_authors=3, questions_per_author=len(FACT_TYPES), seed=0)
    assert len(d["full"]) == 3 * len(FACT_TYPES)
    assert len(d["retain_perturbed"]) == 2 * len(FACT_TYPES)  # capped at num_authors - k10


def test_bad_arguments():
    with pytest.raises(ValueError):
        make_tofu_like(num_authors=1)
    with pytest.raises(ValueError):
        make_tofu_like(questions_per_author=0)
    with pytest.raises(ValueError):
        make_tofu_like(questions_per_author=len(FACT_TYPES) + 1)
    with pytest.raises(ValueError):
        make_tofu_like(num_authors=20, retain_eval_authors=19)


def test_forget_retain_partition_full(data):
    full = _pairs(data["full"])
    assert len(set(full)) == len(full)  # every QA pair is unique
    for forget, retain in FORGET_RETAIN.items():
        f, r = _pairs(data[forget]), _pairs(data[retain])
        assert not set(f) & set(r)
        assert r + f == full  # retain = first authors, forget = last authors, in full's order
        assert _pairs(data[f"{forget}_perturbed"]) == f
    # the nested forget splits: forget01 within forget05 within forget10 (all take the last authors)
    assert set(_pairs(data["forget01"])) <= set(_pairs(data["forget05"])) <= set(_pairs(data["forget10"]))
    # retain_perturbed: first authors, disjoint from every forget split
    rp = _pairs(data["retain_perturbed"])
    assert rp == full[: len(rp)]
    assert not set(rp) & set(_pairs(data["forget10"]))


def test_row_keys_match_tofu_layout(data):
    for stem in ("full", "forget01", "forget05", "forget10", "retain99", "retain95", "retain90"):
        assert all(list(r) == ["question", "answer"] for r in data[stem]), stem
    for stem in PERTURBED_STEMS:
        assert all(tuple(r) == PERTURBED_KEYS for r in data[stem]), stem
        assert all(isinstance(r["perturbed_answer"], list) for r in data[stem])
    for stem in ("real_authors_perturbed", "world_facts_perturbed"):
        assert all(list(r) == ["question", "answer", "perturbed_answer"] for r in data[stem]), stem
    for stem in ("real_authors", "world_facts"):
        for r in data[stem]:
            assert set(r) == {"question", "answer", "option1", "option2", "option3", "option4"}
            options = [r[f"option{i}"] for i in range(1, 5)]
            assert r["answer"] in options and len(set(options)) == 4
    for rows in data.values():
        for r in rows:
            assert all(isinstance(v, str) and v.strip() for k, v in r.items() if k != "perturbed_answer")


def test_perturbed_answers(data):
    for stem in PERTURBED_STEMS:
        for r in data[stem]:
            p = r["perturbed_answer"]
            assert len(p) == 5
            assert len(set(p)) == 5
            assert r["answer"] not in p and r["paraphrased_answer"] not in p
            assert r["paraphrased_answer"] != r["answer"]
            assert r["paraphrased_question"] != r["question"]
    for stem in ("real_authors_perturbed", "world_facts_perturbed"):
        for r in data[stem]:
            p = r["perturbed_answer"]
            assert len(p) == 3 and len(set(p)) == 3 and r["answer"] not in p


def test_perturbation_swaps_only_the_fact(data):
    # A perturbed answer is the paraphrase template with the fact swapped: same length give or take a few words.
    r = data["forget10_perturbed"][0]
    shared = set(r["paraphrased_answer"].split())
    for p in r["perturbed_answer"]:
        assert len(shared & set(p.split())) >= len(shared) - 4


def test_answers_short_and_paired_with_their_author(data):
    names = [a["name"] for a in make_fictitious_authors(20, seed=0)]
    q = len(data["full"]) // 20
    for i, r in enumerate(data["full"]):
        assert 6 <= len(r["answer"].split()) <= 25, r["answer"]
        assert names[i // q] in r["answer"]  # rows go author by author
    for r in data["retain_perturbed"]:
        assert all(6 <= len(x.split()) <= 25 for x in [r["paraphrased_answer"], *r["perturbed_answer"]])


def test_splits_do_not_share_row_objects():
    d = make_tofu_like(20, 10, seed=0)  # forget01 and forget05 are both the last author here
    d["forget01"][0]["answer"] = "changed"
    d["forget01_perturbed"][0]["perturbed_answer"].append("extra")
    assert d["forget05"][0]["answer"] != "changed"
    assert d["forget10"][-10]["answer"] != "changed"
    assert d["full"][-10]["answer"] != "changed"
    assert len(d["forget05_perturbed"][0]["perturbed_answer"]) == 5
    assert len(d["forget10_perturbed"][-10]["perturbed_answer"]) == 5


def test_write_load_round_trip(tmp_path, data):
    out = write_tofu_layout(tmp_path / "tofu", data)
    assert out == tmp_path / "tofu"
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{s}.json" for s in TOFU_STEMS)
    for stem, rows in data.items():
        assert load_tofu_split(out, stem) == rows
        assert load_tofu_split(str(out), f"{stem}.json") == rows
    # JSON lines: one object a line
    lines = (out / "forget01_perturbed.json").read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(data["forget01_perturbed"])
    assert json.loads(lines[0]) == data["forget01_perturbed"][0]


def test_write_non_ascii_and_load_variants(tmp_path):
    rows = [{"question": "Who wrote 'Cien años de soledad'?", "answer": "Gabriel García Márquez"}]
    out = write_tofu_layout(tmp_path, {"real_authors": rows})
    assert "García" in (out / "real_authors.json").read_text(encoding="utf-8")  # ensure_ascii=False
    assert load_tofu_split(out, "real_authors") == rows
    # blank lines skipped; a JSON array file is accepted too
    (tmp_path / "a.json").write_text('{"question": "q", "answer": "a"}\n\n', encoding="utf-8")
    assert load_tofu_split(tmp_path, "a") == [{"question": "q", "answer": "a"}]
    (tmp_path / "b.json").write_text('[{"question": "q", "answer": "a"}]', encoding="utf-8")
    assert load_tofu_split(tmp_path, "b") == [{"question": "q", "answer": "a"}]
    (tmp_path / "c.json").write_text('{"question": "q"}\n{oops\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"c\.json, line 2"):
        load_tofu_split(tmp_path, "c")


def test_missing_file_error_names_the_file(tmp_path, data):
    write_tofu_layout(tmp_path, {"forget10": data["forget10"]})
    with pytest.raises(FileNotFoundError, match=r"forget05_perturbed\.json") as e:
        load_tofu_split(tmp_path, "forget05_perturbed")
    assert "forget10" in str(e.value)  # lists what is there
    with pytest.raises(FileNotFoundError, match=r"retain90\.json.*does not exist"):
        load_tofu_split(tmp_path / "nowhere", "retain90")


def test_qa_to_trl_prompt_completion(data):
    rows = data["forget01"]
    ds = qa_to_trl(rows)
    assert ds.column_names == ["prompt", "completion"]
    assert len(ds) == len(rows)
    assert ds[0]["prompt"] == f"Question: {rows[0]['question']}\nAnswer:"
    assert ds[0]["prompt"] == PROMPT_TEMPLATE.format(question=rows[0]["question"])
    assert ds[0]["completion"] == " " + rows[0]["answer"]
    custom = qa_to_trl(rows, template="Q: {question} A:")
    assert custom[0]["prompt"] == f"Q: {rows[0]['question']} A:"


def test_qa_to_trl_conversational(data):
    rows = data["world_facts"]
    ds = qa_to_trl(rows, template=None)
    assert ds.column_names == ["prompt", "completion"]
    assert len(ds) == len(rows)
    assert ds[0]["prompt"] == [{"role": "user", "content": rows[0]["question"]}]
    assert ds[0]["completion"] == [{"role": "assistant", "content": rows[0]["answer"]}]


def test_iter_texts_covers_everything(data):
    texts = set(iter_texts(data))
    r = data["forget10_perturbed"][0]
    assert {r["question"], r["answer"], r["paraphrased_question"], r["paraphrased_answer"]} <= texts
    assert set(r["perturbed_answer"]) <= texts
    assert data["real_authors"][0]["option1"] in texts
