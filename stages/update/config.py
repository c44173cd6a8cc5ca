"""Config dataclass of the policy update stage (survey §8, stage 5; §2.6)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class UpdateConfig:
    """Keys allowed under ``update.``."""

    loss: str = "grpo"  # grpo (per-sequence token mean, Shao et al. 2024) | ppo (token mean, Schulman et al. 2017)
    lr: float = 1e-3  # AdamW learning rate of the policy
    weight_decay: float = 0.0  # AdamW weight decay
    epochs: int = 2  # passes over the batch per iteration
    minibatch_size: int = 16  # trajectories per optimizer step
    clip_ratio: float = 0.2  # PPO clip epsilon
    kl_coef: float = 0.0  # coefficient of the KL(pi || pi_ref) penalty (k3 estimator); 0 = no reference model
    entropy_coef: float = 0.0  # entropy bonus coefficient
    max_grad_norm: float = 1.0  # gradient clipping threshold
    critic_lr: float = 1e-3  # AdamW learning rate of the value model (methods that need a critic)
    value_coef: float = 1.0  # weight of the value loss
    value_clip: float = 0.0  # value clipping range (0 = off)
    keep_checkpoints: int = 2  # policy checkpoints kept on disk (older ones are pruned)
