"""What keeps a long run from losing work: graceful stop on signals, and non-finite guards.

- :class:`GracefulStop`: the first SIGTERM/SIGINT asks the loop to finish its step, save a
  checkpoint and exit (:class:`Interrupted`); a second one exits at once.
- :class:`NonFiniteGuard`: a step whose loss or gradients hold NaN/inf makes no update and is
  counted; past ``run.max_nonfinite_steps`` the run stops with :class:`NonFiniteError`, and
  no checkpoint is written after the bad steps, so the last one stays good.
"""
from __future__ import annotations

import os
import signal
import sys

import torch


class Interrupted(Exception):
    """The run stopped on a signal after saving a checkpoint (exit status 128 + signal)."""

    def __init__(self, signum: int, checkpoint=None):
        self.signum, self.checkpoint = signum, checkpoint
        name = signal.Signals(signum).name
        where = f"checkpoint saved to {checkpoint}" if checkpoint else "no checkpoint saved"
        super().__init__(f"stopped by {name}; {where}; continue with --resume")


class NonFiniteError(FloatingPointError):
    pass


class GracefulStop:
    """Install on entry (main thread only), restore the previous handlers on exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def requested_anywhere(self) -> bool:
        """True on every rank once any rank got a signal (all must stop at the same step)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.requested
        from .distributed import device

        flag = torch.tensor([self.signum or 0], device=device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and self.signum is None:
            self.signum = int(flag.item())
        return bool(flag.item())

    def _handle(self, signum, frame):
        if self.signum is not None:
            print(f"\nsecond {signal.Signals(signum).name}: exiting now", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.signum = signum
        print(f"\n{signal.Signals(signum).name} received: finishing this step, saving a checkpoint, "
              "then exiting (send it again to exit at once)", file=sys.stderr, flush=True)

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()
        return False


def grads_finite(params) -> bool:
    return all(torch.isfinite(p.grad).all() for p in params if p.grad is not None)


class NonFiniteGuard:
    def __init__(self, limit: int):
        self.limit, self.skipped = limit, 0

    def skip(self, params, where: str) -> None:
        """Drop this step's gradients (optimizers skip parameters whose grad is None, so Adam's
        moments do not move either) and count it; raise past the limit."""
        for p in params:
            p.grad = None
        self.skipped += 1
        print(f"warning: non-finite loss or gradients at {where}; step skipped "
              f"({self.skipped} so far, limit run.max_nonfinite_steps={self.limit})",
              file=sys.stderr, flush=True)
        if self.skipped > self.limit:
            raise NonFiniteError(
                f"{self.skipped} steps with NaN/inf loss or gradients (last at {where}), more than "
                f"run.max_nonfinite_steps={self.limit}; stopped without saving, the last checkpoint is "
                "intact (lower the learning rate, check the data/reward, then --resume)")


def trainer_callback(stop: GracefulStop, guard: NonFiniteGuard):
    """HF Trainer hooks: skip non-finite optimizer steps; on a signal, save and stop."""
    from transformers import TrainerCallback

    class Resilience(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            params = [p for p in model.parameters() if p.requires_grad]
            if not grads_finite(params):
                guard.skip(params, f"step {state.global_step + 1}")

        def on_step_end(self, args, state, control, **kw):
            if stop.requested_anywhere():
                control.should_save = True
                control.should_training_stop = True

    return Resilience()
