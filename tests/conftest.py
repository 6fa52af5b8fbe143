import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402

from trl_unlearn.toy.tiny import tiny_llama, train_tokenizer

# Tiny models: one thread is faster than two (no thread synchronisation per tiny op), and steadier on a busy machine
torch.set_num_threads(1)

QA = [(f"Who wrote book {i}?", f"Author {i} wrote book {i} in year {1900 + 3 * i}.") for i in range(40)]


def qa_prompt(q):
    return f"Question: {q}\nAnswer:"


@pytest.fixture(scope="session")
def tokenizer():
    texts = [qa_prompt(q) + " " + a for q, a in QA] + ["the quick brown fox jumps over the lazy dog"] * 5
    return train_tokenizer(texts, vocab_size=320)


@pytest.fixture
def model(tokenizer):
    return tiny_llama(tokenizer, hidden_size=32, num_hidden_layers=2, num_attention_heads=2)


def prompt_completion(rows, conversational=False):
    if conversational:
        return Dataset.from_dict(
            {
                "prompt": [[{"role": "user", "content": q}] for q, _ in rows],
                "completion": [[{"role": "assistant", "content": a}] for _, a in rows],
            }
        )
    return Dataset.from_dict({"prompt": [qa_prompt(q) for q, _ in rows], "completion": [" " + a for _, a in rows]})


@pytest.fixture
def forget_ds():
    return prompt_completion(QA[:8])


@pytest.fixture
def retain_ds():
    return prompt_completion(QA[8:32])


def cpu_args(config_cls, tmp_path, **kw):
    defaults = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        max_steps=2,
        learning_rate=1e-3,
        logging_steps=1,
        use_cpu=True,
        bf16=False,
        report_to=[],
        save_strategy="no",
        gradient_checkpointing=False,
        seed=0,
        dataloader_num_workers=0,
    )
    defaults.update(kw)
    return config_cls(**defaults)


def learn_qa(model, tokenizer, rows=QA[:32], steps=60, lr=1e-2):
    """`model` after `steps` full-batch Adam steps of NLL on the QA `rows` (question prompt + answer + EOS): a
    tiny model that knows the forget and retain facts (a few seconds). Returns its state dict."""
    texts = [qa_prompt(q) + " " + a + "</s>" for q, a in rows]
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        loss = model(**enc, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.state_dict()
