#!/usr/bin/env python3
"""A small agent program that creditflow trains without knowing its code (Agent Lightning's
decoupled execution, Luo et al. 2025; creditflow's ``env=lightning``).

It uses nothing of creditflow: plain HTTP to an OpenAI-compatible endpoint (urllib + json, what
any OpenAI client sends), so the same program runs against any such server. creditflow starts it
with two environment variables:

* ``CREDITFLOW_LIGHTNING_URL``: the endpoint's base URL (``http://127.0.0.1:<port>/v1``);
* ``CREDITFLOW_LIGHTNING_EPISODES``: a JSON file listing the episodes to play, each
  ``{"episode_id", "task_index", "split", "seed", ...}``.

The task (two chained LLM calls): the program draws three digits a, b, c from (split, task_index),
asks ``"a+b=?"``, then, appending the model's answer to the chat history, asks ``"+c=?"``. Its own
reward: 1.0 when the final answer is a+b+c, else 0.5 / (1 + |answer - (a+b+c)|) for an integer
answer and 0 for anything else (closeness credit, so an untrained policy already sees reward
differences). It reports each episode's
outcome to ``POST /v1/episodes/<id>/reward``. Every call names its episode with the
``X-Episode-Id`` header (the ``user`` field works too).

Fault options, for tests: ``--no-reward-for I`` skips the report of episode number I (0-based),
``--crash-at I`` exits with status 3 after the first call of episode I.

Run it by hand against a creditflow run::

    creditflow train env=lightning 'env.agent_command={python} examples/lightning_agent.py' credit=lightning
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import urllib.request


def post(url: str, body: dict, episode: str) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", "X-Episode-Id": episode})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())


def chat(base: str, episode: str, messages: list[dict]) -> str:
    out = post(f"{base}/chat/completions", {"model": "policy", "messages": messages, "max_tokens": 6,
                                            "user": episode}, episode)
    return out["choices"][0]["message"]["content"]


def as_int(text: str):
    m = re.fullmatch(r"\s*(-?\d+)\s*", text)
    return int(m.group(1)) if m else None


def play(base: str, ep: dict, crash: bool) -> tuple[float, bool]:
    rng = random.Random(f"{ep['split']}:{ep['task_index']}")
    a, b, c = rng.randrange(10), rng.randrange(10), rng.randrange(10)
    messages = [{"role": "user", "content": f"{a}+{b}=?"}]
    first = chat(base, ep["episode_id"], messages)
    if crash:
        sys.exit(3)
    messages += [{"role": "assistant", "content": first}, {"role": "user", "content": f"+{c}=?"}]
    second = chat(base, ep["episode_id"], messages)
    answer = as_int(second)
    if answer == a + b + c:
        return 1.0, True
    return (0.0 if answer is None else 0.5 / (1 + abs(answer - (a + b + c)))), False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--no-reward-for", type=int, default=-1)
    ap.add_argument("--crash-at", type=int, default=-1)
    args = ap.parse_args()
    base = os.environ["CREDITFLOW_LIGHTNING_URL"].rstrip("/")
    with open(os.environ["CREDITFLOW_LIGHTNING_EPISODES"]) as fh:
        episodes = json.load(fh)
    for i, ep in enumerate(episodes):
        reward, success = play(base, ep, crash=i == args.crash_at)
        if i != args.no_reward_for:
            post(f"{base}/episodes/{ep['episode_id']}/reward", {"reward": reward, "success": success},
                 ep["episode_id"])


if __name__ == "__main__":
    main()
