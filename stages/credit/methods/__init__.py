"""Built-in credit-assignment methods; importing a module registers its methods.

* :mod:`.episode` — episode-level baselines: GRPO, RLOO, REINFORCE++ (+ group baseline) and
  PPO's GAE with a learned critic (survey §2.3, §2.5).
"""

from stages.credit.methods import episode  # noqa: F401
