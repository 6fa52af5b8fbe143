"""Forget rows paired with retain rows: `ForgetRetainPairs` indexed by `ForgetRetainSampler`, then
`ForgetRetainCollator` concatenates forget rows and their retain rows into ONE right-padded batch (padded to the
longest row, never to `max_length`); `batch_counts` counts what a batch scores."""

import logging
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from datasets import Dataset
from torch.utils.data import Sampler

from .._trl_compat import pad

logger = logging.getLogger(__name__)


class StepCounts(NamedTuple):
    """What an optimizer step (or one evaluation batch) scores, summed over micro-batches and ranks: 0-dim tensors."""

    forget_samples: torch.Tensor
    forget_tokens: torch.Tensor
    retain_samples: torch.Tensor
    retain_tokens: torch.Tensor


def batch_counts(batch) -> torch.Tensor:
    """`[4]`: the `StepCounts` fields (forget samples, forget tokens, retain samples, retain tokens) of one collated
    batch, as one tensor to sum over micro-batches and reduce over ranks."""
    scored = batch["completion_mask"][:, 1:].sum(-1).float()
    f = batch["forget_mask"]
    return torch.stack([f.sum().float(), scored[f].sum(), (~f).sum().float(), scored[~f].sum()])


class ForgetRetainPairs(torch.utils.data.Dataset):
    """Forget rows paired with retain rows. Index with `(forget_idx, retain_idx)` (what `ForgetRetainSampler`
    yields) or with an int `i` (evaluation: retain row `i mod len(retain)`). `retain` may be None (no regulariser)."""

    def __init__(self, forget: Dataset, retain: Dataset | None):
        self.forget, self.retain = forget, retain

    def __len__(self) -> int:
        return len(self.forget)

    def __getitem__(self, index):
        if isinstance(index, tuple):
            f, r = index
        else:
            f, r = index, (index % len(self.retain) if self.retain is not None else -1)
        return {"forget": self.forget[int(f)], "retain": self.retain[int(r)] if self.retain is not None else None}


class ForgetRetainSampler(Sampler):
    """Yields `(forget_idx, retain_idx)`: forget rows in a (seed, epoch)-shuffled order, each paired with the next row
    of a (seed, epoch)-shuffled pass over the retain set.

    Every rank builds the same sequence and accelerate hands each rank its own batches, so ranks see different forget
    rows and (while there are at least as many retain as forget rows) different retain rows; a global batch holds the
    same pairs whatever the number of processes. Resuming re-creates the epoch's sequence from (seed, epoch).

    With `lengths=(forget_lengths, retain_lengths)` and `group_size`, rows are grouped by length: within each run of
    `group_size` positions, forget rows and retain rows are each sorted by length, so a batch pads little. Grouping
    reorders within a run only, so every row is still seen once per epoch.
    """

    def __init__(
        self, num_forget: int, num_retain: int, seed: int, shuffle: bool = True, lengths=None, group_size: int = 0
    ):
        self.num_forget, self.num_retain, self.seed, self.shuffle = num_forget, num_retain, seed, shuffle
        self.lengths, self.group_size = lengths, group_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_forget

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        forget = rng.permutation(self.num_forget) if self.shuffle else np.arange(self.num_forget)
        if self.num_retain == 0:
            retain = np.full(self.num_forget, -1)
        else:
            passes = -(-self.num_forget // self.num_retain)
            retain = np.concatenate([rng.permutation(self.num_retain) for _ in range(passes)])[: self.num_forget]
        if self.lengths is not None and self.group_size > 1:
            forget_len, retain_len = (np.asarray(x) for x in self.lengths)
            for start in range(0, self.num_forget, self.group_size):
                run = slice(start, start + self.group_size)
                forget[run] = forget[run][np.argsort(-forget_len[forget[run]], kind="stable")]
                if self.num_retain:
                    retain[run] = retain[run][np.argsort(-retain_len[retain[run]], kind="stable")]
        yield from zip(forget.tolist(), retain.tolist())


@dataclass
class ForgetRetainCollator:
    """Pads forget rows then retain rows into one batch.

    Returns `input_ids`, `attention_mask`, `completion_mask` `[B_f + B_r, T]` (T = longest row after truncation),
    `forget_mask` `[B_f + B_r]` (True on forget rows) and, when the forget rows carry them, `ref_logps` `[B_f]`.
    Also accepts plain rows (no `forget`/`retain` keys): all treated as forget rows (reference precompute).
    """

    pad_token_id: int
    max_length: int | None = None
    truncation_mode: str = "keep_start"
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        if "forget" in examples[0]:
            forget = [ex["forget"] for ex in examples]
            retain = [ex["retain"] for ex in examples if ex["retain"] is not None]
        else:
            forget, retain = examples, []
        rows = forget + retain
        ids = [r["prompt_ids"] + r["completion_ids"] for r in rows]
        mask = [[0] * len(r["prompt_ids"]) + [1] * len(r["completion_ids"]) for r in rows]
        if self.max_length is not None:
            cut = (
                slice(None, self.max_length) if self.truncation_mode == "keep_start" else slice(-self.max_length, None)
            )
            ids, mask = [x[cut] for x in ids], [m[cut] for m in mask]
        batch = {
            "input_ids": self._pad(ids, self.pad_token_id),
            "attention_mask": self._pad([[1] * len(x) for x in ids], 0),
            "completion_mask": self._pad(mask, 0),
            "forget_mask": torch.tensor([True] * len(forget) + [False] * len(retain)),
        }
        # Position 0 has no label; keep_end truncation can start a row inside its completion
        batch["completion_mask"][:, 0] = 0
        if "ref_logps" in forget[0]:
            batch["ref_logps"] = torch.tensor([r["ref_logps"] for r in forget], dtype=torch.float32)
        return batch

    def _pad(self, seqs, value):
        tensors = [torch.tensor(s, dtype=torch.long) for s in seqs]
        return pad(tensors, padding_value=value, padding_side="right", pad_to_multiple_of=self.pad_to_multiple_of)
