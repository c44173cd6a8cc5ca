"""Learning works: GRPO lifts the tiny policy well above chance on a small bifurcation task.

Seeded and deterministic on CPU; asserts only the direction and a margin, no wall-clock."""

from flows.api import run_plain

SMALL_TASK = [
    "env.horizon=2", "env.num_decisive=1",  # chance level 0.5
    "rollout.tasks_per_iteration=8", "rollout.group_size=8",
    "iterations=10", "eval_episodes=64", "seed=0",
]


def test_grpo_improves_success_on_small_bifurcation(shared_home):
    out = run_plain(SMALL_TASK, home=shared_home)
    assert out["success_before"] < 0.7  # warm-up taught format, not the answer
    assert out["success_after"] >= out["success_before"] + 0.25, out
