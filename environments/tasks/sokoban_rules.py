"""Sokoban's rules: the level text, the four moves, pushes, the goal (standard library only).

The one implementation of the game's dynamics, used three ways: by the family in-process
(:mod:`environments.tasks.sokoban`), by the exact solver (:mod:`environments.tasks.sokoban_solver`)
to enumerate the state space, and **as the step script of the sandboxed mode**: the family writes
this very file into the episode's sandbox and runs ``python3 -I -S sokoban_rules.py`` once per
turn (:func:`main`), so it imports nothing but ``json`` and ``sys``.

Level text (RAGEN's Sokoban symbols, Wang et al. 2025, with ``*`` for a box on a target where
RAGEN prints the non-ASCII ``√``)::

    #  wall            _  floor
    O  target          X  box
    *  box on target   P  player
    S  player on target

A state is ``(player, boxes)``: the player's cell and the sorted tuple of the boxes' cells, a
cell being ``row * width + col``. Moves ``up/down/left/right``: the player steps onto a free
cell; onto a box, it pushes the box one cell further if that cell is free (no wall, no box),
otherwise nothing moves; into a wall nothing moves. Moves that change nothing are still valid
actions (they use up the turn). Solved: every box on a target (levels have as many targets as
boxes).

Action text: lenient about case and whitespace, and RAGEN's ``<answer>Up</answer>`` wrapper is
accepted; anything else is invalid, with a reason (:func:`parse_action`).
"""

import json
import sys

ACTIONS = ("up", "down", "left", "right")
#: (row, col) change of each move
DELTAS = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}
WALL, FLOOR, TARGET, BOX, BOX_ON_TARGET, PLAYER, PLAYER_ON_TARGET = "#", "_", "O", "X", "*", "P", "S"
LEGEND = "# wall, _ floor, O target, X box, * box on target, P player, S player on target"


def parse_level(rows):
    """``(width, height, walls, targets, (player, boxes))`` of a level's text rows."""
    height, width = len(rows), len(rows[0]) if rows else 0
    if height < 3 or any(len(r) != width for r in rows):
        raise ValueError(f"level rows must form a rectangle of at least 3 rows, got {rows!r}")
    walls, targets, boxes, players = set(), set(), [], []
    for r, row in enumerate(rows):
        for c, ch in enumerate(row):
            i = r * width + c
            if ch not in "#_OX*PS":
                raise ValueError(f"unknown level symbol {ch!r} at row {r}, col {c}")
            if ch == WALL or r in (0, height - 1) or c in (0, width - 1):
                if ch != WALL:
                    raise ValueError(f"level border must be wall, got {ch!r} at row {r}, col {c}")
                walls.add(i)
            if ch in (TARGET, BOX_ON_TARGET, PLAYER_ON_TARGET):
                targets.add(i)
            if ch in (BOX, BOX_ON_TARGET):
                boxes.append(i)
            if ch in (PLAYER, PLAYER_ON_TARGET):
                players.append(i)
    if len(players) != 1:
        raise ValueError(f"a level has exactly one player, got {len(players)}")
    if not boxes or len(boxes) != len(targets):
        raise ValueError(f"a level has as many targets as boxes (at least one), got {len(boxes)} boxes, "
                         f"{len(targets)} targets")
    return width, height, frozenset(walls), frozenset(targets), (players[0], tuple(sorted(boxes)))


def parse_action(text):
    """``(action, "")`` for a valid move, ``(None, reason)`` otherwise."""
    if not isinstance(text, str):
        return None, "not text"
    a = text.strip()
    low = a.lower()
    if low.startswith("<answer>") and low.endswith("</answer>"):
        a = a[len("<answer>"): len(a) - len("</answer>")].strip()
    a = a.lower()
    if not a:
        return None, "empty action"
    if a not in DELTAS:
        return None, "not one of up, down, left, right"
    return a, ""


def move(width, walls, state, action):
    """``(next state, pushed)`` of a valid ``action`` in ``state`` (deterministic)."""
    player, boxes = state
    dr, dc = DELTAS[action]
    step = dr * width + dc
    nxt = player + step
    if nxt in walls:
        return state, False
    if nxt in boxes:
        beyond = nxt + step
        if beyond in walls or beyond in boxes:
            return state, False
        return (nxt, tuple(sorted(beyond if b == nxt else b for b in boxes))), True
    return (nxt, boxes), False


def is_solved(targets, state):
    return all(b in targets for b in state[1])


def render(width, height, walls, targets, state):
    """The level's text rows in ``state``."""
    player, boxes = state
    box_set = set(boxes)
    rows = []
    for r in range(height):
        row = []
        for c in range(width):
            i = r * width + c
            if i in walls:
                row.append(WALL)
            elif i in box_set:
                row.append(BOX_ON_TARGET if i in targets else BOX)
            elif i == player:
                row.append(PLAYER_ON_TARGET if i in targets else PLAYER)
            else:
                row.append(TARGET if i in targets else FLOOR)
        rows.append("".join(row))
    return rows


def main():
    """One turn inside a sandbox: ``sok_level.json`` (``rows``) and ``sok_state.json``
    (``player``, ``boxes``, ``t``) in the work directory, ``{"action": text|null}`` on stdin;
    writes the new state and prints ``{"a", "reason", "player", "boxes", "pushed", "solved", "t"}``."""
    with open("sok_level.json") as f:
        level = json.load(f)
    with open("sok_state.json") as f:
        st = json.load(f)
    width, height, walls, targets, _ = parse_level(level["rows"])
    state = (int(st["player"]), tuple(int(b) for b in st["boxes"]))
    a, reason = parse_action(json.loads(sys.stdin.read() or "{}").get("action"))
    pushed = False
    if a is not None:
        state, pushed = move(width, walls, state, a)
    t = int(st["t"]) + 1
    with open("sok_state.json", "w") as f:
        json.dump({"player": state[0], "boxes": list(state[1]), "t": t}, f)
    out = {"a": a, "reason": reason, "player": state[0], "boxes": list(state[1]), "pushed": pushed,
           "solved": is_solved(targets, state), "t": t}
    sys.stdout.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
