"""Agent Lightning's task family: episodes played by an agent program outside creditflow.

Agent Lightning (Luo et al. 2025, "Agent Lightning: Train ANY AI Agents with Reinforcement
Learning", arXiv 2508.03680; survey §5.7) decouples agent *execution* from *training*: the agent is
any program that talks to an OpenAI-compatible endpoint; the trainer serves the current policy
behind that endpoint, records every LLM call as a transition (prompt -> completion, with the
behaviour log-probs) and receives each episode's reward from the agent's own reporting.

This family is the creditflow side of the task: it names the episodes (instances of the train and
eval splits, with group and episode seeds, exactly as any family's), and
:class:`LightningConfig` says which program plays them (``env.agent_command``). It has no
:class:`~environments.base.Environment`: the program *is* the environment and the agent at once,
so ``external_agent = True`` tells the rollout stage to play its slots with
:class:`stages.rollout.lightning.AgentProgramPlayer` (serve the policy, launch the program, collect
the transitions) instead of the text-protocol agent loop. Replaying or forking an episode is not
possible (the program's state is its own), so credit methods that need continuations or greedy
re-runs are refused by the config loader.

The instance spec the program receives is ``{"task_index", "split"}``: the program derives its own
task from it (the example, ``examples/lightning_agent.py``, seeds a small arithmetic problem).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from environments.base import EnvConfig, Environment, TaskFamily, TaskInstance, derive_seed
from environments.registry import register_family
from stages.config_fields import param


@dataclass
class LightningConfig(EnvConfig):
    """Keys allowed under ``env.`` for the lightning family (Agent Lightning, Luo et al. 2025)."""

    name: str = param("lightning", help="task family (registry name)")
    agent_command: str = param(
        "{python} examples/lightning_agent.py",
        help="the agent program (shell words; '{python}' = this interpreter), run in the working directory with "
             "CREDITFLOW_LIGHTNING_URL (the OpenAI-compatible base URL) and CREDITFLOW_LIGHTNING_EPISODES (a JSON "
             "file of the episodes to play) in its environment (Agent Lightning's decoupled execution, Luo et al. 2025)",
        check=lambda v: None if isinstance(v, str) and v.strip() else "must name a program",
        rule="non-empty")
    agent_timeout: float = param(300.0, help="seconds the agent program may run per rollout; then it is killed and its "
                                            "unreported episodes end with reason agent_timeout", gt=0)
    max_calls: int = param(8, help="LLM calls one episode may make (the endpoint refuses more: HTTP 400)", ge=1)
    train_size: int = param(64, help="train-split task pool size (task_index 0..train_size-1)", ge=1)
    eval_size: int = param(16, help="eval-split task pool size", ge=1)
    warmup_corpus: str = param(
        "", help="JSON file of format warm-up episodes [[prompt, [[completion, next_user_text], ...]], ...] in the "
                 "endpoint's chat rendering; '' = a generic chat corpus of small-integer questions with random answers")


#: how the endpoint renders a chat request as the policy's text (and the warm-up corpus is written):
#: ``"<role>: <content>\n"`` per message, then ``"assistant: "``; a completion ends at its newline
CHAT_TURN = "{role}: {content}\n"
CHAT_OPEN = "assistant: "


def render_chat(messages: list[dict[str, Any]]) -> str:
    """The policy's text of a chat request (see :data:`CHAT_TURN`); ``ValueError`` on a malformed message."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ValueError(f"messages[{i}] must be an object with a string 'role'")
        content = m.get("content", "")
        if isinstance(content, list):  # OpenAI content parts: the text parts, in order
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string or a list of text parts")
        out.append(CHAT_TURN.format(role=m["role"], content=content))
    return "".join(out) + CHAT_OPEN


class _NoEnvironment(Environment):
    """Placeholder: a lightning episode is played by the agent program, never stepped here."""

    def __init__(self, family: str):
        self.family = family

    def _refuse(self) -> RuntimeError:
        return RuntimeError(f"env {self.family!r}: episodes are played by env.agent_command "
                            "(stages.rollout.lightning.AgentProgramPlayer), not stepped in the agent loop")

    def reset(self) -> str:
        raise self._refuse()

    def step(self, action_text: str) -> Any:
        raise self._refuse()

    def state_key(self) -> str:
        raise self._refuse()


@register_family
class LightningFamily(TaskFamily):
    """Episodes of an outside agent program (Agent Lightning, Luo et al. 2025; survey §5.7)."""

    name = "lightning"
    Config = LightningConfig
    external_agent = True

    def instance(self, split: str, index: int, seed: int) -> TaskInstance:
        size = self.cfg.train_size if split == "train" else self.cfg.eval_size
        index = index % size
        return TaskInstance(task_id=f"lightning-{split}-{index}", split=split,
                            seed=derive_seed("lightning-instance", split, seed, index),
                            spec={"task_index": index, "split": split})

    def make(self, instance: TaskInstance, sandbox: Any = None, episode_seed: int = 0) -> Environment:
        return _NoEnvironment(self.name)

    def describe(self) -> dict[str, str]:
        c = self.cfg
        return {
            "source": f"episodes played by the agent program `{c.agent_command}` against the served policy "
                      "(Agent Lightning's decoupled execution); the program derives its task from (split, task_index)",
            "size": f"train: {c.train_size} task indices; eval: {c.eval_size} task indices",
            "filtering": "none (the program defines its tasks; splits are its task indices of 'train' and 'eval')",
            "metric": "success and reward as the agent program reports them (POST /v1/episodes/{id}/reward); an "
                      "episode without a report ends with reward 0 and its reason (no_reward, agent_exit:<code>, "
                      "agent_timeout)",
            "benchmark": "lightning (outside agent program)",
            "ground_truth": "none",
            "text_protocol": "OpenAI-compatible /v1/chat/completions (messages rendered '<role>: <content>\\n' + "
                             "'assistant: ') and /v1/completions; a completion ends at its newline",
        }

    def profile(self) -> Optional[dict[str, Any]]:
        return {"setting": "agentic", "turns": 2, "trajectory_tokens": 64, "verifiable_intermediate": False,
                "verifiable_outcome": True, "stochastic": False, "partially_observable": True,
                "privileged_info": False, "num_agents": 1}

    def warmup_corpus(self, n: int, seed: int) -> list[tuple[str, list[tuple[str, str]]]]:
        """Format warm-up episodes in the endpoint's chat rendering: ``env.warmup_corpus``'s, or a
        generic chat corpus (a small-integer question, a random integer answer, a follow-up
        question, a random answer: teaches the answer-line format, not the answers)."""
        if self.cfg.warmup_corpus:
            data = json.loads(Path(self.cfg.warmup_corpus).read_text())
            episodes = [(str(p), [(str(a), str(o)) for a, o in steps]) for p, steps in data]
            if not episodes:
                raise ValueError(f"env.warmup_corpus={self.cfg.warmup_corpus!r} holds no episode")
            return [episodes[i % len(episodes)] for i in range(n)]
        rng = random.Random(f"lightning-warmup:{seed}")
        out = []
        for _ in range(n):
            a, b, c = rng.randrange(10), rng.randrange(10), rng.randrange(10)
            prompt = render_chat([{"role": "user", "content": f"{a}+{b}=?"}])
            follow = CHAT_TURN.format(role="user", content=f"+{c}=?") + CHAT_OPEN
            out.append((prompt, [(str(rng.randrange(28)), follow), (str(rng.randrange(28)), "")]))
        return out
