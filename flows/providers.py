"""What the stages hand to a credit method, by its declared ``needs`` (survey §8, stage 4).

:func:`build_context` fills a :class:`~stages.credit.base.CreditContext` for the run's method and
nothing more: a method that declares no needs costs no extra compute. Every provider counts what
it spends (extra forward passes, generated tokens, environment resets and steps, judge calls) so
the credit stage reports the method's overhead (Appendix C, "CA-specific overhead").

Providers:

* ``critic`` — the update stage's value model.
* ``greedy_rollout`` — one argmax episode per task instance (ReMax).
* ``mc_rollouts`` — :class:`MCRolloutProvider`: Monte Carlo continuations from inside episodes
  (VinePPO §3.1.1, SPO, Math-Shepherd process rewards). The environment of the prefix is restored
  by *replay*: a fresh environment of the same instance and episode seed is reset and given the
  recorded actions of the earlier turns (each replayed observation is checked against the
  recorded one). Replay works for every family, survives resume (nothing live is persisted) and
  costs only environment steps, which are counted. Continuations of one prefix share the
  environment's random stream (same episode seed), so on stochastic environments they differ only
  by the policy's samples. With ``replacements`` a start's turn is *intervened on* (InT, Yang et
  al. 2026): the environment is restored to the state before that turn, the given text is taken
  as the turn's action (tokenized, not generated) and the policy generates the rest of the
  episode, scored by the family's own verifier.
* ``ref_logprobs`` — response log-probs under the frozen initial policy (the run's ``init``
  checkpoint; the KL reference when ``update.kl_coef > 0``), at the rollout temperature so they
  compare with the behaviour log-probs.
* ``scorer`` — :class:`PolicyScorer`: current-policy log-probs of given tokens after given contexts.
* ``process_rewards`` / ``judge`` — built from the method's own config fields by
  :func:`stages.reward.process.make_process_rewards` and :func:`stages.reward.judge.make_judge`.
* ``tokenizer`` — the policy's tokenizer.
* ``planning_pattern`` — the task family's declared planning text (``TaskFamily.planning_pattern``; HICRA).
"""

from __future__ import annotations

import copy
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from environments.construct import EnvBatch, EnvSlot
from stages.credit.base import CreditContext
from stages.reward.verifier import compute_rewards
from stages.schema import Batch, Overhead


class EnvStartError(RuntimeError):
    """Every group of a batch failed to start its environments (sandbox or reset failures)."""


def _start_group(state: Any, slots: list[EnvSlot]) -> tuple[list[Any], list[Any], list[str]]:
    """Sandboxes, environments and prompts for one group's slots; on any failure everything made
    so far is closed and the exception propagates."""
    boxes: list[Any] = []
    envs: list[Any] = []
    try:
        if state.family.needs_sandbox:
            for _ in slots:
                boxes.append(state.sandbox_backend.create())
        for i, s in enumerate(slots):
            envs.append(state.family.make(s.instance, sandbox=boxes[i] if boxes else None, episode_seed=s.episode_seed))
        prompts = [env.reset() for env in envs]
        return envs, boxes, prompts
    except BaseException:
        _close_all(envs, boxes)
        raise


def _close_all(envs: list[Any], boxes: list[Any]) -> None:
    for obj in [*envs, *boxes]:
        try:
            obj.close()
        except Exception:  # closing is best effort; the backend's own cleanup removes leftovers
            pass


def start_environments(state: Any, slots: list[EnvSlot], retries: int) -> tuple[list[EnvSlot], list[Any], list[Any], list[str], dict[str, Any]]:
    """Start the environments of ``slots`` group by group (survey §8.2: environment faults).

    A group whose environment fails to start (sandbox creation, ``make`` or ``reset`` raising) is
    retried ``retries`` times; then the *whole* group is dropped — never a group with missing
    members, which would bias group baselines — and the drop is reported in ``info``
    (``dropped_groups``, ``start_failures``, ``failure_reasons``)."""
    groups: dict[int, list[EnvSlot]] = {}
    for s in slots:
        groups.setdefault(s.group_id, []).append(s)
    kept: list[EnvSlot] = []
    envs: list[Any] = []
    boxes: list[Any] = []
    prompts: list[str] = []
    info: dict[str, Any] = {"dropped_groups": 0, "start_failures": 0, "failure_reasons": []}
    t0 = time.perf_counter()
    try:
        for gid, members in groups.items():
            for attempt in range(retries + 1):
                try:
                    e, b, p = _start_group(state, members)
                except Exception as exc:
                    info["start_failures"] += 1
                    info["failure_reasons"].append(f"group {gid} attempt {attempt + 1}: {type(exc).__name__}: {exc}"[:300])
                    continue
                kept.extend(members)
                envs.extend(e)
                boxes.extend(b)
                prompts.extend(p)
                break
            else:
                info["dropped_groups"] += 1
    except BaseException:
        _close_all(envs, boxes)
        raise
    # environment construction cost (survey §8.2 "reset cost"): sandboxes made + envs reset, seconds
    info["start_seconds"] = time.perf_counter() - t0
    info["sandboxes_created"] = len(boxes)
    if slots and not kept:
        raise EnvStartError(
            f"every group's environment failed to start ({info['start_failures']} attempts); last error: "
            f"{info['failure_reasons'][-1] if info['failure_reasons'] else '?'}"
        )
    return kept, envs, boxes, prompts, info


def run_slots(state: Any, slots: list[EnvSlot], family: str, seed: int, temperature: float,
              starts: Optional[list[Any]] = None, replay: Optional[list[list[Any]]] = None,
              uids: Optional[list[str]] = None) -> tuple[Batch, Overhead, int]:
    """Make live environments (and sandboxes) for ``slots``, play them, close everything.

    Plain episodes start through :func:`start_environments` (retry, then drop whole groups; the
    batch's ``meta`` says how many). With ``starts``/``replay`` (continuations) the environments are
    reset and replayed through the given recorded turns, then continued from the start points."""
    from stages.rollout.agent_loop import run_episodes

    rollout_cfg = replace(state.obj.rollout, temperature=temperature)
    boxes: list[Any] = []
    envs: list[Any] = []
    replay_steps = 0
    info: dict[str, Any] = {}
    prompts: Optional[list[str]] = None
    try:
        if starts is None:
            retries = int(state.obj.rollout.env_start_retries)
            slots, envs, boxes, prompts, info = start_environments(state, slots, retries)
        else:
            e, b, _ = _start_group(state, slots)
            envs, boxes = e, b
            for env, turns, slot in zip(envs, replay or [[]] * len(envs), slots):
                for turn in turns:
                    res = env.step(turn.action_text)
                    replay_steps += 1
                    if res.observation != turn.observation:
                        raise RuntimeError(
                            f"replaying episode {slot.uid} of env {family!r} diverged at turn {turn.index}: "
                            f"recorded observation {turn.observation!r}, replay gave {res.observation!r}; "
                            "the family's transitions must be deterministic given the episode seed"
                        )
        trajs = run_episodes(
            state.engine, state.tokenizer, envs,
            group_ids=[s.group_id for s in slots],
            task_ids=[s.instance.task_id for s in slots],
            uids=uids or [s.uid for s in slots],
            env_name=family, cfg=rollout_cfg, seed=seed, starts=starts, prompts=prompts,
        )
    finally:
        _close_all(envs, boxes)
    steps = sum(len(t.turns) for t in trajs) + replay_steps
    gen_tokens = sum(int(t.meta.get("generated_tokens", t.num_policy_tokens)) for t in trajs)  # imposed actions are not generated
    return Batch(trajectories=trajs, meta=info), Overhead(env_resets=len(envs), env_steps=steps), gen_tokens


def greedy_rollout_provider(state: Any, envb: EnvBatch, iteration: int) -> Callable:
    """For methods that need a greedy baseline (ReMax): one argmax episode per task instance of
    the batch, same episode seed as the group; returns each trajectory's greedy return + overhead."""

    def provide(batch: Batch) -> tuple[Any, Overhead]:
        first: dict[int, EnvSlot] = {}
        for slot in envb.slots:
            first.setdefault(slot.group_id, replace(slot, uid=f"{slot.uid}-greedy"))
        slots = list(first.values())
        forwards = state.engine.stats["forward_passes"]
        gbatch, overhead, tokens = run_slots(state, slots, envb.family, state.seed_for(iteration, "greedy"), 0.0)
        gbatch, _, _ = compute_rewards(gbatch, state.family)
        ret = {t.group_id: t.reward + sum(turn.reward for turn in t.turns) for t in gbatch.trajectories}
        overhead.extra_tokens = tokens
        overhead.extra_forward_passes = int(state.engine.stats["forward_passes"] - forwards)
        return torch.tensor([ret[t.group_id] for t in batch.trajectories]), overhead

    return provide


class MCRolloutProvider:
    """Monte Carlo continuations with the current policy from inside the batch's episodes
    (the :class:`~stages.credit.base.MCRollouts` protocol). All ``N*k`` continuations of a call
    are generated together, turn by turn, in batched engine calls."""

    def __init__(self, state: Any, envb: EnvBatch, batch: Batch, iteration: int):
        self.state, self.envb, self.batch, self.iteration = state, envb, batch, iteration
        self.slots = {s.uid: s for s in envb.slots}
        self.calls = 0
        #: per start of the last call: each continuation's action texts (for logging interventions)
        self.last_continuations: list[list[list[str]]] = []

    def _locate(self, row: int, pos: int) -> Optional[int]:
        """Index of the turn whose action starts at or contains ``pos``; None past the last action."""
        traj = self.batch.trajectories[row]
        for turn in traj.turns:
            a, b = turn.action_span
            if a <= pos < b or (pos == a):
                return turn.index
            if pos < a:
                break
        if traj.turns and pos >= traj.turns[-1].action_span[1]:
            return None
        raise ValueError(
            f"mc_rollouts: position {pos} of trajectory {traj.uid} is inside an observation, not on a policy "
            f"action (turn action spans: {[t.action_span for t in traj.turns]})"
        )

    def __call__(self, starts: list[tuple[int, int]], k: int,
                 replacements: Optional[list[Optional[str]]] = None) -> tuple[torch.Tensor, Overhead]:
        from stages.rollout.agent_loop import EpisodeStart

        if k < 1:
            raise ValueError(f"mc_rollouts: k must be >= 1, got {k}")
        if replacements is not None and len(replacements) != len(starts):
            raise ValueError(f"mc_rollouts: {len(replacements)} replacements for {len(starts)} starts")
        state = self.state
        returns = torch.zeros((len(starts), k), dtype=torch.float32)
        slots, eps, replays, where, uids = [], [], [], [], []
        self.last_continuations = [[] for _ in starts]
        for n, (row, pos) in enumerate(starts):
            if not 0 <= row < len(self.batch):
                raise ValueError(f"mc_rollouts: row {row} outside the batch of {len(self.batch)} trajectories")
            traj = self.batch.trajectories[row]
            t = self._locate(row, pos)
            if t is None:  # the episode is over at this point: nothing more to collect
                continue
            a = traj.turns[t].action_span[0]
            slot = self.slots.get(traj.uid)
            if slot is None:
                raise ValueError(f"mc_rollouts: trajectory {traj.uid} is not in this iteration's environment batch")
            text = None if replacements is None else replacements[n]
            forced = None
            if text is not None:  # an intervention: turn t's action is replaced by ``text`` (InT)
                if pos != a:
                    raise ValueError(f"mc_rollouts: a replacement needs a start at a turn's action start "
                                     f"({a} for turn {t} of {traj.uid}), got position {pos}")
                forced = list(state.tokenizer(text, add_special_tokens=False)["input_ids"])
                if not forced:
                    raise ValueError(f"mc_rollouts: replacement {text!r} for turn {t} of {traj.uid} has no tokens")
            for j in range(k):
                slots.append(slot)
                uids.append(f"{traj.uid}-{'iv' if forced is not None else 'mc'}{pos}-{j}")
                eps.append(EpisodeStart(prompt_ids=traj.prompt_ids, response_ids=traj.response_ids[:pos],
                                        partial_action=traj.response_ids[a:pos], prompt_text=traj.prompt_text,
                                        forced_action=forced))
                replays.append(traj.turns[:t])
                where.append((n, j))
        self.calls += 1
        if not slots:
            return returns, Overhead()
        forwards = state.engine.stats["forward_passes"]
        seed = state.seed_for(self.iteration, f"mc{self.calls}")
        cont, overhead, tokens = run_slots(state, slots, self.envb.family, seed, state.obj.rollout.temperature,
                                            starts=eps, replay=replays, uids=uids)
        cont, _, _ = compute_rewards(cont, state.family)
        rtg = torch.tensor([t.reward + sum(turn.reward for turn in t.turns) for t in cont.trajectories],
                           dtype=torch.float32)
        idx = torch.tensor(where, dtype=torch.long)
        returns[idx[:, 0], idx[:, 1]] = rtg
        for (n, _), traj in zip(where, cont.trajectories):  # what each continuation did, for the record
            self.last_continuations[n].append([turn.action_text for turn in traj.turns])
        overhead.extra_tokens = tokens
        overhead.extra_forward_passes = int(state.engine.stats["forward_passes"] - forwards)
        return returns, overhead


def _left_pad(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(max((len(s) for s in seqs), default=1), 1)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):  # builds the padded batch once per call (not a per-token loop)
        if s:
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids, mask


def batched_logprobs(model: torch.nn.Module, contexts: list[list[int]], targets: list[list[int]], pad: int,
                     temperature: float = 1.0) -> list[torch.Tensor]:
    """Log-probs of ``targets[i]`` after ``contexts[i]`` in one forward pass (no grad)."""
    from stages.rollout.policy import sequence_logprobs

    if len(contexts) != len(targets):
        raise ValueError(f"{len(contexts)} contexts but {len(targets)} targets")
    if not contexts:
        return []
    if any(not c for c in contexts):
        raise ValueError("every context needs at least one token")
    ctx_ids, ctx_mask = _left_pad(contexts, pad)
    R = max(max(len(t) for t in targets), 1)
    tgt_ids = torch.full((len(targets), R), pad, dtype=torch.long)
    tgt_mask = torch.zeros((len(targets), R), dtype=torch.long)
    for i, t in enumerate(targets):
        if t:
            tgt_ids[i, : len(t)] = torch.tensor(t, dtype=torch.long)
            tgt_mask[i, : len(t)] = 1
    device = next(model.parameters()).device
    ids = torch.cat([ctx_ids, tgt_ids], 1).to(device)
    mask = torch.cat([ctx_mask, tgt_mask], 1).to(device)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        lp, _ = sequence_logprobs(model, ids, mask, pos, ctx_ids.shape[1], temperature=temperature)
    lp = lp.cpu()
    return [lp[i, : len(t)] for i, t in enumerate(targets)]


class PolicyScorer:
    """Current-policy log-probs of target tokens after contexts (the ``Scorer`` protocol)."""

    def __init__(self, model: torch.nn.Module, pad_token_id: int, temperature: float = 1.0):
        self.model, self.pad, self.temperature = model, pad_token_id, temperature
        self.forward_passes = 0

    def __call__(self, contexts: list[list[int]], targets: list[list[int]]) -> list[torch.Tensor]:
        self.forward_passes += 1
        return batched_logprobs(self.model, contexts, targets, self.pad, self.temperature)


def reference_policy(state: Any) -> torch.nn.Module:
    """The frozen initial policy: the trainer's KL reference if there is one, else the run's
    ``init`` checkpoint loaded into a copy (kept for the rest of the process)."""
    if state.trainer.reference is not None:
        return state.trainer.reference
    ref = getattr(state, "_reference_policy", None)
    if ref is None:
        from stages.update.checkpoint import load_checkpoint

        ref = copy.deepcopy(state.policy)
        load_checkpoint(Path(state.paths.checkpoints) / "init", ref, None)
        ref.eval().requires_grad_(False)
        state._reference_policy = ref
    return ref


def reference_logprobs(state: Any, batch: Batch, pad: int) -> torch.Tensor:
    """(B, R) log-probs of the batch's response tokens under the reference policy (0 off-policy-mask)."""
    from stages.rollout.policy import sequence_logprobs

    t = batch.to_tensors(pad_token_id=pad)
    model = reference_policy(state)
    device = next(model.parameters()).device
    with torch.no_grad():
        lp, _ = sequence_logprobs(model, t.input_ids.to(device), t.attention_mask.to(device),
                                  t.position_ids.to(device), t.prompt_len,
                                  temperature=state.obj.rollout.temperature)
    return lp.cpu() * t.response_mask


def build_context(state: Any, envb: EnvBatch, batch: Batch, iteration: int, checkpoint: str, pad: int) -> tuple[CreditContext, Overhead]:
    """The context for the run's method: only what it declared in ``needs``. Returns the
    context and the overhead spent building it (reference forward pass)."""
    needs = state.method.needs
    ctx = CreditContext(generator=torch.Generator().manual_seed(state.seed_for(iteration, "credit")))
    overhead = Overhead()
    if needs:
        state.ensure_policy(checkpoint)
    if "critic" in needs:
        ctx.critic = state.trainer.critic
    if "greedy_rollout" in needs:
        ctx.greedy_rollout = greedy_rollout_provider(state, envb, iteration)
    if "tokenizer" in needs:
        ctx.tokenizer = state.tokenizer
    if "planning_pattern" in needs:
        ctx.planning_pattern = state.family.planning_pattern or ""
    if "ref_logprobs" in needs:
        ctx.ref_logprobs = reference_logprobs(state, batch, pad)
        overhead.extra_forward_passes += 1
    if "scorer" in needs:
        ctx.scorer = PolicyScorer(state.policy, pad, temperature=state.obj.rollout.temperature)
        ctx.tokenizer = state.tokenizer
    if "mc_rollouts" in needs or "process_rewards" in needs:
        ctx.mc_rollouts = MCRolloutProvider(state, envb, batch, iteration)
    if "process_rewards" in needs:
        from stages.reward.process import make_process_rewards

        ctx.process_rewards = make_process_rewards_for(state, ctx, make_process_rewards)
    if "judge" in needs:
        from stages.reward.judge import make_judge

        if getattr(state, "_judge", None) is None:  # a judge model is loaded once per process
            state._judge = make_judge(state.method.cfg, policy=state.policy, tokenizer=state.tokenizer)
        ctx.judge = state._judge
        ctx.tokenizer = state.tokenizer
    return ctx, overhead


def make_process_rewards_for(state: Any, ctx: CreditContext, factory: Callable) -> Any:
    """The process-reward source named by the method's config (``process_reward``)."""
    cfg = state.method.cfg
    source = cfg.process_reward
    prm = None
    if source == "prm":
        from stages.reward.prm import load_prm

        path = cfg.prm_path
        if not path:
            raise ValueError("credit.process_reward=prm needs credit.prm_path (train one with `creditflow prm train`)")
        prm = load_prm(path)
    return factory(source, mc_rollouts=ctx.mc_rollouts, prm=prm, tokenizer=state.tokenizer,
                   mc_k=cfg.mc_k)
