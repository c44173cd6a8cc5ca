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


# --------------------------------------------------------------------------------------------
# turn-level judges of agent trajectories (TARL §5.1, CriticSearch §5.2, LaRe §5.7)
# --------------------------------------------------------------------------------------------


def trajectory_lines(traj) -> list[str]:
    """The task and every turn of an agent trajectory as numbered lines (action, then observation)."""
    lines = [f"Task: {_clean(traj.prompt_text)}"]
    for k, turn in enumerate(traj.turns):
        lines.append(f"Turn {k + 1}: action: {_clean(turn.action_text)} | observation: {_clean(turn.observation)}")
    lines.append(f"Outcome: {'success' if traj.success else 'failure'} (reward {float(traj.reward):g})")
    return lines


def gold_reference(privileged: dict) -> str:
    """The privileged reference a retrospective critic sees (CriticSearch): the gold answer, else the
    gold path; empty when the trajectory carries neither."""
    p = privileged or {}
    if p.get("answer") not in (None, ""):
        return f"Gold answer: {_clean(str(p['answer']))}"
    if p.get("gold_path"):
        return "Gold path: " + "; ".join(_clean(str(a)) for a in p["gold_path"])
    return ""


def critic_turn_prompt(traj, k: int, reference: str) -> str:
    """CriticSearch's retrospective critique of turn ``k``: the whole trajectory, the gold reference,
    "Was turn k useful toward the gold answer?" ending in ``"Answer:"``."""
    lines = trajectory_lines(traj) + ([reference] if reference else [])
    lines.append(f"Knowing the gold answer, was turn {k + 1} a useful step toward it? Answer yes or no.")
    return "\n".join(lines) + "\nAnswer:"


def adjudicate_turn_prompt(traj, k: int) -> str:
    """TARL's adjudication of turn ``k``: the whole trajectory and its outcome (no privileged
    information), "Did turn k contribute to completing the task?" ending in ``"Answer:"``."""
    lines = trajectory_lines(traj)
    lines.append(f"Did turn {k + 1} contribute to completing the task? Answer yes or no.")
    return "\n".join(lines) + "\nAnswer:"


def turn_quality_prompt(traj, k: int) -> str:
    """MT-GRPO's LLM-as-judge turn reward (Wei et al. 2025) for an unverifiable turn ``k``: the task and
    the turns up to and including ``k`` (no later turn, no outcome: a turn-level reward, judged when
    the turn is taken), "Was turn k a good step toward completing the task?" ending in ``"Answer:"``."""
    lines = trajectory_lines(traj)[: k + 2]
    lines.append(f"Was turn {k + 1} a good step toward completing the task? Answer yes or no.")
    return "\n".join(lines) + "\nAnswer:"


def explain_turn_prompt(traj, k: int) -> str:
    """LaRe's request for a natural-language credit explanation of turn ``k`` (one line)."""
    lines = trajectory_lines(traj)
    lines.append(f"In one sentence, explain why turn {k + 1} helped or hurt the outcome.")
    return "\n".join(lines) + "\nExplanation:"


def explanation_score_prompt(traj, k: int, explanation: str) -> str:
    """LaRe's conversion of an explanation into a scalar: the turn, its explanation, "Did it help?"."""
    lines = [f"Task: {_clean(traj.prompt_text)}", f"Turn {k + 1}: action: {_clean(traj.turns[k].action_text)}",
             f"Explanation: {_clean(explanation)}",
             f"Given this explanation, did turn {k + 1} help the outcome? Answer yes or no."]
    return "\n".join(lines) + "\nAnswer:"


def counterfactual_outcome_prompt(traj, k: int, action: str) -> str:
    """C3's model-based counterfactual (survey §5.2: an LLM estimates the outcome instead of a
    replay): the task, the turns before ``k`` as they happened, turn ``k`` with the counterfactual
    ``action`` in place of the real one (no observation: it was never executed, and no later turn or
    outcome), "Will the episode end in success?" ending in ``"Answer:"``."""
    lines = trajectory_lines(traj)[: k + 1]
    lines.append(f"Turn {k + 1}: action: {_clean(action)}")
    lines.append(f"If the agent takes this action at turn {k + 1} and then plays on, will the episode end in "
                 "success? Answer yes or no.")
    return "\n".join(lines) + "\nAnswer:"
