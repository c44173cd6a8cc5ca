"""Built-in credit-assignment methods; importing a module registers its methods.

* :mod:`.episode` — episode-level baselines: GRPO, RLOO, REINFORCE++ (+ group baseline) and
  PPO's GAE with a learned critic (survey §2.3, §2.5).
* :mod:`.montecarlo` — VinePPO (§3.1.1) and SPO (§3.2): Monte Carlo values from continuations.
* :mod:`.prefix_tree` — TEMPO: TD over the prefix tree of a group (§3.2).
* :mod:`.shapley` — SCAR: Shapley values over steps (§3.2).
* :mod:`.redistribution` — RED: holistic reward redistributed over steps (§3.1.2).
* :mod:`.critic_llm` — CAPO (§3.3.3) and InT (§3.3.1): an LLM critic judges steps.
* :mod:`.planning` — HICRA: amplified credit on planning tokens (§3.3.4).
* :mod:`.attribution` — ACPO: attribution-based factorized credit (§3.3.2).
* :mod:`.process` — PURE, SPRO, PRL: process rewards and their aggregation (§3.3.1).
* :mod:`.implicit` — implicit token credit from DPO (From r to Q*, §3.1.3) and T-REG (§3.1.2).
* :mod:`.oracle` — exact advantages from the task's MDP under the current policy (§9.3; the
  benchmark's upper bound, not a reviewed paper).
"""

from stages.credit.methods import episode  # noqa: F401
from stages.credit.methods import montecarlo  # noqa: F401  (vineppo, spo)
from stages.credit.methods import prefix_tree  # noqa: F401  (tempo)
from stages.credit.methods import redistribution  # noqa: F401  (red)
from stages.credit.methods import shapley  # noqa: F401  (scar)
from stages.credit.methods import critic_llm  # noqa: F401  (capo, int)
from stages.credit.methods import planning  # noqa: F401  (hicra)
from stages.credit.methods import attribution  # noqa: F401  (acpo)
from stages.credit.methods import process  # noqa: F401  (pure, spro, prl)
from stages.credit.methods import implicit  # noqa: F401  (dpo_implicit, t_reg)
from stages.credit.methods import oracle  # noqa: F401  (oracle)
