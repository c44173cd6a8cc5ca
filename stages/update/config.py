"""Config dataclass of the policy update stage (survey §8, stage 5; §2.6)."""

from __future__ import annotations

from dataclasses import dataclass
from stages.config_fields import param
import stages.update.losses  # noqa: F401  (registers the built-in losses)
from stages.update.loss_registry import loss_names


@dataclass
class UpdateConfig:
    """Keys allowed under ``update.``."""

    loss: str = param("grpo", help="policy loss (registry name, stages/update/loss_registry.py): grpo = clipped "
                      "surrogate, per-sequence token mean (Shao et al. 2024); ppo = token mean (Schulman et al. 2017); turn_ppo / sorl = one ratio and clip per turn (Li et al. 2025b / 2025a); dpo / turn_dpo = DPO on a group's best vs worst trajectory / on turns at one anchor state (Rafailov et al. 2023)",
                      choices=loss_names)
    lr: float = param(1e-3, help="AdamW learning rate of the policy", gt=0)
    weight_decay: float = param(0.0, help="AdamW weight decay", ge=0)
    epochs: int = param(2, help="passes over the batch per iteration", ge=1)
    minibatch_size: int = param(16, help="trajectories per optimizer step", ge=1)
    clip_ratio: float = param(0.2, help="PPO clip epsilon", ge=0)
    kl_coef: float = param(0.0, help="coefficient of the KL(pi || pi_ref) penalty (k3 estimator); 0 = no reference model", ge=0)
    entropy_coef: float = param(0.0, help="entropy bonus coefficient", ge=0)
    max_grad_norm: float = param(1.0, help="gradient clipping threshold", ge=0)
    critic_lr: float = param(1e-3, help="AdamW learning rate of the value model (methods that need a critic)", gt=0)
    value_coef: float = param(1.0, help="weight of the value loss", ge=0)
    value_clip: float = param(0.0, help="value clipping range (0 = off)", ge=0)
    dpo_beta: float = param(0.1, help="beta of the DPO-family losses (update.loss=dpo / turn_dpo): -log sigmoid(beta * log-ratio margin) (Rafailov et al. 2023, eq. 7)", gt=0)
    dpo_nll_coef: float = param(0.0, help="weight of the chosen responses' mean per-token NLL added to the DPO-family losses (RPO, Pang et al. 2024); 0 = plain DPO", ge=0)
    keep_checkpoints: int = param(2, help="policy checkpoints kept on disk (older ones are pruned)", ge=1)
