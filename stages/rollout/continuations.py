"""Extra rollouts a credit method asks for: Monte Carlo continuations, interventions, greedy episodes.

* :class:`MCContinuations` — the ``mc_rollouts`` need (:class:`~stages.credit.base.MCRollouts`):
  Monte Carlo continuations with the current policy from inside the batch's episodes (VinePPO
  §3.1.1, SPO, Math-Shepherd process rewards). The environment of the prefix is restored from a
  *snapshot* where the family has them (``Environment.snapshot``/``restore``): the trajectory's
  recorded snapshot of that turn if the rollout kept them, else one fresh environment of the same
  instance and episode seed per trajectory is replayed once through the recorded turns and
  snapshotted at every fork point (:func:`environments.start.fork_snapshots`), and each
  continuation's environment is restored from its fork's snapshot. The fallback, for families
  without snapshots, is *replay* (:func:`environments.start.replay_environments`): every
  continuation's fresh environment is given the recorded actions of the earlier turns. Both check
  each replayed observation against the recorded one, survive resume (nothing live is persisted)
  and are counted (``Overhead.env_restores``, ``env_replay_steps``). Continuations of one prefix
  share the environment's random stream (same episode seed; a snapshot carries the same future as
  a replay), so on stochastic environments they differ only by the policy's samples. The ``k``
  continuations of one fork share its context, which the engine prefills once
  (``GenerationRequest.shared_prefix``). With ``replacements`` a
  start's turn is *intervened on* (InT, Yang et al. 2026): the environment is restored to the
  state before that turn, the given text is taken as the turn's action (tokenized, not
  generated) and the policy generates the rest of the episode, scored by the family's verifier.
* :class:`GreedyRollout` — the ``greedy_rollout`` need (ReMax, Li et al. 2024): one argmax
  (temperature 0) episode per task instance of the batch, with the group's episode seed; each
  trajectory gets its instance's greedy return as baseline.

Both play through a :class:`environments.start.SlotPlayer` and count what they spend (extra
forward passes and generated tokens, environment resets and steps) in an
:class:`~stages.schema.Overhead`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Optional

import torch

from environments.construct import EnvBatch, EnvSlot
from environments.start import SlotPlayer, fork_snapshots
from stages.reward.verifier import compute_rewards
from stages.schema import Batch, Overhead

#: the stage seed of one named draw of the iteration (``lambda name: run.seed_for(iteration, name)``)
SeedFor = Callable[[str], int]


def _returns(batch: Batch) -> list[float]:
    """Each trajectory's return: terminal reward plus its turns' rewards."""
    return [t.reward + sum(turn.reward for turn in t.turns) for t in batch.trajectories]


class GreedyRollout:
    """``batch -> ((B,) greedy return of each trajectory's task instance, Overhead)`` (ReMax)."""

    def __init__(self, player: SlotPlayer, envb: EnvBatch, seed_for: SeedFor):
        self.player, self.envb, self.seed_for = player, envb, seed_for

    def __call__(self, batch: Batch) -> tuple[torch.Tensor, Overhead]:
        first: dict[int, EnvSlot] = {}
        for slot in self.envb.slots:
            first.setdefault(slot.group_id, replace(slot, uid=f"{slot.uid}-greedy"))
        engine = self.player.engine
        forwards, ftoks = engine.stats["forward_passes"], engine.stats.get("forward_tokens", 0)
        gbatch, overhead, tokens = self.player.play(list(first.values()), self.seed_for("greedy"), 0.0)
        gbatch, _, _ = compute_rewards(gbatch, self.player.family)
        ret = {t.group_id: r for t, r in zip(gbatch.trajectories, _returns(gbatch))}
        overhead.extra_tokens = tokens
        overhead.extra_forward_passes = int(engine.stats["forward_passes"] - forwards)
        overhead.forward_tokens = int(engine.stats.get("forward_tokens", 0) - ftoks)
        return torch.tensor([ret[t.group_id] for t in batch.trajectories]), overhead


class MCContinuations:
    """Monte Carlo continuations with the current policy from inside the batch's episodes
    (the :class:`~stages.credit.base.MCRollouts` protocol). All ``N*k`` continuations of a call
    are generated together, turn by turn, in batched engine calls."""

    def __init__(self, player: SlotPlayer, envb: EnvBatch, batch: Batch, seed_for: SeedFor, snapshots: bool = True):
        self.player, self.envb, self.batch, self.seed_for = player, envb, batch, seed_for
        #: restore forked environments from snapshots where the family has them (False: replay only)
        self.snapshots = snapshots
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

    def _fork_handles(self, rows: list[int], replays: list[list]) -> tuple[list, Overhead]:
        """Per continuation, the snapshot handle of its fork (``None``: reset state at turn 0, or
        replay where the family has no snapshots), and what making them cost (environments made,
        steps replayed: see :func:`environments.start.fork_snapshots`)."""
        if not self.snapshots:
            return [None] * len(rows), Overhead()
        points: dict[int, set[int]] = {}
        for row, turns in zip(rows, replays):
            points.setdefault(row, set()).add(len(turns))
        order = [r for r in points if not self.batch.trajectories[r].snapshots]
        trajs = self.batch.trajectories
        got, resets, steps = fork_snapshots(self.player.family, [self.slots[trajs[r].uid] for r in order],
                                            [trajs[r].turns for r in order], [points[r] for r in order],
                                            self.player.new_sandbox)
        handles_of = dict(zip(order, got))
        out = []
        for row, turns in zip(rows, replays):
            t, recorded = len(turns), trajs[row].snapshots
            if t == 0:
                out.append(None)
            elif recorded:  # the rollout kept the snapshot of the state each action was taken in
                out.append(recorded[t])
            else:
                h = handles_of.get(row)
                out.append(None if h is None else h[t])
        return out, Overhead(env_resets=resets, env_steps=steps, env_replay_steps=steps)

    def __call__(self, starts: list[tuple[int, int]], k: int,
                 replacements: Optional[list[Optional[str]]] = None) -> tuple[torch.Tensor, Overhead]:
        from stages.rollout.agent_loop import EpisodeStart

        if k < 1:
            raise ValueError(f"mc_rollouts: k must be >= 1, got {k}")
        if replacements is not None and len(replacements) != len(starts):
            raise ValueError(f"mc_rollouts: {len(replacements)} replacements for {len(starts)} starts")
        player = self.player
        returns = torch.zeros((len(starts), k), dtype=torch.float32)
        slots, eps, replays, where, uids, rows = [], [], [], [], [], []
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
                forced = list(player.tokenizer(text, add_special_tokens=False)["input_ids"])
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
                rows.append(row)
        self.calls += 1
        if not slots:
            return returns, Overhead()
        handles, fork_overhead = self._fork_handles(rows, replays)
        forwards, ftoks = player.engine.stats["forward_passes"], player.engine.stats.get("forward_tokens", 0)
        seed = self.seed_for(f"mc{self.calls}")
        cont, overhead, tokens = player.play(slots, seed, player.rollout.temperature,
                                             starts=eps, replay=replays, uids=uids, restore=handles)
        overhead = overhead + fork_overhead
        cont, _, _ = compute_rewards(cont, player.family)
        rtg = torch.tensor(_returns(cont), dtype=torch.float32)
        idx = torch.tensor(where, dtype=torch.long)
        returns[idx[:, 0], idx[:, 1]] = rtg
        for (n, _), traj in zip(where, cont.trajectories):  # what each continuation did, for the record
            self.last_continuations[n].append([turn.action_text for turn in traj.turns])
        overhead.extra_tokens = tokens
        overhead.extra_forward_passes = int(player.engine.stats["forward_passes"] - forwards)
        overhead.forward_tokens = int(player.engine.stats.get("forward_tokens", 0) - ftoks)
        return returns, overhead

    def sample_actions(self, starts: list[tuple[int, int]], k: int) -> tuple[list[list[str]], Overhead]:
        """``k`` fresh policy samples of each start's turn action, *without* the environment (C3's
        model-based counterfactual, :mod:`stages.credit.methods.counterfactual`): every ``(row,
        position)`` must be a turn's action start; the context is the trajectory's prompt and response
        up to it, sampled as the agent loop samples a turn (``rollout.max_new_tokens_per_turn``, the
        rollout temperature and top-p, the turn's stop tokens), all ``N*k`` requests in one batched
        engine call. Returns the decoded action texts (N lists of k) and the generation's overhead
        (no environment resets or steps)."""
        from stages.rollout.agent_loop import _truncate, _turn_seed, stop_token_ids
        from stages.rollout.engine import GenerationRequest

        if k < 1:
            raise ValueError(f"mc_rollouts: k must be >= 1, got {k}")
        player, cfg = self.player, self.player.rollout
        requests, seed = [], self.seed_for(f"cfa{self.calls}")
        for row, pos in starts:
            traj = self.batch.trajectories[row]
            t = self._locate(row, pos)
            if t is None or traj.turns[t].action_span[0] != pos:
                raise ValueError(f"mc_rollouts: sample_actions needs a turn's action start, got position {pos} of {traj.uid}")
            ctx = list(traj.prompt_ids) + list(traj.response_ids[:pos])
            requests += [GenerationRequest(context_ids=ctx, seed=_turn_seed(seed, f"{traj.uid}-cfa{pos}-{j}", t),
                                           shared_prefix=len(ctx)) for j in range(k)]
        self.calls += 1
        if not requests:
            return [], Overhead()
        engine = player.engine
        forwards, ftoks = engine.stats["forward_passes"], engine.stats.get("forward_tokens", 0)
        budget = int(cfg.max_new_tokens_per_turn)
        outs = [_truncate(o, budget) for o in engine.generate(requests, budget, stop_token_ids(player.tokenizer),
                                                               float(cfg.temperature), float(cfg.top_p))]
        texts = [player.tokenizer.decode(list(o.token_ids), skip_special_tokens=True) for o in outs]
        overhead = Overhead(extra_tokens=sum(len(o.token_ids) for o in outs),
                            extra_forward_passes=int(engine.stats["forward_passes"] - forwards),
                            forward_tokens=int(engine.stats.get("forward_tokens", 0) - ftoks))
        return [texts[n * k:(n + 1) * k] for n in range(len(starts))], overhead
