"""Stage 5 of survey §8: the policy update.

:class:`PolicyTrainer` consumes only per-token advantages (and returns, for methods with a
critic), so every credit method composes with every loss:

* ``update.loss`` names a loss of :mod:`stages.update.loss_registry` (built in: ``ppo``, PPO-clip
  with token-mean aggregation, Schulman et al. 2017; ``grpo``, the same clipped surrogate with
  per-sequence token-mean aggregation, Shao et al. 2024). The trainer looks it up by name and
  provides what it declares in ``needs``; the entropy bonus and the KL penalty are aggregated
  the way the loss declares (``aggregation``).
* DPO-family losses (``needs`` ``trajectory_pairs`` / ``turn_pairs``): the trainer builds the
  preference pairs once per update from the credit stage's advantages
  (:mod:`stages.update.pairs`), orders the rows group by group so that a mini-batch holds whole
  groups, and hands each mini-batch its own pairs, renumbered (logged: ``<need>_built``).
* optional k3 KL to a frozen reference policy (``update.kl_coef > 0``), entropy bonus,
  value loss for the critic, AdamW, gradient clipping, shuffled mini-batches.
* NaN/inf guard: a mini-batch whose loss or gradient norm is not finite is skipped (no
  optimizer step) and the reason is counted in the returned statistics.
"""

from __future__ import annotations

import copy
import math
from collections import Counter
from typing import Any, Optional

import torch

from stages.rollout.policy import sequence_logprobs
from stages.schema import BatchTensors, CreditResult
from stages.update.config import UpdateConfig
from stages.update.critic import ValueModel
from stages.update.loss_registry import get_loss
from stages.update.losses import aggregate, kl_k3, value_loss
from stages.update.pairs import group_major_permutation, restrict, trajectory_pairs, turn_pairs


class PolicyTrainer:
    def __init__(
        self,
        policy: torch.nn.Module,
        cfg: UpdateConfig,
        temperature: float,
        needs_critic: bool,
        reference: Optional[torch.nn.Module] = None,
    ):
        self.policy = policy
        self.cfg = cfg
        self.temperature = temperature
        self.loss = get_loss(cfg.loss)
        self.optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.reference: Optional[torch.nn.Module] = None
        if cfg.kl_coef > 0 or "ref_logprobs" in self.loss.needs:
            self.reference = reference if reference is not None else copy.deepcopy(policy)
            self.reference.eval().requires_grad_(False)
        self._pairs: dict[str, torch.Tensor] = {}
        self.critic: Optional[ValueModel] = ValueModel(policy) if needs_critic else None
        self.critic_optimizer = (
            torch.optim.AdamW(self.critic.parameters(), lr=cfg.critic_lr) if self.critic is not None else None
        )

    @property
    def device(self) -> torch.device:
        return next(self.policy.parameters()).device

    def optim_state(self) -> dict[str, Any]:
        state = {"policy": self.optimizer.state_dict()}
        if self.critic_optimizer is not None:
            state["critic"] = self.critic_optimizer.state_dict()
        return state

    def load_optim_state(self, state: Optional[dict[str, Any]]) -> None:
        if not state:
            return
        self.optimizer.load_state_dict(state["policy"])
        if self.critic_optimizer is not None and "critic" in state:
            self.critic_optimizer.load_state_dict(state["critic"])

    def _rows(self, tensors: BatchTensors, credit: CreditResult, rows: torch.Tensor) -> dict[str, Any]:
        """Mini-batch slice with the response trimmed to its longest row."""
        resp_len = int(tensors.response_mask[rows].nonzero()[:, 1].max().item()) + 1 if bool(
            tensors.response_mask[rows].any()
        ) else 1
        P = tensors.prompt_len
        dev = self.device
        cut = slice(0, P + resp_len)
        out = {
            "input_ids": tensors.input_ids[rows][:, cut].to(dev),
            "attention_mask": tensors.attention_mask[rows][:, cut].to(dev),
            "position_ids": tensors.position_ids[rows][:, cut].to(dev),
            "mask": tensors.response_mask[rows][:, :resp_len].to(dev),
            "old_logprobs": tensors.old_logprobs[rows][:, :resp_len].to(dev),
            "advantages": credit.advantages[rows][:, :resp_len].to(dev).float(),
        }
        if "turn_ids" in self.loss.needs:
            out["turn_ids"] = tensors.turn_ids[rows][:, :resp_len].to(dev)
        for name, pairs in self._pairs.items():  # the pairs inside this mini-batch, renumbered
            out[name] = restrict(pairs, rows, tensors.input_ids.shape[0]).to(dev)
        if credit.returns is not None:
            out["returns"] = credit.returns[rows][:, :resp_len].to(dev).float()
        if credit.values is not None:
            out["old_values"] = credit.values[rows][:, :resp_len].to(dev).float()
        return out

    def build_pairs(self, tensors: BatchTensors, credit: CreditResult) -> dict[str, torch.Tensor]:
        """The preference pairs the loss needs, over the whole batch, from the credit stage's
        advantages (:mod:`stages.update.pairs`); empty for losses without pairs."""
        out: dict[str, torch.Tensor] = {}
        adv, mask = credit.advantages.float(), tensors.response_mask
        if "trajectory_pairs" in self.loss.needs:
            out["trajectory_pairs"] = trajectory_pairs(adv, mask, tensors.index)
        if "turn_pairs" in self.loss.needs:
            out["turn_pairs"] = turn_pairs(adv, mask, tensors.index, tensors.turn_ids, tensors.turn_anchors)
        return out

    def update(self, tensors: BatchTensors, credit: CreditResult, seed: int) -> dict[str, float]:
        """One stage-5 update on a batch; returns statistics (means over mini-batches)."""
        cfg = self.cfg
        if self.critic is not None and credit.returns is None:
            raise ValueError("the critic needs value targets but the credit method returned no returns")
        gen = torch.Generator().manual_seed(seed)
        B = tensors.input_ids.shape[0]
        self._pairs = self.build_pairs(tensors, credit)
        self.policy.train()
        if self.critic is not None:
            self.critic.train()
        sums: Counter[str] = Counter()
        n_mb = 0
        skipped: Counter[str] = Counter()
        for _ in range(cfg.epochs):
            # pair losses: whole groups per mini-batch, so a pair is never split between two
            perm = group_major_permutation(tensors.index, gen) if self.loss.needs_pairs else torch.randperm(B, generator=gen)
            for start in range(0, B, cfg.minibatch_size):
                rows = perm[start : start + cfg.minibatch_size]
                mb = self._rows(tensors, credit, rows)
                if not bool(mb["mask"].any()):
                    continue
                stats, reason = self._step(mb)
                n_mb += 1
                if reason:
                    skipped[reason] += 1
                for k, v in stats.items():
                    sums[k] += v
        self.policy.eval()
        out = {k: v / max(n_mb, 1) for k, v in sums.items()}
        for name, pairs in self._pairs.items():
            out[f"{name}_built"] = float(pairs.shape[0])
        self._pairs = {}
        out["minibatches"] = float(n_mb)
        out["skipped_steps"] = float(sum(skipped.values()))
        for reason, count in skipped.items():
            out[f"skipped.{reason}"] = float(count)
        return out

    def _step(self, mb: dict[str, Any]) -> tuple[dict[str, float], str]:
        cfg = self.cfg
        mask = mb["mask"]
        agg = self.loss.aggregation
        logprobs, entropy = sequence_logprobs(
            self.policy, mb["input_ids"], mb["attention_mask"], mb["position_ids"],
            mb["input_ids"].shape[1] - mask.shape[1], temperature=self.temperature,
        )
        ref_lp = None
        if self.reference is not None:
            with torch.no_grad():
                ref_lp, _ = sequence_logprobs(
                    self.reference, mb["input_ids"], mb["attention_mask"], mb["position_ids"],
                    mb["input_ids"].shape[1] - mask.shape[1], temperature=self.temperature,
                )
        provided = {"ref_logprobs": ref_lp} if ref_lp is not None else {}
        for name in ("turn_ids", "trajectory_pairs", "turn_pairs"):
            if name in self.loss.needs:
                provided[name] = mb[name]
        pg_loss, stats = self.loss(logprobs, mb["old_logprobs"], mb["advantages"], mask, cfg, **provided)
        ent = aggregate(entropy, mask, agg)
        loss = pg_loss - cfg.entropy_coef * ent
        stats.update({"pg_loss": float(pg_loss.detach()), "entropy": float(ent.detach())})
        if cfg.kl_coef > 0:
            kl = aggregate(kl_k3(logprobs, ref_lp), mask, agg)
            loss = loss + cfg.kl_coef * kl
            stats["kl_ref"] = float(kl.detach())
        v_loss = None
        if self.critic is not None:
            values = self.critic.forward_values(
                mb["input_ids"], mb["attention_mask"], mb["position_ids"], mb["input_ids"].shape[1] - mask.shape[1]
            )
            v_loss = cfg.value_coef * value_loss(values, mb["returns"], mask, mb.get("old_values"), cfg.value_clip)
            stats["value_loss"] = float(v_loss.detach())
        stats["loss"] = float(loss.detach())
        if not math.isfinite(stats["loss"]) or (v_loss is not None and not math.isfinite(stats["value_loss"])):
            self._zero_grad()
            return {k: v for k, v in stats.items() if math.isfinite(v)}, "nonfinite_loss"
        self._zero_grad()
        total = loss + (v_loss if v_loss is not None else 0.0)
        total.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.max_grad_norm)
        stats["grad_norm"] = float(grad_norm)
        if self.critic is not None:
            stats["critic_grad_norm"] = float(
                torch.nn.utils.clip_grad_norm_(self.critic.parameters(), cfg.max_grad_norm)
            )
        if not math.isfinite(stats["grad_norm"]) or not math.isfinite(stats.get("critic_grad_norm", 0.0)):
            self._zero_grad()
            return {k: v for k, v in stats.items() if math.isfinite(v)}, "nonfinite_grad"
        self.optimizer.step()
        if self.critic_optimizer is not None:
            self.critic_optimizer.step()
        self._zero_grad()
        return stats, ""

    def _zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.critic_optimizer is not None:
            self.critic_optimizer.zero_grad(set_to_none=True)
