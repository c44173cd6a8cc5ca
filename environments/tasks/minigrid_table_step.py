"""One MiniGrid transition computed inside a sandbox from the exported table (standard library only).

Written into the sandbox work directory as ``minigrid_step.py`` by the MiniGrid family's
sandboxed mode (``env.sandboxed=true``, :mod:`environments.tasks.minigrid_env`) and run as
``python3 -I -S minigrid_step.py`` once per stepped action. It reads ``minigrid_table.json``
(written at reset: ``next`` = state index -> action index -> next state index, ``success`` and
``terminal`` flags of the same shape, ``max_steps``: MiniGrid's step limit), ``minigrid_state.json``
(``s``: state index, ``k``: MiniGrid steps taken), the action as JSON on stdin (``{"a": index}``),
applies MiniGrid's rules for the reward and the end of the episode (``MiniGridEnv.step``: reward
``1 - 0.9 * (step_count / max_steps)`` when the step reaches the goal, else 0; truncated when
``step_count >= max_steps``), writes the new state and prints one JSON line
``{"s": next, "r": reward, "terminated": bool, "truncated": bool}``.
"""

import json
import sys


def main():
    with open("minigrid_table.json") as f:
        table = json.load(f)
    with open("minigrid_state.json") as f:
        state = json.load(f)
    a = int(json.loads(sys.stdin.read() or "{}")["a"])
    s, k = int(state["s"]), int(state["k"])
    step_count, max_steps = k + 1, int(table["max_steps"])
    s2 = int(table["next"][s][a])
    reward = 1 - 0.9 * (step_count / max_steps) if table["success"][s][a] else 0.0
    terminated = bool(table["terminal"][s][a])
    truncated = step_count >= max_steps
    with open("minigrid_state.json", "w") as f:
        json.dump({"s": s2, "k": step_count}, f)
    out = {"s": s2, "r": float(reward), "terminated": terminated, "truncated": truncated}
    sys.stdout.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
