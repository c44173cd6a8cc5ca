"""Built-in task families; importing this package registers them (see environments.base)."""

from environments.tasks import bifurcation  # noqa: F401  (registers "bifurcation")
