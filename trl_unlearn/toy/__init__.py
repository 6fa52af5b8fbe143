"""Toy material for the embedded default, the tests and the benchmarks, offline: a tiny Llama and a tokenizer
trained on the texts it will see (`tiny`), and a synthetic TOFU-shaped fictitious-author set (`synthetic`)."""

from .synthetic import iter_texts, make_fictitious_authors, make_tofu_like
from .tiny import CHAT_TEMPLATE, tiny_llama, train_tokenizer

__all__ = ["CHAT_TEMPLATE", "iter_texts", "make_fictitious_authors", "make_tofu_like", "tiny_llama", "train_tokenizer"]
