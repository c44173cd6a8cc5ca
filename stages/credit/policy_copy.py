"""The helper hooks of a credit method whose trained helper is a copy of the policy.

iStar's implicit PRM (Liu et al. 2025, :mod:`stages.credit.methods.implicit_step`) and StepAgent's
implicit reward model (Deng et al. 2024, :mod:`stages.credit.methods.expert_irl`) both start as a
copy of the policy, are fitted in the credit stage on a copy of the kept one, and are adopted by the
update stage from the fitted state the credit result carries (so a crashed update leaves the kept
copy as it was). The kept copy is saved with every checkpoint as the helper ``helper_name``.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch

from stages.schema import CreditResult


class PolicyCopyHelper:
    """Mixin (before :class:`~stages.credit.base.CreditMethod` in the bases) implementing
    ``bind_policy`` / ``build_helpers`` / ``helper_modules`` / ``update_helpers`` for a helper that
    is a copy of the policy. A subclass names the checkpoint helper, the ``helper_inputs`` key of
    the fitted state, the stat logged when the update stage adopts it, and what the copy is."""

    #: checkpoint helper name of the kept copy (e.g. ``istar_prm``)
    helper_name: str
    #: ``CreditResult.helper_inputs`` key of the fitted copy's state dict
    helper_state_key: str
    #: update-stage stat set to 1.0 when the fitted state is adopted
    adopted_stat: str
    #: what the copy is, for the error message (e.g. ``its implicit PRM``)
    helper_what: str

    _policy: Optional[torch.nn.Module] = None
    #: the kept copy (None until built)
    helper_copy: Optional[torch.nn.Module] = None

    def bind_policy(self, policy: torch.nn.Module) -> None:
        self._policy = policy

    def build_helpers(self, hidden_size: int, seed: int) -> None:
        if self._policy is None:
            raise ValueError(f"credit method {self.name!r}: {self.helper_what} is a copy of the policy; "  # type: ignore[attr-defined]
                             "bind_policy() first")
        self.helper_copy = copy.deepcopy(self._policy).eval()
        self.helper_copy.requires_grad_(True)

    def helper_modules(self) -> dict[str, torch.nn.Module]:
        return {self.helper_name: self.helper_copy} if self.helper_copy is not None else {}

    def update_helpers(self, credit: CreditResult, seed: int) -> dict[str, float]:
        state = credit.helper_inputs.get(self.helper_state_key)
        if self.helper_copy is None or state is None:
            return {}
        self.helper_copy.load_state_dict(state)
        return {self.adopted_stat: 1.0}

    def copy_to_fit(self) -> torch.nn.Module:
        """A copy of the kept copy (built first if needed) for the credit stage to fit: the kept one
        moves only when the update stage adopts the fit."""
        if self.helper_copy is None:
            self.build_helpers(0, 0)
        assert self.helper_copy is not None
        return copy.deepcopy(self.helper_copy)
