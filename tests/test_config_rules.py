"""Bad input gets one clear line, before anything is created (issue 13).

Every config rule is declared at its field (:mod:`stages.config_fields`); ``load_config`` checks
the whole resolved config (core, family, method, update, sandbox, runner) before a run id exists.
The table below spans every section; a few rows go through the real CLI in a subprocess to show
exit code 2, exactly one stderr line, no traceback and no run directory or MLflow store."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest

import environments.tasks  # noqa: F401  (registers the built-in families)
from environments.registry import family_names, get_family_class
from flows.config import ConfigError, TrainConfig, describe_config, load_config
from stages.config_fields import HELP_KEY, check
import stages.credit.methods  # noqa: F401  (registers the built-in methods)
from stages.credit.registry import get_method_class, method_names

ROOT = Path(__file__).resolve().parent.parent

BAD = [
    # (overrides, key the one line must name, a fragment of the rule)
    (["iterations=0"], "iterations=0", ">= 1"),
    (["update.lr=nan"], "update.lr=nan", "finite"),
    (["update.lr=inf"], "update.lr=inf", "finite"),
    (["update.lr=-1e-3"], "update.lr=", "> 0"),
    (["env.horizon=0"], "env.horizon=0", ">= 1"),
    (["env.horizon=3", "env.num_decisive=5"], "env.num_decisive=5", "env.horizon"),
    (["credit=vineppo", "credit.k=0"], "credit.k=0", ">= 1"),
    (["credit=vineppo", "credit.gamma=1.5"], "credit.gamma=1.5", "<= 1"),
    (["credit=int", "credit.candidates=all"], "credit.candidates=all", "one of"),
    (["credit=red", "credit.process_reward=step_check"], "credit.process_reward=step_check", "prefix"),
    (["env=math", "credit=oracle"], "credit.method=oracle", "exact MDP"),
    (["rollout.top_p=1.5"], "rollout.top_p=1.5", ""),
    (["rollout.temperature=nan"], "rollout.temperature=nan", "finite"),
    (["sandbox.backend=vm"], "sandbox.backend=vm", "one of"),
    (["sandbox.exec_timeout_s=0"], "sandbox.exec_timeout_s=0", "> 0"),
    (["model.dtype=int8"], "model.dtype=int8", "one of"),
    (["iterations=three"], "iterations", ""),
    (["env.horizn=3"], "env.horizn=3", "unknown key"),
    (["credit=nosuch"], "credit=nosuch", "unknown credit method"),
    (["env=nosuch"], "env=nosuch", "unknown task family"),
    (["model.path=/nonexistent/model"], "model.path=/nonexistent/model", "does not exist"),
    (["credit=grpo", "rollout.group_size=1"], "rollout.group_size=1", "group"),
    (["credit=gae", "update.value_coef=0"], "update.value_coef=0", "critic"),
]


@pytest.mark.parametrize("overrides,key,fragment", BAD, ids=[" ".join(o) for o, _, _ in BAD])
def test_bad_input_is_one_line_naming_the_key(overrides, key, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(overrides)
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith(key), text
    assert fragment in text, text


def test_not_a_model_directory(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"^model.path=.*config.json"):
        load_config([f"model.path={tmp_path}"])


CLI_BAD = [["env.horizon=0"], ["update.lr=nan"], ["credit=grpo", "rollout.group_size=1"], ["credit=nosuch"],
           ["credit=hicra"]]  # bifurcation has no planning text: HICRA would be GRPO


@pytest.mark.parametrize("overrides", CLI_BAD, ids=[" ".join(o) for o in CLI_BAD])
def test_cli_refuses_before_anything_is_created(tmp_path, overrides):
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS",)}
    env.update(CREDITFLOW_HOME=str(home), PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "train", *overrides], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("creditflow: config error: "), proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not (home / "runs").exists() and not (home / "mlflow.db").exists()


def _config_classes():
    def nested(cls):
        hints = typing.get_type_hints(cls)
        yield cls
        for f in dataclasses.fields(cls):
            t = hints.get(f.name)
            if isinstance(t, type) and dataclasses.is_dataclass(t):
                yield from nested(t)

    yield from nested(TrainConfig)
    for name in method_names():
        yield get_method_class(name).Config
    for name in family_names():
        yield get_family_class(name).Config


def test_every_field_has_help_and_passes_its_own_rules_at_default():
    missing = []
    for cls in _config_classes():
        if not cls.__module__.startswith(("stages.", "environments.", "flows.")):
            continue  # a config class a test registers for its own purposes
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            section = isinstance(hints.get(f.name), type) and dataclasses.is_dataclass(hints[f.name])
            if not section and not str(f.metadata.get(HELP_KEY, "")).strip():
                missing.append(f"{cls.__name__}.{f.name}")
    assert not missing, f"fields without help metadata: {missing}"
    for name in method_names():
        assert check(get_method_class(name).Config(), "credit") == [], name


def test_config_describe_prints_help_default_and_rule():
    text = describe_config("credit", ["credit=vineppo"])
    assert "credit.k" in text and ">= 1" in text
    text = describe_config("env", ["env=bifurcation"])
    assert "env.horizon" in text
    with pytest.raises(ConfigError):
        describe_config("nosuchgroup", [])
