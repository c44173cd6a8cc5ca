"""Planning text of the task families: the *strategic grams* HICRA amplifies (Wang et al. 2025c,
"Emergent Hierarchical Reasoning in LLMs through Reinforcement Learning", arXiv 2509.03646, §3;
survey §3.3.4).

The paper splits a response into high-level *planning* tokens (deduction, branching,
backtracking: "we can use the fact that", "let's try a different approach", "but the problem
mentions") and low-level *execution* tokens (arithmetic, substitution, formula application); the
planning tokens are the tokens of Strategic Grams, n-grams that steer the reasoning. Which text
plans depends on a family's text protocol, so each family declares it once, as
:attr:`environments.base.TaskFamily.planning_pattern`: a regular expression whose matches in a
step's action text are planning text (``None``: the family's text has none). This module holds
the natural-language grams and the helper that turns grams into such a pattern.
"""

from __future__ import annotations

import re

#: strategic grams of natural-language reasoning (deduction, branching, backtracking, planning),
#: after the kinds of Wang et al. 2025c §3 ("let's try", "we can use", "but the problem mentions")
STRATEGIC_GRAMS: tuple[str, ...] = (
    "let's try", "let us try", "let me", "we can use", "we need to", "we need", "the key is", "first",
    "then we", "next we", "the plan", "plan:", "strategy", "approach", "instead", "alternatively", "another way",
    "but the problem", "wait", "on second thought", "let's check", "let's verify", "check", "notice that",
    "note that", "consider", "suppose", "break it down", "break down", "this means", "therefore", "so we",
    "recall that",
)


def grams_pattern(grams: tuple[str, ...] | list[str]) -> str:
    """A case-insensitive pattern matching any of ``grams`` as whole words (``"let me"`` does not
    match inside ``"letter meets"``); longer grams first so a match covers the whole gram."""
    parts = []
    for g in sorted({g.strip().lower() for g in grams if g.strip()}, key=len, reverse=True):
        left = r"(?<!\w)" if g[0].isalnum() else ""
        right = r"(?!\w)" if g[-1].isalnum() else ""
        parts.append(left + re.escape(g) + right)
    return "(?i:" + "|".join(parts) + ")" if parts else ""
