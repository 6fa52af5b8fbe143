"""RMU's coefficients on a tiny model: which (steering coefficient, α) pairs forget selectively.

A 4-layer Llama (hidden 32) learns 32 short facts (60 Adam steps), then RMU unlearns 8 of them with the other 24 as
retain data: `layer_id` 2, 40 steps of 4 forget + 4 retain rows at lr 5e-3, everything else RMUConfig's defaults.
For each pair it prints the mean answer log-prob per token of the forget and the retain facts before and after, and
the forget activations' mean cosine with the control vector after the last step. `c` is either `--fixed_coeffs`
(WMDP's 6.5) or `--scales` × the initial forget activations' norm (`steering_coeff="auto"`). About 4 s per pair on
one CPU thread. The table in docs/rmu.md ("Adaptive RMU") is this script's default output.

    python examples/rmu_tiny_defaults.py
    python examples/rmu_tiny_defaults.py --scales 3 --alphas 10
"""

import argparse
import logging
import tempfile

import torch
from datasets import Dataset

from trl_unlearn import RMUConfig, RMUTrainer
from trl_unlearn.toy.tiny import tiny_llama, train_tokenizer

QA = [(f"Who wrote book {i}?", f"Author {i} wrote book {i} in year {1900 + 3 * i}.") for i in range(40)]


def qa_prompt(question):
    return f"Question: {question}\nAnswer:"


def rows(pairs):
    return Dataset.from_dict({"prompt": [qa_prompt(q) for q, _ in pairs], "completion": [" " + a for _, a in pairs]})


def learned_model(tokenizer):
    torch.manual_seed(0)
    model = tiny_llama(tokenizer, hidden_size=32, num_hidden_layers=4, num_attention_heads=2)
    enc = tokenizer([qa_prompt(q) + " " + a + "</s>" for q, a in QA[:32]], padding=True, return_tensors="pt")
    labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        loss = model(**enc, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.state_dict()


def answer_logp(trainer, dataset):
    """Mean label log-prob per token of the completions of a tokenized dataset (full logits)."""
    model = trainer.model.eval()
    batch = trainer.data_collator([{"forget": row, "retain": None} for row in dataset])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    logps = logits.float().log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return logps[batch["completion_mask"][:, 1:].bool()].mean().item()


def run(tokenizer, state, steering, alpha):
    model = tiny_llama(tokenizer, hidden_size=32, num_hidden_layers=4, num_attention_heads=2)
    model.load_state_dict(state)
    kw = {} if alpha is None else {"retain_weight": alpha}
    with tempfile.TemporaryDirectory() as out:
        args = RMUConfig(
            output_dir=out,
            layer_id=2,
            learning_rate=5e-3,
            max_steps=40,
            per_device_train_batch_size=4,
            logging_steps=40,
            use_cpu=True,
            bf16=False,
            report_to=[],
            save_strategy="no",
            gradient_checkpointing=False,
            seed=0,
            disable_tqdm=True,
            **steering,
            **kw,
        )
        trainer = RMUTrainer(
            model=model,
            args=args,
            forget_dataset=rows(QA[:8]),
            retain_dataset=rows(QA[8:32]),
            processing_class=tokenizer,
        )
        forget, retain = trainer.train_dataset.forget, trainer.train_dataset.retain
        before = answer_logp(trainer, forget), answer_logp(trainer, retain)
        trainer.train()
        after = answer_logp(trainer, forget), answer_logp(trainer, retain)
        cosine = [h for h in trainer.state.log_history if "forget/control_cosine" in h][-1]["forget/control_cosine"]
        return trainer.steering_coeff, args.retain_weight, before, after, cosine


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fixed_coeffs", default="6.5", help="Comma-separated fixed steering coefficients.")
    parser.add_argument("--scales", default="2,3,5", help="Comma-separated steering_scale values ('auto').")
    parser.add_argument("--alphas", default="1200,100,10,1", help="Comma-separated retain weights α.")
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.disable(logging.WARNING)
    texts = [qa_prompt(q) + " " + a for q, a in QA] + ["the quick brown fox jumps over the lazy dog"] * 5
    tokenizer = train_tokenizer(texts, vocab_size=320)
    state = learned_model(tokenizer)
    settings = [({"steering_coeff": float(c)}, f"{c} (fixed)") for c in args.fixed_coeffs.split(",") if c]
    settings += [({"steering_scale": float(s)}, f"{s} x norm") for s in args.scales.split(",") if s]
    print("| c | α | forget before → after | retain before → after | cosine |\n|---|---:|---|---|---:|")
    for steering, name in settings:
        for alpha in args.alphas.split(","):
            c, a, before, after, cosine = run(tokenizer, state, steering, float(alpha))
            print(
                f"| {name} = {c:.1f} | {a:g} | {before[0]:.3f} → {after[0]:.3f} | {before[1]:.3f} → {after[1]:.3f} "
                f"| {cosine:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
