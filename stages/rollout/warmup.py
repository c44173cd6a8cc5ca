"""The tiny policy's supervised *format* warm-up and the helpers that play or measure a policy on a
family's instances (stage 2; split out of :mod:`stages.rollout.policy`, whose :func:`get_policy`
runs :func:`warmup` once per built model and caches the result).

The warm-up teaches a freshly initialised model the action *format* of a family from its
``warmup_corpus()`` (instances of a separate "warmup" stream, never train/eval), so that its first
rollouts produce well-formed actions; the policy's credit problem is left to RL.
"""

from __future__ import annotations

import math
import time
from typing import Any, Optional

import torch

from environments.base import TaskFamily
from stages.rollout.config import ModelConfig, RolloutConfig

#: episodes sampled after the warm-up to measure the valid-action rate
WARMUP_EVAL_EPISODES = 64


def _tokenize_episodes(tokenizer: Any, corpus: list[tuple[str, list[tuple[str, str]]]]):
    """Piecewise tokenization exactly as the agent loop does it: prompt, then per turn the
    action (with its ``"\\n"`` stop token) and the observation, each encoded on its own."""
    pieces: list[str] = []
    kinds: list[tuple[int, bool]] = []  # (episode index, is_action)
    for e, (prompt, steps) in enumerate(corpus):
        pieces.append(prompt)
        kinds.append((e, False))
        for action, obs in steps:
            pieces.append(action if action.endswith("\n") else action + "\n")
            kinds.append((e, True))
            pieces.append(obs)
            kinds.append((e, False))
    encoded = tokenizer(pieces, add_special_tokens=False)["input_ids"] if pieces else []
    ids: list[list[int]] = [[] for _ in corpus]
    mask: list[list[bool]] = [[] for _ in corpus]
    for (e, is_action), piece in zip(kinds, encoded):
        ids[e].extend(piece)
        mask[e].extend([is_action] * len(piece))
    return ids, mask


def play_instances(model, tokenizer, family: TaskFamily, instances: list, seed: int, uid_prefix: str,
                   episode_seeds: Optional[list[int]] = None, cfg: Optional[RolloutConfig] = None) -> list:
    """One episode per instance with ``model`` (transformers engine, no sandbox), environments
    closed afterwards: the trajectories (for diagnostics and offline data such as PRM labels)."""
    from stages.rollout.agent_loop import run_episodes
    from stages.rollout.hf_engine import HFEngine

    seeds = episode_seeds if episode_seeds is not None else [0] * len(instances)
    envs = [family.make(inst, episode_seed=s) for inst, s in zip(instances, seeds)]
    try:
        return run_episodes(
            HFEngine(model),
            tokenizer,
            envs,
            group_ids=list(range(len(envs))),
            task_ids=[inst.task_id for inst in instances],
            uids=[f"{uid_prefix}-{i}" for i in range(len(envs))],
            env_name=family.name,
            cfg=cfg or RolloutConfig(),
            seed=seed,
        )
    finally:
        for env in envs:
            env.close()


def measure_policy(model, tokenizer, family: TaskFamily, seed: int, n: int = WARMUP_EVAL_EPISODES,
                   rollout_cfg: Optional[RolloutConfig] = None) -> dict[str, Any]:
    """Sample ``n`` episodes (temperature 1; ``rollout_cfg``'s tokens per turn and context, default
    ``RolloutConfig()``) and report the valid-action rate, the frequency of each parsed action and
    the success rate."""
    instances = family.instances("train", n, seed)
    trajs = play_instances(model, tokenizer, family, instances, seed, uid_prefix="measure", cfg=rollout_cfg)
    turns = [t for tr in trajs for t in tr.turns]
    valid = [t.action for t in turns if t.action is not None]
    freq: dict[str, float] = {}
    for a in valid:
        freq[a] = freq.get(a, 0.0) + 1.0
    freq = {k: v / max(len(valid), 1) for k, v in sorted(freq.items())}
    return {
        "valid_action_rate": len(valid) / max(len(turns), 1),
        "action_frequencies": freq,
        "success_rate": sum(tr.success for tr in trajs) / max(len(trajs), 1),
        "turns": len(turns),
    }


def warmup(model, tokenizer, family: TaskFamily, cfg: ModelConfig, seed: int, measure: bool = True,
           rollout_cfg: Optional[RolloutConfig] = None) -> dict[str, Any]:
    """Supervised *format* warm-up of the tiny policy (before RL; survey §8, stage 2).

    The corpus is ``family.warmup_corpus``: episodes whose actions are valid actions chosen
    **uniformly at random**, so the warm-up teaches the action format (one action letter, then
    ``"\\n"``) and nothing about which action is right. The loss is the token-mean cross-entropy
    on the policy's action tokens only, the ``"\\n"`` stop token included (prompt and observation
    tokens are context, not targets). AdamW with ``cfg.warmup_lr``, ``cfg.warmup_steps`` steps of
    ``cfg.warmup_batch_size`` episodes, gradient norm clipped at 1.0, on the model's device.

    Returns statistics: final and first loss, seconds, and (``measure=True``, families without a
    sandbox) the valid-action rate and action frequencies when sampling at temperature 1 before
    and after the warm-up.
    """
    stats: dict[str, Any] = {"steps": cfg.warmup_steps, "batch_size": cfg.warmup_batch_size}
    can_measure = measure and not family.needs_sandbox and not family.external_agent  # an outside program plays env=lightning
    if can_measure:
        before = measure_policy(model, tokenizer, family, seed + 7919, rollout_cfg=rollout_cfg)
        stats["valid_action_rate_before"] = before["valid_action_rate"]
    if cfg.warmup_steps <= 0:
        stats.update({"final_loss": float("nan"), "seconds": 0.0})
        if can_measure:
            stats.update({"valid_action_rate": before["valid_action_rate"], "action_frequencies": before["action_frequencies"]})
        return stats
    t0 = time.perf_counter()
    device = next(model.parameters()).device
    n_episodes = cfg.warmup_steps * cfg.warmup_batch_size
    corpus = family.warmup_corpus(n_episodes, seed)
    if not corpus:
        raise ValueError(f"task family {family.name!r} returned an empty warm-up corpus")
    ids, mask = _tokenize_episodes(tokenizer, corpus)
    max_len = getattr(model.config, "max_position_embeddings", 2048)
    ids = [x[:max_len] for x in ids]
    mask = [m[:max_len] for m in mask]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(ids), generator=gen)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.warmup_lr, weight_decay=0.0)
    model.train()
    losses: list[float] = []
    try:
        for step in range(cfg.warmup_steps):
            start = (step * cfg.warmup_batch_size) % len(ids)
            rows = order[start : start + cfg.warmup_batch_size].tolist()
            if len(rows) < cfg.warmup_batch_size:  # wrap around a small corpus
                rows += order[: cfg.warmup_batch_size - len(rows)].tolist()
            L = max(len(ids[r]) for r in rows)
            x = torch.full((len(rows), L), pad, dtype=torch.long)
            am = torch.zeros((len(rows), L), dtype=torch.long)
            tm = torch.zeros((len(rows), L), dtype=torch.bool)
            for i, r in enumerate(rows):  # building the padded batch (host side)
                x[i, : len(ids[r])] = torch.as_tensor(ids[r])
                am[i, : len(ids[r])] = 1
                tm[i, : len(ids[r])] = torch.as_tensor(mask[r])
            x, am, tm = x.to(device), am.to(device), tm.to(device)
            logits = model(input_ids=x, attention_mask=am, use_cache=False).logits[:, :-1].float()
            targets = x[:, 1:]
            w = tm[:, 1:].float()
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
            ).view_as(w)
            loss = (nll * w).sum() / w.sum().clamp(min=1.0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(float(loss.detach()))
    finally:
        model.eval()
        opt.zero_grad(set_to_none=True)
    stats["first_loss"] = losses[0]
    stats["final_loss"] = float(sum(losses[-10:]) / len(losses[-10:]))
    stats["seconds"] = time.perf_counter() - t0
    if not math.isfinite(stats["final_loss"]):
        raise RuntimeError(f"warm-up diverged: final loss {stats['final_loss']}")
    if can_measure:
        after = measure_policy(model, tokenizer, family, seed + 104729, rollout_cfg=rollout_cfg)
        stats["valid_action_rate"] = after["valid_action_rate"]
        stats["action_frequencies"] = after["action_frequencies"]
        stats["success_rate_after"] = after["success_rate"]
    return stats
