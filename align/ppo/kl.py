"""KL control: the coefficient beta of the per-token penalty -beta * KL(policy || reference).

Both controllers have the same interface, so the loop never asks which one it holds:
``beta`` now, ``update(kl_per_answer, n_samples)`` after each batch, and a state for checkpoints.
"""
from __future__ import annotations


class FixedKL:
    """beta stays where it was set (``ppo.kl_coef``)."""

    def __init__(self, beta: float):
        self.beta = beta

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.beta

    def state_dict(self) -> dict:
        return {"beta": self.beta}

    def load_state_dict(self, state: dict) -> None:
        self.beta = state["beta"]


class AdaptiveKL(FixedKL):
    """Ziegler et al. (2019): move beta so the measured KL per answer tracks ``target`` over
    ``horizon`` samples (proportional control, error clipped to +-20 %)."""

    def __init__(self, init_beta: float, target: float, horizon: int = 10000):
        super().__init__(init_beta)
        self.target, self.horizon = target, horizon

    def update(self, current_kl: float, n_steps: int) -> float:
        error = max(-0.2, min(0.2, current_kl / self.target - 1))
        self.beta *= 1 + error * n_steps / self.horizon
        return self.beta

    def state_dict(self) -> dict:
        return {"beta": self.beta, "target": self.target, "horizon": self.horizon}


def make_kl_controller(ppo_cfg) -> FixedKL:
    """Adaptive when ``ppo.kl_target`` > 0, else fixed at ``ppo.kl_coef``."""
    if ppo_cfg.kl_target > 0:
        return AdaptiveKL(ppo_cfg.kl_coef, ppo_cfg.kl_target, ppo_cfg.kl_horizon)
    return FixedKL(ppo_cfg.kl_coef)
