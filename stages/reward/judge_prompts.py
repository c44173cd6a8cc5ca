"""The prompts an LLM judge is given (CAPO, InT: survey §3.3.1, §3.3.3).

* :func:`step_prompt` — one step's judging prompt: problem, previous steps, the step, "Is this
  step correct? Answer yes or no." ending in ``"Answer:"`` so the verdict is the next word.
* :func:`correction_prompt` — InT's intervention prompt (Yang et al. 2026): the prefix, the
  wrong step (and optionally the reference solution), asking for the corrected step.
* :func:`batch_step_queries` — one judging prompt per step of every trajectory of a batch.
"""

from __future__ import annotations

from collections.abc import Sequence

from stages.schema import Batch


def _clean(text: str) -> str:
    return " ".join(str(text).strip().split("\n")).strip() if text else ""


def step_prompt(problem: str, previous: Sequence[str], step: str) -> str:
    """The judging prompt of one step: problem, the steps before it, the step, the question.
    Ends with ``"Answer:"`` so that the verdict is the next word (``" yes"`` / ``" no"``)."""
    lines = [f"Problem: {_clean(problem)}"]
    if previous:
        lines.append("Previous steps:")
        lines.extend(_clean(s) for s in previous)
    lines.append(f"Step: {_clean(step)}")
    lines.append("Is this step correct? Answer yes or no.")
    return "\n".join(lines) + "\nAnswer:"


def correction_prompt(problem: str, previous: Sequence[str], wrong_step: str,
                      reference: Sequence[str] = ()) -> str:
    """InT's intervention prompt: the prefix up to a wrong step, the wrong step, and a request for
    the corrected step (one line). With ``reference`` (the task's reference solution steps,
    privileged training-time information) the proposer sees it first, as in Yang et al. 2026
    (the model contrasts its trace with the reference to correct the first error)."""
    lines = [f"Problem: {_clean(problem)}"]
    if reference:
        lines.append("Reference solution:")
        lines.extend(_clean(s) for s in reference)
    if previous:
        lines.append("Previous steps:")
        lines.extend(_clean(s) for s in previous)
    lines.append(f"This next step is wrong: {_clean(wrong_step)}")
    return "\n".join(lines) + "\nCorrect next step:\n"  # a new line: the policy writes steps one per line


def batch_step_queries(batch: Batch) -> tuple[list[tuple[int, int]], list[str], int]:
    """``(positions, prompts, K)``: one judging prompt per step (turn) of every trajectory, with its
    ``(row, step)`` position; ``K = max(1, most turns)`` (the K of :class:`BatchTensors`)."""
    trajs = batch.trajectories
    K = max([len(t.turns) for t in trajs] + [1])
    positions: list[tuple[int, int]] = []
    prompts: list[str] = []
    for b, traj in enumerate(trajs):
        steps = [turn.action_text for turn in traj.turns]
        for k, step in enumerate(steps):
            positions.append((b, k))
            prompts.append(step_prompt(traj.prompt_text, steps[:k], step))
    return positions, prompts, K
