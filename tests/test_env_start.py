"""Environment construction faults (survey §8.2): a group whose environments fail to start is
retried, then dropped whole — never a group with missing members — and the drop is counted."""

from __future__ import annotations

import pytest

from environments.base import TaskInstance
from environments.construct import EnvSlot
from environments.start import EnvStartError, start_environments


class Box:
    closed = 0

    def close(self):
        Box.closed += 1


class Env:
    def __init__(self, family, inst):
        self.family, self.inst = family, inst

    def reset(self):
        self.family.resets[self.inst.task_id] = self.family.resets.get(self.inst.task_id, 0) + 1
        mode = self.inst.spec["mode"]
        if mode == "always" or (mode == "once" and self.family.resets[self.inst.task_id] == 1):
            raise RuntimeError(f"cannot start {self.inst.task_id}")
        return "prompt"

    def close(self):
        self.family.env_closed += 1


class Family:
    """Test double: instance ``spec['mode']`` says whether its environments start."""

    needs_sandbox = True

    def __init__(self):
        self.resets, self.env_closed = {}, 0

    def make(self, instance, sandbox=None, episode_seed=0):
        assert sandbox is not None
        return Env(self, instance)


def _slots(modes):
    out = []
    for g, mode in enumerate(modes):
        inst = TaskInstance(f"task-{g}-{mode}", "train", g, {"mode": mode})
        out += [EnvSlot(f"g{g}-{k}", inst, g, k) for k in range(3)]
    return out




def test_failed_group_is_retried_then_dropped_whole():
    Box.closed = 0
    fam = Family()
    slots = _slots(["ok", "always", "once", "ok"])
    kept, envs, boxes, prompts, info = start_environments(fam, slots, retries=2, new_sandbox=Box)
    # group 1 never starts: dropped whole after 1 + 2 attempts; group 2 starts on its second attempt
    assert sorted({s.group_id for s in kept}) == [0, 2, 3]
    assert all(sum(s.group_id == g for s in kept) == 3 for g in (0, 2, 3))  # no group with missing members
    assert info["dropped_groups"] == 1
    assert info["start_failures"] == 3 + 1
    assert len(envs) == len(boxes) == len(prompts) == 9
    assert any("group 1 attempt 3" in r for r in info["failure_reasons"])
    # everything made for failed attempts was closed: 4 failed attempts x 3 sandboxes
    assert Box.closed == 12


def test_zero_retries_drops_at_first_failure():
    fam = Family()
    kept, *_, info = start_environments(fam, _slots(["once", "ok"]), retries=0, new_sandbox=Box)
    assert {s.group_id for s in kept} == {1}
    assert info["dropped_groups"] == 1 and info["start_failures"] == 1


def test_all_groups_failing_is_a_clear_error():
    with pytest.raises(EnvStartError, match="every group's environment failed to start"):
        start_environments(Family(), _slots(["always", "always"]), retries=1, new_sandbox=Box)
