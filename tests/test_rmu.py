"""RMUTrainer on a tiny 4-layer Llama: the loss against a hand computation from `output_hidden_states`, which
positions count, what moves (activations, log-probs, parameters) and what must not, the forward that stops at
`layer_id`, accumulation, the control vector across a resume, PEFT, errors, model card and CLI."""

import copy
import functools
import os

import pytest
import torch
from conftest import QA, cpu_args, prompt_completion, qa_prompt
from datasets import Dataset

from trl_unlearn import RMUConfig, RMUTrainer
from trl_unlearn.decoder_layers import layer_output, layers_path
from trl_unlearn.toy.tiny import tiny_llama

LAYER = 2  # steered layer of the 4-layer test model; layer 3 and the LM head must never run


def rmu_args(tmp_path, **kw):
    kw = {"layer_id": LAYER, "steering_coeff": 4.0, "retain_weight": 10.0, "learning_rate": 1e-2, **kw}
    return cpu_args(RMUConfig, tmp_path, **kw)


def llama4(tokenizer):
    return tiny_llama(tokenizer, hidden_size=32, num_hidden_layers=4, num_attention_heads=2)


def fox_rows(n=8):
    """Retain data unlike the forget data (as WMDP's wikitext is unlike its forget corpora)."""
    return Dataset.from_dict({"prompt": ["the quick brown fox"] * n, "completion": [" jumps over the lazy dog."] * n})


def first_batch(trainer, size=4):
    retain = trainer.train_dataset.retain
    return trainer.data_collator([trainer.train_dataset[(i, i if retain is not None else 0)] for i in range(size)])


def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def unit_control(hidden_size, coeff, seed):
    u = torch.rand(hidden_size, generator=torch.Generator().manual_seed(seed))
    return coeff * u / u.norm()


def test_loss_matches_hand_computation(tokenizer, forget_ds, retain_ds, tmp_path):
    model = llama4(tokenizer)
    initial = copy.deepcopy(model).eval()
    args = rmu_args(tmp_path, forget_weight=0.5, retain_weight=3.0, seed=7)
    trainer = RMUTrainer(
        model=model, args=args, forget_dataset=forget_ds, retain_dataset=retain_ds, processing_class=tokenizer
    )
    with torch.no_grad():  # move the trained parameters away from the reference
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    batch = first_batch(trainer)
    model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch)
        kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        h = model(**kw).hidden_states[LAYER + 1][:, :-1]  # output of decoder layer LAYER
        h_ref = initial(**kw).hidden_states[LAYER + 1][:, :-1]
    pos = batch["completion_mask"][:, 1:].bool()
    f, r = pos & batch["forget_mask"][:, None], pos & ~batch["forget_mask"][:, None]
    forget = ((h[f] - unit_control(32, 4.0, 7)) ** 2).mean()
    retain = ((h[r] - h_ref[r]) ** 2).mean()
    assert retain > 0
    torch.testing.assert_close(loss, 0.5 * forget + 3.0 * retain, rtol=1e-5, atol=1e-7)


def test_text_rows_count_every_text_token_and_no_padding(tokenizer, tmp_path):
    """Language-modeling rows: every token of the text counts (as in the WMDP code), not the EOS the package
    appends, and not the padding: the padded batch's loss is the mean over each text's own tokens."""
    model = llama4(tokenizer).eval()
    texts = [qa_prompt(q) + " " + a for q, a in QA[:2]] + ["the quick brown fox jumps", "the lazy dog"]
    trainer = RMUTrainer(
        model=model,
        args=rmu_args(tmp_path, retain_weight=0.0),
        forget_dataset=Dataset.from_dict({"text": texts}),
        processing_class=tokenizer,
    )
    control = unit_control(32, 4.0, 0)
    with torch.no_grad():
        loss = trainer.compute_loss(model, first_batch(trainer))
        per_token = []
        for text in texts:
            ids = torch.tensor([tokenizer(text)["input_ids"]])  # no EOS, no padding
            h = model(input_ids=ids, output_hidden_states=True).hidden_states[LAYER + 1][0]
            per_token.append(((h - control) ** 2).mean(-1))
    torch.testing.assert_close(loss, torch.cat(per_token).mean(), rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def learned(tokenizer):
    """A 4-layer model that has learned the forget facts and the retain sentence (a few seconds of Adam)."""
    model = llama4(tokenizer)
    rows = [qa_prompt(q) + " " + a + "</s>" for q, a in QA[:8]] + ["the quick brown fox jumps over the lazy dog.</s>"]
    enc = tokenizer(rows, padding=True, return_tensors="pt")
    labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(40):
        loss = model(**enc, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.state_dict()


def _rows_batch(trainer, dataset):
    return trainer.data_collator([{"forget": dataset[i], "retain": None} for i in range(len(dataset))])


def _activations_and_logps(model, trainer, dataset):
    """Layer-LAYER activations `[N, H]` at the counted positions and the token-mean log-prob of `dataset`."""
    batch = _rows_batch(trainer, dataset)
    pos = batch["completion_mask"][:, 1:].bool()
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    logps = out.logits[:, :-1].log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return out.hidden_states[LAYER + 1][:, :-1][pos], logps[pos].mean().item()


def test_forget_activations_reach_the_control_vector_and_retain_ones_stay(learned, tokenizer, forget_ds, tmp_path):
    model = llama4(tokenizer)
    model.load_state_dict(learned)
    args = rmu_args(tmp_path, steering_coeff=20.0, max_steps=10)
    trainer = RMUTrainer(
        model=model, args=args, forget_dataset=forget_ds, retain_dataset=fox_rows(), processing_class=tokenizer
    )
    forget, retain = trainer.train_dataset.forget, trainer.train_dataset.retain
    control = trainer.control_vector
    (f0, f_logp0), (r0, r_logp0) = (_activations_and_logps(model.eval(), trainer, d) for d in (forget, retain))
    trainer.train()
    (f1, f_logp1), (r1, r_logp1) = (_activations_and_logps(model.eval(), trainer, d) for d in (forget, retain))
    # forget activations: from nearly orthogonal to c·u to close to it
    assert torch.cosine_similarity(f0, control[None]).mean() < 0.2
    assert torch.cosine_similarity(f1, control[None]).mean() > 0.9
    assert ((f1 - control) ** 2).mean() < 0.2 * ((f0 - control) ** 2).mean()
    # retain activations barely move (they are held at the reference's)
    assert ((r1 - r0) ** 2).mean() < 0.02 * ((f1 - f0) ** 2).mean()
    # ... and so the forget facts are lost while the retain sentence is kept
    assert f_logp0 - f_logp1 > 3.0
    assert f_logp0 - f_logp1 > 10 * (r_logp0 - r_logp1)


@pytest.mark.parametrize(
    "update_layers,update_modules,checkpointing",
    [
        (None, ["mlp"], {}),  # non-reentrant activation checkpointing, the default
        ([1, 2], ["mlp.down_proj"], {"use_reentrant": True}),
        ([1, 2], ["mlp"], None),  # no activation checkpointing
    ],
)
def test_only_update_parameters_change_and_the_forward_stops_at_layer_id(
    update_layers, update_modules, checkpointing, tokenizer, forget_ds, retain_ds, tmp_path
):
    model = llama4(tokenizer)
    calls, backward = [], []
    for module in (model.model.layers[LAYER + 1], model.lm_head):
        module.register_forward_hook(lambda *a: calls.append(1))
    model.model.layers[0].register_full_backward_hook(lambda *a: backward.append(1))
    args = rmu_args(
        tmp_path,
        max_steps=2,
        update_layers=update_layers,
        update_modules=update_modules,
        activation_checkpointing=checkpointing is not None,
        activation_checkpointing_kwargs=checkpointing,
    )
    trainer = RMUTrainer(
        model=model, args=args, forget_dataset=forget_ds, retain_dataset=retain_ds, processing_class=tokenizer
    )
    before = params(model)
    trainer.train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    layers = update_layers or [0, 1, 2]
    expected = {
        f"model.layers.{i}.{m}.weight"
        for i in layers
        for m in (["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"] if update_modules == ["mlp"] else update_modules)
    }
    assert changed == expected == set(trainer.update_parameters)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    assert not calls  # no layer above layer_id and no LM head ran in training
    assert bool(backward) == (0 in layers)  # and no backward below the first trained layer
    assert len(trainer.ref_model.model.layers) == LAYER + 1  # the frozen copy keeps only the layers it runs


def test_gradient_accumulation_2x2_matches_4x1(tokenizer, forget_ds, retain_ds, tmp_path):
    runs = []
    for bs, ga in [(4, 1), (2, 2)]:
        model = llama4(tokenizer)
        args = rmu_args(
            tmp_path / f"{bs}x{ga}",
            per_device_train_batch_size=bs,
            gradient_accumulation_steps=ga,
            max_steps=3,
            learning_rate=1e-3,
        )
        trainer = RMUTrainer(
            model=model, args=args, forget_dataset=forget_ds, retain_dataset=retain_ds, processing_class=tokenizer
        )
        trainer.train()
        runs.append(([h["loss"] for h in trainer.state.log_history if "loss" in h], params(model)))
    (loss_a, p_a), (loss_b, p_b) = runs
    assert loss_a == pytest.approx(loss_b, rel=1e-4)
    for n in p_a:
        torch.testing.assert_close(p_a[n], p_b[n], rtol=1e-4, atol=1e-6)


def test_control_vector_is_seeded_saved_and_restored_on_resume(tokenizer, forget_ds, retain_ds, tmp_path):
    def make(out, seed=0, max_steps=4):
        args = rmu_args(
            tmp_path, output_dir=str(out), seed=seed, max_steps=max_steps, save_strategy="steps", save_steps=1
        )
        return RMUTrainer(
            model=llama4(tokenizer),
            args=args,
            forget_dataset=forget_ds,
            retain_dataset=retain_ds,
            processing_class=tokenizer,
        )

    full = make(tmp_path / "a")
    control = full.control_vector
    assert torch.all(control >= 0) and control.norm().item() == pytest.approx(4.0)
    torch.testing.assert_close(control, unit_control(32, 4.0, 0))
    assert not torch.equal(control, make(tmp_path / "b", seed=1).control_vector)
    full.train()
    saved = torch.load(tmp_path / "a" / "checkpoint-2" / "rmu_control_vector.pt", weights_only=True)
    assert torch.equal(saved, control)
    trace = {h["step"]: h["loss"] for h in full.state.log_history if "loss" in h}

    resumed = make(tmp_path / "a")
    resumed.control_vector = torch.zeros_like(control)  # must be read back from the checkpoint
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    assert torch.equal(resumed.control_vector, control)
    again = {h["step"]: h["loss"] for h in resumed.state.log_history if "loss" in h}
    assert [again[s] for s in (3, 4)] == pytest.approx([trace[s] for s in (3, 4)], rel=1e-5)


def test_lora_trains_the_adapters_of_update_modules_only(tokenizer, forget_ds, retain_ds, tmp_path, caplog):
    from peft import LoraConfig

    peft_config = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]
    )
    with caplog.at_level("WARNING"):
        trainer = RMUTrainer(
            model=llama4(tokenizer),
            args=rmu_args(tmp_path, max_steps=3, update_layers=[1, 2]),
            forget_dataset=forget_ds,
            retain_dataset=retain_ds,
            processing_class=tokenizer,
            peft_config=peft_config,
        )
    # q/v adapters of 4 layers and the MLP adapters of layers 0 and 3, 2 tensors each
    assert "froze 28 PEFT adapter tensors" in caplog.text
    assert trainer.ref_model is None and trainer.reference_plan.kind == "adapters_off"
    before = params(trainer.model)
    trainer.train()
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(before[n], p)}
    assert changed and all("lora_" in n and ".mlp." in n and (".layers.1." in n or ".layers.2." in n) for n in changed)
    # step 1: the adapters are still zero, so the policy is its reference (the base) exactly
    assert trainer.state.log_history[0]["retain/loss"] == 0.0


def test_qlora_trains_the_mlp_adapters_of_update_layers(tokenizer, forget_ds, retain_ds, tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig

    llama4(tokenizer).save_pretrained(tmp_path / "base")
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    trainer = RMUTrainer(
        model=str(tmp_path / "base"),
        args=rmu_args(tmp_path, max_steps=2, update_layers=[1, 2]),
        forget_dataset=forget_ds,
        retain_dataset=retain_ds,
        processing_class=tokenizer,
        quantization_config=quant,
        peft_config=LoraConfig(
            r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"], layers_to_transform=[1, 2]
        ),
    )
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in trainer.model.modules())
    before = {n: p.detach().float().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(before[n], p.detach().float())}
    assert changed == {n for n in before if "lora_" in n} and len(changed) == 12  # 3 modules x A, B x 2 layers


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(layer_id=-1), "`layer_id` must be >= 0"),
        (dict(update_layers=[]), "`update_layers` is empty"),
        (dict(update_layers=[1, 3]), r"`update_layers` \[3\] lie outside 0 .. layer_id=2"),
        (dict(steering_coeff=0.0), "`steering_coeff` must be > 0"),
        (dict(update_modules=[]), "`update_modules` is empty"),
        (dict(retain_loss_type="kl"), "RMU's retain term is the distance"),
    ],
)
def test_config_errors(kwargs, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        rmu_args(tmp_path, **kwargs)


def test_trainer_errors(tokenizer, forget_ds, retain_ds, tmp_path):
    def make(model, **kw):
        return RMUTrainer(
            model=model,
            args=rmu_args(tmp_path, **kw),
            forget_dataset=forget_ds,
            retain_dataset=retain_ds,
            processing_class=tokenizer,
        )

    with pytest.raises(ValueError, match=r"`layer_id=4` but the model has 4 decoder layers \(0 .. 3\)"):
        make(llama4(tokenizer), layer_id=4)
    with pytest.raises(ValueError, match="No trainable parameter in `update_modules` \\['attention'\\]"):
        make(llama4(tokenizer), update_modules=["attention"])
    with pytest.raises(ValueError, match="remove `ref_model`"):
        RMUTrainer(
            model=llama4(tokenizer),
            ref_model=llama4(tokenizer),
            args=rmu_args(tmp_path),
            forget_dataset=forget_ds,
            retain_dataset=retain_ds,
            processing_class=tokenizer,
        )
    no_layers = llama4(tokenizer)
    no_layers.model.layers = torch.nn.Sequential(*no_layers.model.layers)  # runs, but no layer list to cut
    with pytest.raises(ValueError, match="no accessible decoder layers"):
        make(no_layers)


def test_drop_in_preference_form_and_no_retain(tokenizer, tmp_path):
    rows = QA[:6]
    ds = Dataset.from_dict(
        {
            "prompt": [qa_prompt(q) for q, _ in rows],
            "chosen": [" I don't know."] * 6,
            "rejected": [" " + a for _, a in rows],
        }
    )
    trainer = RMUTrainer(
        model=llama4(tokenizer), args=rmu_args(tmp_path, max_steps=1), train_dataset=ds, processing_class=tokenizer
    )
    assert len(trainer.train_dataset.forget) == 6 and trainer.reference_plan.kind == "frozen_copy"
    trainer.train()
    alone = RMUTrainer(
        model=llama4(tokenizer),
        args=rmu_args(tmp_path, max_steps=1, retain_weight=0.0),
        forget_dataset=prompt_completion(rows),
        processing_class=tokenizer,
    )
    assert alone.ref_model is None and alone.reference_plan.kind == "none"
    alone.train()
    assert "retain/loss" not in alone.state.log_history[0]


def test_model_card_and_logged_metrics(tokenizer, forget_ds, retain_ds, tmp_path):
    trainer = RMUTrainer(
        model=llama4(tokenizer),
        args=rmu_args(tmp_path, max_steps=1),
        forget_dataset=forget_ds,
        retain_dataset=retain_ds,
        processing_class=tokenizer,
    )
    trainer.train()
    log = trainer.state.log_history[0]
    for key in [
        "loss",
        "forget/loss",
        "retain/loss",
        "forget/control_cosine",
        "forget/activation_norm",
        "num_tokens/forget",
        "num_tokens/retain",
    ]:
        assert key in log, key
    trainer.save_model()
    card = (tmp_path / "out" / "README.md").read_text()
    for needle in [
        "RMU",
        "2403.03218",
        "rmu",
        "`layer_id` | 2",
        "`steering_coeff` | 4.0",
        "`update_layers` | [0, 1, 2]",
        "`retain_weight` | 10.0",
        "a frozen copy of the initial model",
        "@article{li2024wmdp",
    ]:
        assert needle in card, needle
    assert "retain_loss_type" not in card and "`beta`" not in card
    assert os.path.isfile(tmp_path / "out" / "rmu_control_vector.pt")


def test_cli_knows_rmu(tmp_path):
    from trl_unlearn.cli import METHOD_NAMES
    from trl_unlearn.cli.train import METHODS, make_parser, parse

    assert "rmu" in METHOD_NAMES and METHODS["rmu"] == (RMUTrainer, RMUConfig)
    _, training, _ = parse(
        make_parser("rmu"),
        "rmu",
        ["--output_dir", str(tmp_path), "--layer_id", "3", "--update_modules", "mlp.down_proj", "--use_cpu", "true"],
    )
    assert isinstance(training, RMUConfig) and training.update_layers == [1, 2, 3]
    assert training.update_modules == ["mlp.down_proj"] and training.retain_weight == 10.0
    assert training.steering_coeff == "auto"
    _, training, _ = parse(
        make_parser("rmu"), "rmu", ["--output_dir", str(tmp_path), "--steering_coeff", "6.5", "--use_cpu", "true"]
    )
    assert training.steering_coeff == 6.5


def test_patched_forward_of_a_deep_copy_runs_the_copys_weights(tokenizer, forget_ds, retain_ds, tmp_path):
    """After RMU training the model keeps its (transparent) patched forward; a deep copy of it (a relearning attack,
    an EMA, ...) must run its own weights, for the full forward and for the layer forward."""
    model = llama4(tokenizer)
    RMUTrainer(
        model=model,
        args=rmu_args(tmp_path, max_steps=1),
        forget_dataset=forget_ds,
        retain_dataset=retain_ds,
        processing_class=tokenizer,
    ).train()
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.5)
    ids = tokenizer(["the quick brown fox"], return_tensors="pt").input_ids
    with torch.no_grad():
        for m in (model, twin):
            plain = type(m).forward(m, input_ids=ids).logits  # the class's forward: no patch involved
            torch.testing.assert_close(m(input_ids=ids).logits, plain)
            hidden = type(m).forward(m, input_ids=ids, output_hidden_states=True).hidden_states[LAYER + 1]
            to_layer = functools.partial(layer_output, layers=layers_path(m), layer_id=LAYER)
            torch.testing.assert_close(m(input_ids=ids, unlearning_forward=to_layer), hidden)
    assert not torch.allclose(model(input_ids=ids).logits, twin(input_ids=ids).logits)
