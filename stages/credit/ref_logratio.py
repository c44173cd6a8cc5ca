"""The log-ratio of the behaviour policy to the frozen reference policy on policy tokens.

``log pi_old(y_t | y_<t) - log pi_ref(y_t | y_<t)`` is the implicit token reward of the
DPO family: "From r to Q*" reads it as the token-level credit of a DPO-trained policy
(Rafailov et al. 2024; survey §3.1.3), T-REG regularizes with it (§3.1.2), and SPRO and PRL
turn its cumulative sums into process rewards (§3.3.1). The methods that need it declare
``needs = {"ref_logprobs"}`` and the stages provide ``ctx.ref_logprobs``.
"""

from __future__ import annotations

import torch

from stages.credit.base import CreditContext
from stages.credit.segments import policy_token_mask
from stages.schema import BatchTensors


def ref_logratio(name: str, tensors: BatchTensors, ctx: CreditContext) -> torch.Tensor:
    """(B, R) float32 ``log pi_old - log pi_ref`` on policy tokens, 0 elsewhere.

    ``ctx.ref_logprobs`` must be (B, R) and finite on every policy token; otherwise
    ``ValueError`` names the method ``name``, the position and the value."""
    ref = ctx.ref_logprobs
    assert ref is not None  # CreditMethod.__call__ checked ``needs``
    ref = torch.as_tensor(ref, dtype=torch.float32)
    if tuple(ref.shape) != tuple(tensors.old_logprobs.shape):
        raise ValueError(
            f"credit method {name!r}: ref_logprobs must have shape (B, R) = {tuple(tensors.old_logprobs.shape)}, "
            f"got {tuple(ref.shape)}"
        )
    mask = policy_token_mask(tensors)
    bad = ~torch.isfinite(ref) & (mask > 0)
    if bool(bad.any()):
        b, j = (int(x) for x in bad.nonzero()[0])
        raise ValueError(f"credit method {name!r}: ref_logprobs[{b}, {j}] must be finite on a policy token, got {float(ref[b, j])}")
    return (tensors.old_logprobs.float() - ref) * mask
