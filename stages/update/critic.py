"""Learned value model V(s) for methods that need a critic (PPO/GAE, survey §2.5–§2.6).

The critic is a copy of the policy's transformer trunk (initialised from the policy weights)
with a scalar head, trained by the update stage on the returns the credit method produced. It
implements :class:`stages.credit.base.Critic`: ``values(tensors)`` gives, for every response
position j, the value of the state *before* response token j.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from stages.schema import BatchTensors


def _trunk(policy: nn.Module) -> nn.Module:
    base = getattr(policy, "base_model", None)
    if base is None or base is policy:
        raise ValueError(f"cannot find the transformer trunk of {type(policy).__name__} (no base_model)")
    return base


class ValueModel(nn.Module):
    def __init__(self, policy: nn.Module):
        super().__init__()
        self.trunk = copy.deepcopy(_trunk(policy))
        hidden = policy.config.hidden_size
        self.head = nn.Linear(hidden, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.head.to(next(self.trunk.parameters()).device)

    def forward_values(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, prompt_len: int
    ) -> torch.Tensor:
        """(B, R) values aligned with response tokens (R = input length - prompt_len)."""
        out = self.trunk(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        hidden = out.last_hidden_state
        v = self.head(hidden.float()).squeeze(-1)
        return v[:, prompt_len - 1 : -1]

    @torch.no_grad()
    def values(self, tensors: BatchTensors) -> torch.Tensor:
        device = next(self.parameters()).device
        was_training = self.training
        self.eval()
        try:
            v = self.forward_values(
                tensors.input_ids.to(device),
                tensors.attention_mask.to(device),
                tensors.position_ids.to(device),
                tensors.prompt_len,
            )
        finally:
            self.train(was_training)
        return v.float().cpu() * tensors.response_mask
