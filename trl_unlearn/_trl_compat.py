"""Every private or internal TRL / transformers name the package uses, in one place.

TRL rewrote `DPOTrainer` in 1.16 and moves its helpers between minor releases; pyproject pins `trl>=1.16,<1.17`.
Each name below was checked against TRL 1.16.0 (and transformers 5.24). When TRL changes, this is the file to fix.

Besides these, the trainers override these `DPOTrainer` hooks (checked against 1.16.0): `_prepare_dataset`
(tokenisation), `_precompute_ref_logps` (reference log-probs), `_set_signature_columns_if_needed`,
`_get_train_sampler`, `get_batch_samples`, `compute_loss`, `prediction_step`, and, on themselves, read `_tokenizer`,
`_metrics`, `_precompute_engine` and set TRL's model-card attributes `_tag_names`, `_name`, `_paper`. The private
`Trainer` attributes they touch go through the two functions at the end of this file.

Known cost inherited from TRL: when no reference model is kept (SimNPO, GA, GradDiff, NPO with precomputed
reference log-probs), `DPOTrainer.__init__` hashes the model's weights once (`trl.trainer.utils.hash_module`, the
fingerprint of its reference-log-prob cache, which these trainers do not use): one pass over the weights.
"""

from trl.data_utils import _tokenize as tokenize  # noqa: F401  (tokenizer, text or messages, **kwargs) -> encoding
from trl.data_utils import common_prefix_length, is_conversational, maybe_extract_prompt  # noqa: F401
from trl.kernels.chunked_divergence import ChunkedDivergenceFunction
from trl.models import prepare_deepspeed  # noqa: F401  an inference engine around a model (ZeRO-3 gathering)
from trl.trainer.utils import (
    maybe_gather_lm_head_ctx,  # noqa: F401  gathers ZeRO-3 partitioned head parameters
    pad,  # noqa: F401  (tensors, padding_value, padding_side, pad_to_multiple_of)
    use_adapter,  # noqa: F401  (peft_model, adapter_name) context manager
)

# Private attributes of TRL's / transformers' trainer that the trainers read, set or override (hooks), on themselves.
# `tests/test_architecture.py` fails on any other private upstream name used outside this file.
TRL_ATTRIBUTES = (
    "_metrics",
    "_tokenizer",
    "_precompute_engine",
    "_tag_names",
    "_name",
    "_paper",  # read / set
    "_prepare_dataset",
    "_precompute_ref_logps",
    "_set_signature_columns_if_needed",
    "_get_train_sampler",  # hooks
)

__all__ = [
    "TRL_ATTRIBUTES",
    "ChunkedDivergenceFunction",
    "chunked_kl",
    "common_prefix_length",
    "is_conversational",
    "maybe_extract_prompt",
    "maybe_gather_lm_head_ctx",
    "pad",
    "prepare_deepspeed",
    "prepare_inputs",
    "set_signature_columns",
    "tokenize",
    "use_adapter",
]


def chunked_kl(
    student_hidden,
    student_weight,
    student_bias,
    teacher_hidden,
    teacher_weight,
    teacher_bias,
    *,
    student_transform=(1.0, None),
    teacher_transform=(1.0, None),
):
    """Per-row forward KL(teacher ‖ student) `[N]` fp32 over the full vocabulary, from hidden states `[N, H]` and LM
    heads `[V, H]`, without the `[N, V]` logits; gradients flow to the student. A transform is `(logit_scale,
    softcap)` as `modeling.head_transform` gives it. TRL's `ChunkedDivergenceFunction` (beta 0 = forward KL)."""
    kl, _entropy = ChunkedDivergenceFunction.apply(
        student_hidden,
        student_weight,
        student_bias,
        teacher_hidden,
        teacher_weight,
        teacher_bias,
        0.0,  # beta: forward KL
        1.0,  # temperature
        student_transform[0],
        student_transform[1],
        teacher_transform[0],
        teacher_transform[1],
    )
    return kl


def set_signature_columns(trainer, columns: list[str]) -> None:
    """`Trainer._signature_columns`: the dataset columns the trainer keeps (set once)."""
    if trainer._signature_columns is None:
        trainer._signature_columns = columns


def prepare_inputs(trainer, inputs):
    """`Trainer._prepare_inputs`: a batch moved to the trainer's device (and its context parallelism)."""
    return trainer._prepare_inputs(inputs)
