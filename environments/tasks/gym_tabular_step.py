"""One transition of a tabular Gymnasium environment, computed inside a sandbox (standard library only).

Written into the sandbox work directory as ``gym_step.py`` by the Gymnasium adapter's sandboxed
mode (``env.sandboxed=true``, :mod:`environments.tasks.gym_adapter`) and run as
``python3 -I -S gym_step.py`` once per valid action. It reads ``gym_table.json`` (written at reset:
``P`` = state -> action -> [[p, next state, reward, terminated], ...], the environment's
``unwrapped.P``, and ``uniforms``, the values the in-process environment's ``np_random.random()``
would return, one per step), ``gym_state.json`` (``s``, ``k`` = steps taken), the action as JSON on
stdin (``{"a": index}``), samples the next state exactly as Gymnasium's ``categorical_sample``
does (the first index whose cumulative probability exceeds the uniform), writes the new state
and prints one JSON line ``{"s": next, "r": reward, "terminated": bool, "p": prob}``.
"""

import json
import sys


def main():
    with open("gym_table.json") as f:
        table = json.load(f)
    with open("gym_state.json") as f:
        state = json.load(f)
    a = int(json.loads(sys.stdin.read() or "{}")["a"])
    s, k = int(state["s"]), int(state["k"])
    transitions = table["P"][str(s)][a]
    u = table["uniforms"][k]
    acc, i = 0.0, 0  # numpy.argmax of an all-False mask is 0
    for j, tr in enumerate(transitions):
        acc += tr[0]
        if acc > u:
            i = j
            break
    p, s2, r, done = transitions[i]
    with open("gym_state.json", "w") as f:
        json.dump({"s": int(s2), "k": k + 1}, f)
    sys.stdout.write(json.dumps({"s": int(s2), "r": float(r), "terminated": bool(done), "p": float(p)}) + "\n")


if __name__ == "__main__":
    main()
