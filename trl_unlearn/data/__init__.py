"""Forget and retain data: files and TRL dataset formats in, one padded forget+retain batch out.

`files` (TOFU's layout, raw-text corpora, the one JSON / JSON-lines reader) → `formats` (TRL formats, the plain QA
template, `PromptFormat`, checks) → `tokenize` (token ids; windows of raw text; QA pairs for scoring) → `pairing`
(forget rows paired with retain rows, the sampler and the collator). The names users call are exported here.
"""

from .files import drop_short_documents, load_text_corpus, load_tofu_split, write_tofu_layout
from .formats import PROMPT_TEMPLATE, PromptFormat, qa_to_trl, resolve_prompt_format
from .tokenize import text_documents, text_windows

__all__ = [
    "PROMPT_TEMPLATE",
    "PromptFormat",
    "drop_short_documents",
    "load_text_corpus",
    "load_tofu_split",
    "qa_to_trl",
    "resolve_prompt_format",
    "text_documents",
    "text_windows",
    "write_tofu_layout",
]
