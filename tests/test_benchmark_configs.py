"""Every checked-in benchmark config (configs/benchmark/*.yaml) parses and every one of its
(task, method) pairs loads as a training config: a config a user runs by name never fails on a
rule after its first cells have spent compute."""

from __future__ import annotations

from pathlib import Path

import pytest

CONFIGS = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "configs" / "benchmark").glob("*.yaml"))


def test_the_agentic_catalogue_has_a_benchmark():
    from flows.benchmark_config import load_benchmark_config, to_object

    assert "agentic" in CONFIGS
    obj = to_object(load_benchmark_config("agentic"))
    assert {"gigpo", "carl", "starpo", "itpo", "turn_ppo", "poad", "spa"} <= set(obj.methods)
    assert obj.methods[0] == "grpo" and "oracle" in obj.methods  # the two ends of the gap-closed scale


@pytest.mark.parametrize("name", CONFIGS)
def test_benchmark_config_loads_every_cell(name):
    from flows.benchmark_config import cells, check_cells, load_benchmark_config, to_object

    obj = to_object(load_benchmark_config(name))
    check_cells(obj)
    cs = cells(obj)
    per_method = {m: sum(c.method == m for c in cs) for m in obj.methods}
    assert len(set(per_method.values())) == 1 and len(cs) == sum(per_method.values())  # a full grid
    assert len({(c.method, c.task, c.seed, c.lr) for c in cs}) == len(cs)
