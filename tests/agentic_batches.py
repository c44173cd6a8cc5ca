"""Hand-built multi-turn batches for the agentic credit methods' tests (GiGPO, CARL): real
:class:`~stages.schema.Batch` objects whose tensors come from ``Batch.to_tensors``."""

from __future__ import annotations

from typing import Optional, Sequence

from stages.schema import Batch, Trajectory, Turn


def trajectory(uid: str, group: int, states: Sequence[str], reward: float, *, tokens: int = 2,
               entropies: Optional[Sequence[float]] = None, turn_rewards: Optional[Sequence[float]] = None,
               logprobs: Optional[Sequence[float]] = None) -> Trajectory:
    """One episode of ``len(states)`` turns: each turn ``tokens`` action tokens (the policy's;
    entropy ``entropies[k]``, log-prob ``logprobs[k]`` on each) then one observation token;
    ``states[k]`` is the state key before turn k's action, ``reward`` the terminal reward."""
    n = len(states)
    ents = list(entropies) if entropies is not None else [0.0] * n
    lps = list(logprobs) if logprobs is not None else [0.0] * n
    trs = list(turn_rewards) if turn_rewards is not None else [0.0] * n
    resp, mask, lp, ent, turns = [], [], [], [], []
    for k, s in enumerate(states):
        a0 = len(resp)
        resp += [10 + k] * tokens
        mask += [True] * tokens
        lp += [lps[k]] * tokens
        ent += [ents[k]] * tokens
        resp.append(3)
        mask.append(False)
        lp.append(0.0)
        ent.append(0.0)
        turns.append(Turn(index=k, action_span=(a0, a0 + tokens), obs_span=(a0 + tokens, a0 + tokens + 1),
                          action_text="a", observation="o", reward=trs[k], state_key=s, action="a"))
    return Trajectory(uid=uid, group_id=group, task_id=f"t{group}", env_name="hand", prompt_ids=[1, 2],
                      response_ids=resp, policy_mask=mask, logprobs=lp, entropies=ent, turns=turns,
                      reward=reward, success=reward > 0)


def batch(*trajs: Trajectory) -> Batch:
    return Batch(trajectories=list(trajs))
