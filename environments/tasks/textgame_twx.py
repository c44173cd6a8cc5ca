"""The TextWorld Express engine shared by every text-game environment of a process (Jansen & Côté
2022, "TextWorldExpress: Simulating Text Games at One Million Steps Per Second").

TextWorld Express (``textworld_express``, PyPI) simulates its games in a JVM that the Python
package starts through py4j: one ``TextWorldExpressEnv`` launches one JVM (about 0.5 s here) and
drives one game through one ``PythonInterface`` object. The rollout stage plays a whole batch of
episodes at once, so this module starts **one** JVM per process (lazily, on first use; again
after a fork) and gives every game its own ``PythonInterface`` inside it: a new game costs a
Java object, not a JVM. :func:`new_game` returns a ``TextWorldExpressEnv`` on that shared gateway, so
``reset``/``step`` (score-delta reward, done rules) are the package's own code.

Lifetime: a game's ``close()`` detaches the game's Java object; the JVM is shut down at
interpreter exit (``atexit``) or by :func:`shutdown` (tests), and py4j's ``die_on_exit`` ends
it with its parent process in any case. py4j's INFO chatter is kept off the console (its logger
is set to WARNING); the JVM's own stdout/stderr go to ``/dev/null`` (py4j's default).
"""

from __future__ import annotations

import atexit
import logging
import os
import tempfile
import threading
from typing import Any, Optional

#: the TextWorld-family games of TextWorld Express (its other four, arithmetic, sorting,
#: simonsays and peckingorder, are not navigation/household games and are not offered)
GAMES = ("twc", "cookingworld", "coin", "mapreader")
#: the generation parameters each game accepts (TextWorld Express README, "Game parameters")
GAME_PARAMS: dict[str, tuple[str, ...]] = {
    "twc": ("numLocations", "numItemsToPutAway", "includeDoors", "limitInventorySize"),
    "cookingworld": ("numLocations", "numIngredients", "numDistractorItems", "includeDoors", "limitInventorySize"),
    "coin": ("numLocations", "numDistractorItems", "includeDoors", "limitInventorySize"),
    "mapreader": ("numLocations", "maxDistanceApart", "maxDistractorItemsPerLocation", "includeDoors",
                  "limitInventorySize"),
}
#: TextWorld Express's game folds (disjoint seed ranges: train 0..999, dev 10000..., test 20000...)
FOLDS = ("train", "dev", "test")

_LOCK = threading.Lock()
_STATE: dict[str, Any] = {"owner": None, "pid": None, "starts": 0}


def _owner() -> Any:
    """The process's ``TextWorldExpressEnv`` whose gateway (JVM) every game shares."""
    with _LOCK:
        if _STATE["owner"] is None or _STATE["pid"] != os.getpid():
            logging.getLogger("py4j").setLevel(logging.WARNING)
            from textworld_express import TextWorldExpressEnv

            _STATE["owner"] = TextWorldExpressEnv(envStepLimit=10**9)
            _STATE["pid"] = os.getpid()
            _STATE["starts"] += 1
        return _STATE["owner"]


def jvm_starts() -> int:
    """How many JVMs this process has started (1 after first use; tests check the sharing)."""
    return int(_STATE["starts"])


def shutdown() -> None:
    """Shut the shared JVM down (the next game starts a new one)."""
    with _LOCK:
        owner, _STATE["owner"] = _STATE["owner"], None
        _POOL.clear()
        if owner is not None and _STATE["pid"] == os.getpid():
            try:
                owner.close()
            except Exception:  # noqa: BLE001 - already gone
                pass


atexit.register(shutdown)


def fold_seeds(fold: str) -> list[int]:
    """The game seeds of a TextWorld Express fold (the same for every game)."""
    server = _owner().server
    get = {"train": server.getSeedsTrain, "dev": server.getSeedsDev, "test": server.getSeedsTest}[fold]
    return [int(s) for s in get()]


def check_params(game: str, params: str) -> Optional[str]:
    """TextWorld Express's own complaint about ``params`` for ``game`` (it loads the game), or None."""
    g = new_game()
    try:
        g.load(game, params)
    except ValueError as exc:
        return " ".join(str(exc).split())[:200]
    finally:
        g.close()
    return None


#: loaded games put back by :func:`release`, by (game, params): a new game costs ~45 ms (a
#: ``PythonInterface`` and a ``load``), a pooled one nothing; at most ``POOL_SIZE`` are kept
_POOL: dict[tuple[str, str], list[Any]] = {}
POOL_SIZE = 256


def acquire(game: str, params: str) -> Any:
    """A game of ``game`` loaded with ``params``: from the pool, else new (reset it before use)."""
    with _LOCK:
        free = _POOL.get((game, params))
        if free and _STATE["pid"] == os.getpid():
            return free.pop()
    g = new_game()
    g.load(game, params)
    return g


def release(g: Any) -> None:
    """Give a game from :func:`acquire` back (closed instead when the pool is full)."""
    with _LOCK:
        if _STATE["pid"] == os.getpid() and sum(map(len, _POOL.values())) < POOL_SIZE and not g._closed:
            _POOL.setdefault((g.gameName, g.gameParams), []).append(g)
            return
    g.close()


_GAME_CLASS: list[type] = []


def new_game() -> Any:
    """A new TextWorld Express game on the shared JVM: a ``TextWorldExpressEnv`` (subclass) whose
    ``server`` is its own ``PythonInterface``; ``load``/``reset``/``step`` are the package's code."""
    if not _GAME_CLASS:
        from textworld_express import TextWorldExpressEnv

        class SharedGatewayGame(TextWorldExpressEnv):
            """``TextWorldExpressEnv`` without a JVM of its own (see the module docstring)."""

            def __init__(self, owner: Any):  # mirrors TextWorldExpressEnv.__init__ minus the launch
                self._gateway = owner._gateway
                self.server = self._gateway.jvm.textworldexpress.runtime.PythonInterface()
                self.lastStepScore = 0
                self.envStepLimit = 10**9  # the family counts turns itself (env.max_steps)
                self.runHistory = []
                self.seed, self.gameName, self.gameParams = None, None, ""
                self.gameFold, self.generateGoldPath, self.goldPathGenerated = "train", False, False
                self._obj_tree_tempfile = tempfile.NamedTemporaryFile()
                self._closed = False

            def close(self) -> None:
                if getattr(self, "_closed", True):
                    return
                self._closed = True
                try:
                    self._gateway.detach(self.server)
                except Exception:  # noqa: BLE001 - the JVM may already be gone
                    pass
                self._obj_tree_tempfile.close()

        _GAME_CLASS.append(SharedGatewayGame)
    return _GAME_CLASS[0](_owner())
