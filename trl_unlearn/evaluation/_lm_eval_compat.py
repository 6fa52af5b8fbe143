"""Every lm-eval internal the package relies on, in one place (as `_trl_compat.py` is for TRL).

Checked against lm-eval 0.4.10, 0.4.11 and 0.4.13 (pyproject: `lm-eval>=0.4.10,<0.5`). Public extension points are
used where lm-eval has them: the model class is an ``HFLM`` subclass registered under `BACKBONE_MODEL_NAME` with
``lm_eval.api.registry.register_model``, and the task manager a ``TaskManager`` subclass. What is private:

- ``HFLM._model_call`` (overridden): the one forward lm-eval's log-likelihood requests run;
- ``TaskManager.load`` (0.4.11+) and ``load_task_or_group`` (0.4.10) (wrapped): what ``simple_evaluate`` calls to
  build task objects;
- ``lm_eval.evaluator.add_env_info`` and ``get_git_commit_hash`` (replaced for one run): an environment survey and a
  ``git describe`` that are not part of a `HarnessReport`.
"""

import contextlib

BACKBONE_MODEL_NAME = "trl-unlearn-backbone"


@contextlib.contextmanager
def _replaced(owner, name: str, value):
    """`owner.name` is `value` inside the block, then what it was."""
    saved = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, saved)


@contextlib.contextmanager
def quiet_run(env_info: bool = True):
    """One ``simple_evaluate`` without ``git describe`` in the caller's folder (outside a git checkout it prints
    "fatal: not a git repository" at every run) and, with `env_info=False`, without lm-eval's survey of the
    environment (torch's ``collect_env``: pip, nvidia-smi, ... subprocesses, ~1 s)."""
    import lm_eval.evaluator

    with contextlib.ExitStack() as stack:
        if not env_info and hasattr(lm_eval.evaluator, "add_env_info"):
            stack.enter_context(_replaced(lm_eval.evaluator, "add_env_info", lambda results: None))
        if hasattr(lm_eval.evaluator, "get_git_commit_hash"):
            stack.enter_context(_replaced(lm_eval.evaluator, "get_git_commit_hash", lambda: None))
        yield


_CLASSES = {}


def backbone_lm_class():
    """An ``HFLM`` whose log-likelihood forwards run the backbone and apply the LM head's weight
    (`modeling.head_logits`: the model's logit scaling and soft-capping; ZeRO-3 partitioned head parameters gathered
    for it), as training and the QA probes do, instead of calling the model: under DeepSpeed ZeRO-3 (0.19, CPU),
    lm-eval's ``model(input_ids)`` between training steps left a parameter partitioned in the next step's backward (a
    size-0 tensor). Generation (``generate_until`` tasks) still calls the model's ``generate``. Registered with lm-eval
    as `BACKBONE_MODEL_NAME` (built and registered once, on first use: lm-eval is an optional dependency)."""
    if "backbone" not in _CLASSES:
        import torch
        from lm_eval.api.registry import register_model
        from lm_eval.models.huggingface import HFLM

        from .._trl_compat import maybe_gather_lm_head_ctx
        from ..modeling import causal_lm, head_logits, lm_head

        class BackboneLM(HFLM):
            def _model_call(self, inps, attn_mask=None, labels=None):
                if attn_mask is not None or labels is not None:  # encoder-decoder models
                    return super()._model_call(inps, attn_mask, labels)
                model = causal_lm(self.model)
                weight, bias, _ = lm_head(model)
                with torch.no_grad():
                    hidden = model.base_model(input_ids=inps, use_cache=False)[0]
                    with maybe_gather_lm_head_ctx(weight, bias):  # logits in the model's dtype, as lm-eval's forward
                        return head_logits(model, hidden).to(hidden.dtype)

        _CLASSES["backbone"] = register_model(BACKBONE_MODEL_NAME)(BackboneLM)
    return _CLASSES["backbone"]


def reusing_task_manager():
    """A ``TaskManager`` subclass that builds the task objects of a task list once and hands out the same ones again,
    so repeated runs do not read the tasks' datasets again. A reused task scores as a new one: lm-eval builds its
    requests again at every ``evaluate``, and ``simple_evaluate`` sets its few-shot count and re-seeds its few-shot
    sampler every time. ``load`` is what ``simple_evaluate`` calls (lm-eval 0.4.11+), ``load_task_or_group`` what
    0.4.10's ``get_task_dict`` calls."""
    if "tasks" not in _CLASSES:
        from lm_eval.tasks import TaskManager

        class ReusingTaskManager(TaskManager):
            def _reuse(self, build, task_list):
                key = tuple(task_list) if isinstance(task_list, list) else task_list
                if not all(isinstance(k, str) for k in (key if isinstance(key, tuple) else (key,))):
                    return build(task_list)  # configs or task objects: not cached
                cache = self.__dict__.setdefault("_built", {})
                if (build.__name__, key) not in cache:
                    cache[build.__name__, key] = build(task_list)
                return cache[build.__name__, key]

            def load(self, task_list):
                return self._reuse(super().load, task_list)

            def load_task_or_group(self, task_list=None):
                return self._reuse(super().load_task_or_group, task_list)

        _CLASSES["tasks"] = ReusingTaskManager
    return _CLASSES["tasks"]
