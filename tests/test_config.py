"""Config schema: groups, dotlist overrides, clear errors naming the key before compute."""

import pytest
from omegaconf import OmegaConf

from flows.config import ConfigError, config_hash, flatten, load_config, to_object


def test_defaults_resolve_and_round_trip():
    cfg = load_config([])
    assert cfg.credit.method == "grpo"
    assert cfg.env.name == "bifurcation"
    obj = to_object(cfg)
    assert obj.update.loss == "grpo"
    again = load_config([], base=OmegaConf.create(OmegaConf.to_yaml(cfg)))
    assert config_hash(again) == config_hash(cfg)


def test_issue_example_overrides():
    cfg = load_config(["credit=grpo", "update.lr=1e-5", "env=bifurcation", "iterations=20", "seed=3"])
    assert cfg["update"].lr == pytest.approx(1e-5)
    assert cfg.iterations == 20 and cfg.seed == 3


def test_env_group_option_named_differently_from_family():
    cfg = load_config(["env=bifurcation_long"])
    assert cfg.env.name == "bifurcation" and cfg.env.horizon == 12 and cfg.env.terminate_on_error


def test_group_switch_gives_method_schema():
    cfg = load_config(["credit=gae", "credit.lam=0.9"])
    assert cfg.credit.method == "gae" and cfg.credit.lam == pytest.approx(0.9)
    # keys of another method are rejected for this one
    with pytest.raises(ConfigError, match=r"^credit.lam=0.9: unknown key; allowed under 'credit'"):
        load_config(["credit=grpo", "credit.lam=0.9"])
    # credit.method=... re-selects the group
    assert load_config(["credit.method=rloo"]).credit.method == "rloo"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["update.lrr=1"], r"^update.lrr=1: unknown key; allowed under 'update'.*lr"),
        (["bogus=1"], r"^bogus=1: unknown key; allowed at top level"),
        (["update.lr=abc"], r"^update.lr=abc: wrong type: must be a float"),
        (["iterations=many"], r"^iterations=many: wrong type: must be an int"),
        (["credit=nosuch"], r"^credit=nosuch: unknown credit method; known: .*grpo"),
        (["env=nosuch"], r"^env=nosuch: unknown task family; known: .*bifurcation"),
        (["model.path=/nonexistent/model"], r"^model.path=/nonexistent/model: .*does not exist"),
        (["iterations=0"], r"^iterations=0: must be an integer >= 1"),
        (["update.loss=nosuch"], r"^update.loss=nosuch: must be one of dpo, grpo, ppo"),
        (["rollout.engine=vllm"], r"^rollout.engine=vllm: the vllm package is not installed"),
        (["rollout.engine=tgi"], r"^rollout.engine=tgi: must be one of hf, vllm"),
        (["debug.crash_at=2:nowhere"], r"^debug.crash_at=2:nowhere: must look like ITER:STAGE"),
        (["noequals"], r"must look like key=value"),
        (["sandbox.snapshot_mode=criu"], r"^sandbox.snapshot_mode=criu: must be one of archive, commit"),
        (["sandbox.backend=vm"], r"^sandbox.backend=vm: must be one of process, docker, auto"),
        (["sandbox.docker_exec=ssh"], r"^sandbox.docker_exec=ssh: must be one of resident, exec"),
    ],
)
def test_bad_config_messages(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides)


def test_model_path_without_config_json(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        load_config([f"model.path={tmp_path}"])


def test_hash_ignores_iterations_and_debug_but_not_lr():
    a = load_config([])
    assert config_hash(a) == config_hash(load_config(["iterations=99", "debug.crash_at=1:credit"]))
    assert config_hash(a) != config_hash(load_config(["update.lr=0.5"]))


def test_flatten_for_mlflow_params():
    flat = flatten(load_config([]))
    assert flat["credit.method"] == "grpo" and "update.lr" in flat and flat["model.path"] == "null"


def test_cli_config_show_and_error(capsys):
    from flows.cli import main

    assert main(["config", "show", "credit=gae"]) == 0
    assert "method: gae" in capsys.readouterr().out
    assert main(["config", "show", "update.nope=1"]) == 2
    assert capsys.readouterr().err.startswith("creditflow: config error: update.nope=1: unknown key")


def test_docker_backend_without_an_engine_fails_before_compute(monkeypatch):
    """sandbox.backend=docker when no engine answers: a config error naming the key, the reason
    and the fix, before anything is built."""
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    with pytest.raises(ConfigError, match=r"^sandbox.backend=docker: .*"):
        load_config(["sandbox.backend=docker"])
