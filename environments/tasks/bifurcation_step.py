"""One transition of a bifurcation episode, computed inside a sandbox (standard library only).

Written into the sandbox work directory as ``bif_step.py`` by the bifurcation family's sandboxed
mode (``env.sandboxed=true``) and run as ``python3 -I -S bif_step.py`` once per turn. It reads
``bif_spec.json`` (written at reset: ``letters``, ``decisive`` flags, ``answers``, ``slips``,
``decisive_reward``, ``terminate_on_error``) and ``bif_state.json`` (``t``, ``on``, ``done``),
reads the action as JSON on stdin (``{"action": "<text>"}`` or ``{"action": null}`` for a
non-string action), applies exactly the rules of ``bifurcation_dp.Dynamics.step`` (``variant=decisive``) and
``parse_action``, writes the new ``bif_state.json`` and prints one JSON line
``{"a": letter|null, "on": bool, "reward": float, "terminated": bool, "t": next_t}``.
"""

import json
import sys


def parse_action(text, letters):
    a = text.strip() if isinstance(text, str) else None
    return a if a is not None and len(a) == 1 and a in letters else None


def main():
    with open("bif_spec.json") as f:
        spec = json.load(f)
    with open("bif_state.json") as f:
        state = json.load(f)
    action = json.loads(sys.stdin.read() or "{}").get("action")
    t, on = int(state["t"]), bool(state["on"])
    if state["done"] or t >= len(spec["decisive"]):
        raise SystemExit("episode is over")
    a = parse_action(action, spec["letters"])
    decisive = bool(spec["decisive"][t])
    correct = decisive and a is not None and a == spec["answers"][t]
    error = a is None or (decisive and not correct)
    reward = float(spec["decisive_reward"]) if correct else 0.0
    terminated = False
    if error:
        on, terminated = False, bool(spec["terminate_on_error"])
    elif correct and spec["slips"][t]:
        on = False
    t += 1
    done = terminated or t >= len(spec["decisive"])
    with open("bif_state.json", "w") as f:
        json.dump({"t": t, "on": on, "done": done}, f)
    sys.stdout.write(json.dumps({"a": a, "on": on, "reward": reward, "terminated": terminated, "t": t}) + "\n")


if __name__ == "__main__":
    main()
