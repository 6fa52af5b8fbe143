"""Training callbacks of the trainers themselves (the evaluation probes live in `evaluation/callback.py`).

Transformers' built-in `TrainingArguments(enable_jit_checkpoint=True)` (`JITCheckpointCallback`) also saves a
checkpoint on SIGTERM; `PreemptionCallback` is kept for what that one lacks (transformers 5.x):
- every rank stops at the same step (one tiny all-reduce per step): the built-in flag is per process, so ranks
  signalled at different moments would enter the checkpoint's collectives (ZeRO-3, FSDP) at different steps and hang;
- the step it stopped at is recorded (`stopped_at`): the trainer's card and the CLI's exit code (143) report it;
- the handler is installed for `train` only, in the main thread only, and restored even when training raises (the
  built-in one is installed at trainer creation and restored at `on_train_end` only).
The unlearning configs turn `enable_jit_checkpoint` off with a warning, so only one handler owns SIGTERM.
"""

import signal
import threading

import torch
from transformers import TrainerCallback


class PreemptionCallback(TrainerCallback):
    """On SIGTERM (a preempted or cancelled job), finish the current optimizer step, save a checkpoint and stop.

    Ranks agree through one tiny all-reduce per step, so they all stop at the same step. Use as a context manager
    around `Trainer.train`: it installs the SIGTERM handler (main thread only) and restores the previous one."""

    def __init__(self, accelerator):
        self.accelerator, self.requested, self.stopped_at, self._previous = accelerator, False, None, None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, lambda *_: setattr(self, "requested", True))
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def on_step_end(self, args, state, control, **kwargs):
        flag = torch.tensor(float(self.requested), device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            flag = self.accelerator.reduce(flag, reduction="sum")
        if flag.item() > 0:
            control.should_save = control.should_training_stop = True
            self.stopped_at = state.global_step
        return control
