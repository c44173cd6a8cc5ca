"""The multi-turn agent loop of stage 2, rollout generation (survey §8, stage 2; §2.2).

:func:`run_episodes` plays a batch of episodes turn by turn. Every turn, all episodes still
running generate together in **one** :meth:`RolloutEngine.generate` call (the policy's turn ends
at the ``"\\n"`` stop token or eos); each episode's new tokens are decoded and passed to its
environment's ``step``; the action tokens (``policy_mask`` True, behaviour log-probs and
entropies from the engine) and then the tokenized observation (``policy_mask`` False, log-prob
and entropy 0.0) are appended to the episode's response. Text pieces (prompt, observations) are
tokenized on their own with ``add_special_tokens=False``; the warm-up tokenizes the same way.

An episode ends when its environment says done (``done_reason`` = the environment's reason) or
when the next turn could overflow ``cfg.max_context_tokens`` (context + ``max_new_tokens_per_turn``
> limit; ``done_reason = "length"``).

Rewards (survey §2.3, §8 stage 3):

* ``Turn.reward`` is the *turn* reward the environment returned for that step
  (``StepResult.reward``; e.g. bifurcation's ``decisive_reward`` for a correct decisive action).
* ``Trajectory.reward`` is the *terminal* (episodic) reward, read from the final step's
  ``StepResult.info["terminal_reward"]`` (bifurcation: 1.0 on success, else 0.0). As in gym,
  ``StepResult.reward`` of the final step is the *whole* reward of that step (turn reward plus
  terminal reward), so the final turn keeps ``reward - terminal_reward``. An environment that does not report ``terminal_reward``
  is treated as putting its whole final-step reward on the episode: then that reward goes to
  ``Trajectory.reward`` and the final ``Turn.reward`` is 0. Either way nothing is counted twice:
  the return is ``sum(turn.reward) + trajectory.reward``.
* Episodes cut by ``"length"`` get ``Trajectory.reward = 0``.

Bookkeeping: ``Trajectory.meta`` has ``env_steps``, ``env_resets``, ``generated_tokens``,
``engine_calls`` (calls this episode took part in) and ``wall_seconds`` (the whole batch's
rollout wall time); :func:`rollout_stats` summarises a list of trajectories. The caller owns the
environments (and closes them).
"""

from __future__ import annotations

import hashlib
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Optional

from environments.base import Environment, StepResult
from stages.rollout.config import RolloutConfig
from stages.rollout.engine import GenerationOutput, GenerationRequest, RolloutEngine
from stages.schema import Trajectory, Turn


@dataclass
class EpisodeStart:
    """Where a continued episode starts (see :func:`run_episodes`' ``starts``)."""

    prompt_ids: list[int]
    #: response tokens before the start point (previous turns, and the partial action)
    response_ids: list[int]
    #: the tail of ``response_ids`` that is the interrupted turn's action so far (may be empty)
    partial_action: list[int] = field(default_factory=list)
    prompt_text: str = ""
    #: action tokens *imposed* on the first new turn instead of generating it (InT's intervention,
    #: Yang et al. 2026: a rewritten step); behaviour log-probs/entropies 0.0, finish_reason "forced"
    forced_action: Optional[list[int]] = None


def _turn_seed(seed: int, uid: str, turn: int) -> int:
    h = hashlib.blake2b(f"{seed}|{uid}|{turn}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def split_final_reward(result: StepResult) -> tuple[float, float]:
    """(turn reward, terminal reward) of an episode's final step (see module docstring)."""
    if "terminal_reward" in result.info:
        terminal = float(result.info["terminal_reward"])
        return float(result.reward) - terminal, terminal
    return 0.0, float(result.reward)


def _truncate(out: GenerationOutput, budget: int) -> GenerationOutput:
    """Cut a generation to ``budget`` tokens (sampling is sequential, so the prefix is exactly
    what a generation with that budget would have sampled under the same request seed)."""
    if len(out.token_ids) <= budget:
        return out
    return GenerationOutput(out.token_ids[:budget], out.logprobs[:budget], out.entropies[:budget], "length")


_STOP_CACHE: "weakref.WeakKeyDictionary[Any, frozenset[int]]" = weakref.WeakKeyDictionary()


def stop_token_ids(tokenizer: Any) -> set[int]:
    """Token ids that end a policy turn: every token whose text contains ``"\\n"`` (the turn's
    stop text, bifurcation's text protocol) and eos. For the tiny tokenizer that is the single
    ``"\\n"`` token plus eos; for a general tokenizer also tokens such as ``".\\n"`` or
    ``"\\n\\n"``. The vocabulary scan is cached per tokenizer object."""
    try:
        cached = _STOP_CACHE.get(tokenizer)
    except TypeError:
        cached = None
    if cached is not None:
        return set(cached)
    ids: set[int] = set()
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))], skip_special_tokens=False)
    ids.update(i for i, t in enumerate(texts) if "\n" in t)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    if not ids:
        raise ValueError("tokenizer has neither a token containing a newline nor an eos token: no stop token")
    try:
        _STOP_CACHE[tokenizer] = frozenset(ids)
    except TypeError:
        pass
    return ids


def run_episodes(
    engine: RolloutEngine,
    tokenizer: Any,
    envs: list[Environment],
    group_ids: list[int],
    task_ids: list[str],
    uids: list[str],
    env_name: str,
    cfg: RolloutConfig,
    seed: int,
    snapshots: bool = False,
    starts: Optional[list[EpisodeStart]] = None,
    prompts: Optional[list[str]] = None,
) -> list[Trajectory]:
    """Play one episode in each of ``envs`` (reset here) and return their trajectories.

    ``snapshots=True`` stores ``env.snapshot()`` of the state each action was taken in
    (``Trajectory.snapshots``, one per turn) for methods that re-run from a turn.

    ``starts`` continues episodes from inside instead (Monte Carlo continuations, VinePPO): the
    caller has already brought ``envs[i]`` to the state of turn ``starts[i].turn_index`` (reset
    and replayed), the context is ``starts[i].prompt_ids + starts[i].response_ids`` and the
    first generated turn completes ``starts[i].partial_action`` (action tokens of the
    interrupted turn already in the context). The returned trajectories hold only the *new*
    response tokens and turns (the first new turn's action text includes the partial action);
    their return is the return-to-go from the start turn on. A start with ``forced_action``
    (token ids) takes that action on its first new turn instead of generating one (InT's
    counterfactual step, Yang et al. 2026); the turn's ``info["finish_reason"]`` is ``"forced"``
    and its tokens count neither as generated nor as an engine call.

    ``prompts`` says the caller has already reset ``envs`` (and these are the prompts they
    returned), e.g. to retry environments that failed to start.
    """
    n = len(envs)
    for name, seq in (("group_ids", group_ids), ("task_ids", task_ids), ("uids", uids)):
        if len(seq) != n:
            raise ValueError(f"run_episodes: {name} has {len(seq)} entries for {n} environments")
    if starts is not None and len(starts) != n:
        raise ValueError(f"run_episodes: starts has {len(starts)} entries for {n} environments")
    t0 = time.perf_counter()
    stop_ids = stop_token_ids(tokenizer)
    if starts is None:
        if prompts is None:
            prompts = [env.reset() for env in envs]
        elif len(prompts) != n:
            raise ValueError(f"run_episodes: prompts has {len(prompts)} entries for {n} environments")
        prompt_ids: list[list[int]] = [list(x) for x in tokenizer(prompts, add_special_tokens=False)["input_ids"]] if n else []
        prefix: list[list[int]] = [[] for _ in range(n)]
        partial: list[list[int]] = [[] for _ in range(n)]
    else:
        prompts = [st.prompt_text for st in starts]
        prompt_ids = [list(st.prompt_ids) for st in starts]
        prefix = [list(st.response_ids) for st in starts]
        partial = [list(st.partial_action) for st in starts]
    forced: list[Optional[list[int]]] = [None] * n if starts is None else [
        None if st.forced_action is None else list(st.forced_action) for st in starts]
    if any(f is not None and p for f, p in zip(forced, partial)):
        raise ValueError("run_episodes: a start cannot have both a partial_action and a forced_action")
    resp: list[list[int]] = [[] for _ in range(n)]
    mask: list[list[bool]] = [[] for _ in range(n)]
    lps: list[list[float]] = [[] for _ in range(n)]
    ents: list[list[float]] = [[] for _ in range(n)]
    turns: list[list[Turn]] = [[] for _ in range(n)]
    snaps: list[list[Any]] = [[] for _ in range(n)]
    active = [True] * n
    reason = [""] * n
    success = [False] * n
    terminal = [0.0] * n
    steps = [0] * n
    gen_tokens = [0] * n
    calls = [0] * n
    limit = cfg.max_context_tokens
    turn_idx = 0
    while True:
        for i in range(n):
            used = len(prompt_ids[i]) + len(prefix[i]) + len(resp[i])
            if active[i] and used + cfg.max_new_tokens_per_turn - len(partial[i]) > limit:
                active[i], reason[i] = False, "length"
        idx = [i for i in range(n) if active[i]]
        if not idx:
            break
        gen = [i for i in idx if forced[i] is None]
        # the prompt (and a continuation's forked prefix) is shared by a group's episodes (by the k
        # continuations of one fork): the engine may prefill it once for all of them
        requests = [
            GenerationRequest(context_ids=prompt_ids[i] + prefix[i] + resp[i], seed=_turn_seed(seed, uids[i], turn_idx),
                              shared_prefix=len(prompt_ids[i]) + len(prefix[i]))
            for i in gen
        ]
        # a continued turn may already hold part of its action: it gets only the rest of the budget
        budget = [max(cfg.max_new_tokens_per_turn - len(partial[i]), 1) for i in gen]
        generated = engine.generate(requests, max(budget), stop_ids, cfg.temperature, cfg.top_p) if gen else []
        by_row = {i: _truncate(out, b) for i, out, b in zip(gen, generated, budget)}
        for i in idx:  # an imposed first action (intervention) is not generated: no log-probs of its own
            if forced[i] is not None:
                f = forced[i]
                by_row[i] = GenerationOutput(f, [0.0] * len(f), [0.0] * len(f), "forced")
                forced[i] = None
        outs = [by_row[i] for i in idx]
        results: list[StepResult] = []
        for i, out in zip(idx, outs):
            calls[i] += out.finish_reason != "forced"
            text = tokenizer.decode(partial[i] + list(out.token_ids), skip_special_tokens=True)
            partial[i] = []
            key = envs[i].state_key()
            if snapshots:
                snaps[i].append(envs[i].snapshot())
            res = envs[i].step(text)
            steps[i] += 1
            results.append(res)
            a0 = len(resp[i])
            resp[i].extend(out.token_ids)
            mask[i].extend([True] * len(out.token_ids))
            lps[i].extend(out.logprobs)
            ents[i].extend(out.entropies)
            gen_tokens[i] += len(out.token_ids) if out.finish_reason != "forced" else 0
            turns[i].append(
                Turn(
                    index=len(turns[i]),
                    action_span=(a0, len(resp[i])),
                    obs_span=(len(resp[i]), len(resp[i])),
                    action_text=text,
                    observation=res.observation,
                    reward=float(res.reward),
                    state_key=key,
                    action=res.action,
                    info={"finish_reason": out.finish_reason, "next_state_key": res.state_key, **res.info},
                )
            )
        obs_ids = tokenizer([r.observation for r in results], add_special_tokens=False)["input_ids"]
        for i, res, ob in zip(idx, results, obs_ids):
            o0 = len(resp[i])
            resp[i].extend(ob)
            mask[i].extend([False] * len(ob))
            lps[i].extend([0.0] * len(ob))
            ents[i].extend([0.0] * len(ob))
            turn = turns[i][-1]
            turn.obs_span = (o0, len(resp[i]))
            if res.done:
                active[i] = False
                success[i] = bool(res.success)
                reason[i] = res.reason or ("success" if res.success else "done")
                turn.reward, terminal[i] = split_final_reward(res)
        turn_idx += 1
    wall = time.perf_counter() - t0
    trajs = []
    for i in range(n):
        actions: list[Optional[str]] = [t.action for t in turns[i]]
        traj = Trajectory(
            uid=uids[i],
            group_id=int(group_ids[i]),
            task_id=task_ids[i],
            env_name=env_name,
            prompt_ids=prompt_ids[i],
            response_ids=resp[i],
            policy_mask=mask[i],
            logprobs=lps[i],
            entropies=ents[i],
            turns=turns[i],
            reward=terminal[i],
            success=success[i],
            done_reason=reason[i],
            prompt_text=prompts[i],
            ground_truth=envs[i].ground_truth(actions) if starts is None else None,
            snapshots=snaps[i],
            privileged=dict(envs[i].privileged()),
            meta={
                **{k: float(v) for k, v in envs[i].stats().items()},
                "env_steps": steps[i],
                "env_resets": float(envs[i].stats().get("env_resets", 1)),
                "generated_tokens": gen_tokens[i],
                "engine_calls": calls[i],
                "wall_seconds": wall,
                "seed": seed,
            },
        )
        trajs.append(traj)
    return trajs


def rollout_stats(trajs: list[Trajectory]) -> dict[str, float]:
    """Totals and rates over a batch of trajectories from :func:`run_episodes`."""
    n = len(trajs)
    turns = [t for tr in trajs for t in tr.turns]
    gen = sum(tr.meta.get("generated_tokens", tr.num_policy_tokens) for tr in trajs)
    wall = max((tr.meta.get("wall_seconds", 0.0) for tr in trajs), default=0.0)
    return {
        "episodes": float(n),
        "env_steps": float(sum(tr.meta.get("env_steps", len(tr.turns)) for tr in trajs)),
        "env_resets": float(sum(tr.meta.get("env_resets", 1) for tr in trajs)),
        "generated_tokens": float(gen),
        "wall_seconds": float(wall),
        "tokens_per_second": float(gen / wall) if wall > 0 else 0.0,
        "valid_action_rate": sum(t.action is not None for t in turns) / max(len(turns), 1),
        "success_rate": sum(tr.success for tr in trajs) / max(n, 1),
        "mean_reward": sum(tr.reward for tr in trajs) / max(n, 1),
        "length_cut_rate": sum(tr.done_reason == "length" for tr in trajs) / max(n, 1),
    }
