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
from contextlib import contextmanager


class Interrupted(Exception):
    """The run stopped on a signal after saving a checkpoint (exit status 128 + signal)."""

    def __init__(self, signum: int, checkpoint=None):
        self.signum, self.checkpoint = signum, checkpoint
        name = signal.Signals(signum).name
        where = f"checkpoint saved to {checkpoint}" if checkpoint else "no checkpoint saved"
        super().__init__(f"stopped by {name}; {where}; continue with --resume")


class NonFiniteError(FloatingPointError):
    pass


class DivergenceError(FloatingPointError):
    """Training moved the adapter further than any useful update goes; the run stops unsaved."""


# A LoRA update ten times the weight it adapts (||scaling * B A|| > 10 ||W||) has replaced the
# layer rather than tuned it. Measured (SmolLM2-135M, DPO, 8 steps): lr 5e-4 reaches 0.005,
# 5e-3 0.04, and 0.5 jumps 1.3 -> 40 -> 87 at steps 2-4; a tiny random test model at a deliberately
# high 1e-2 reaches 2.5 in 6 PPO iterations (its weights are small), so the limit leaves room.
MAX_UPDATE_RATIO = 10.0


def lora_update_ratio(model) -> tuple[float, str]:
    """The largest ||scaling * B A||_F / ||W||_F over the model's *trained* LoRA layers, and
    that layer's name. ||BA||^2 = sum((A A^T) * (B^T B)): two r x r products, no out x in one."""
    import torch

    names, ratios = [], []
    with torch.no_grad():
        for name, m in model.named_modules():
            lora_a, lora_b = getattr(m, "lora_A", None), getattr(m, "lora_B", None)
            base = getattr(m, "base_layer", None)
            if lora_a is None or lora_b is None or base is None or not hasattr(base, "weight"):
                continue
            for key in lora_a.keys():
                a, b = lora_a[key].weight, lora_b[key].weight
                if not a.requires_grad:
                    continue
                # under FSDP2 each rank holds a shard: the adapter is gathered (small), the base's
                # norm reduced from each rank's shard (never gathered); plain tensors pass through
                a, b = _whole(a).float(), _whole(b).float()
                sq = ((a @ a.T) * (b.T @ b)).sum().clamp(min=0)
                norm = _whole(base.weight.float().norm())
                ratios.append(sq.sqrt() * abs(float(m.scaling[key])) / norm.clamp(min=1e-12))
                names.append(f"{name} ({key})")
    worst, where = 0.0, ""
    # one copy to the host for all layers (a GPU would otherwise wait once per layer, every step)
    for name, ratio in zip(names, torch.stack(ratios).tolist() if ratios else []):
        if not ratio <= worst:  # NaN counts as the worst
            worst, where = ratio, name
    return worst, where


def _whole(t):
    """A DTensor (an FSDP2 shard, or a reduction of one) as a plain whole tensor."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def check_divergence(model, where: str) -> None:
    """Stop a run whose adapter has blown up (an in-range learning rate that diverges leaves
    finite but meaningless weights, which would otherwise be saved as a result)."""
    ratio, layer = lora_update_ratio(model)
    if not ratio <= MAX_UPDATE_RATIO:
        raise DivergenceError(
            f"training diverged at {where}: the adapter's update at {layer} is {ratio:.3g}x the size of "
            f"the weight it adapts (tuned adapters stay below ~0.1; limit {MAX_UPDATE_RATIO:g}); "
            "stopped without saving a result -- lower the learning rate (the last checkpoint, if any, "
            "predates it)")


class Stopped(BaseException):
    """A signal ended a command that has no checkpoint to save (export, eval); what it was
    writing has been removed (exit status 128 + signal). A BaseException, as KeyboardInterrupt
    is, so that no library's ``except Exception`` swallows it."""

    def __init__(self, signum: int, what: str):
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}; {what}")


@contextmanager
def stop_on_signals(what: str):
    """SIGTERM/SIGINT raise :class:`Stopped` in the main thread, so that every ``finally`` and
    ``except BaseException`` on the way out runs: temp folders are removed and child processes
    ended (the default SIGTERM action kills the process on the spot, orphaning its children)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum, frame):
        raise Stopped(signum, what)

    previous = {s: signal.signal(s, handle) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def end_process_group(proc, grace: float = 20.0) -> None:
    """End a child started with ``start_new_session=True`` and everything it started (vLLM's
    EngineCore is a grandchild): SIGTERM to the group, SIGKILL after ``grace`` seconds."""
    import subprocess

    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            pass
    try:  # the group may outlive its leader
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
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
        import torch
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
    import torch

    # this rank's shard of an FSDP2-sharded gradient (the caller agrees across ranks)
    grads = [g.to_local() if hasattr(g, "to_local") else g for g in (p.grad for p in params) if g is not None]
    # one reduction and one host sync for all parameters, not one per parameter
    return not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())


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

        def on_step_end(self, args, state, control, model=None, **kw):
            if model is not None:
                check_divergence(model, f"step {state.global_step}")  # before this step's save
            if stop.requested_anywhere():
                control.should_save = True
                control.should_training_stop = True

    return Resilience()
