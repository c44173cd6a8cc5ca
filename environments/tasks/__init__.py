"""Built-in task families; importing this package registers them (see environments.registry)."""

from environments.tasks import bifurcation  # noqa: F401  (registers "bifurcation")
from environments.tasks import code  # noqa: F401  (registers "code")
from environments.tasks import frozenlake  # noqa: F401  (registers "frozenlake")
from environments.tasks import gym_adapter  # noqa: F401  (registers "gym")
from environments.tasks import math  # noqa: F401  (registers "math")
from environments.tasks import minigrid_env  # noqa: F401  (registers "minigrid")
from environments.tasks import sokoban  # noqa: F401  (registers "sokoban")
from environments.tasks import textgame  # noqa: F401  (registers "textgame")
from environments.tasks import tooluse  # noqa: F401  (registers "tooluse")
from environments.tasks import lightning  # noqa: F401  (registers "lightning")
