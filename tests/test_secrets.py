"""Secrets stay in the environment: masks (unit), and a real run that leaves no trace of one.

The run test puts a secret value into an environment variable, makes the config reach it (an
``${oc.env:...}`` interpolation in ``report.notes`` and ``run_name``: text that goes to MLflow
params, the run name and the checklist), and then greps everything the run wrote — the whole
CREDITFLOW_HOME (run directory, persisted results, MLflow's SQLite store, every artifact
downloaded through MLflow), the Prefect flow run's parameters, and the captured stdout/stderr —
for the value.
"""

from __future__ import annotations

import io
import logging
import secrets as pysecrets
from pathlib import Path

import pytest

from flows import secrets as S
from tests.server_support import TINY  # the tiny one-iteration training


# ------------------------------------------------------------------------------ unit
@pytest.mark.parametrize("name, secret", [
    ("OPENAI_API_KEY", True), ("CREDITFLOW_JUDGE_API_KEY", True), ("HF_TOKEN", True),
    ("MLFLOW_TRACKING_TOKEN", True), ("AWS_SECRET_ACCESS_KEY", True), ("POSTGRES_PASSWORD", True),
    ("MLFLOW_TRACKING_PASSWORD", True), ("my_client_secret", True),
    ("PATH", False), ("TOKENIZERS_PARALLELISM", False), ("CREDITFLOW_HOME", False), ("API_KEY_ENV", False),
])
def test_secret_names(name, secret):
    assert S.is_secret_name(name) is secret


@pytest.mark.parametrize("key, secret", [
    ("credit.judge_api_key", True), ("api_key", True), ("tracking.token", True), ("db.password", True),
    ("x.client_secret", True), ("apikey", True),
    ("credit.judge_api_key_env", False), ("tracking.token_env", False), ("rollout.max_new_tokens_per_turn", False),
    ("model.pad_token_id", False), ("checklist.trajectory.tokens", False), ("update.lr", False),
])
def test_secret_keys(key, secret):
    assert S.is_secret_key(key) is secret


def test_referenced_env_names_nested_flat_and_omegaconf():
    from omegaconf import OmegaConf

    nested = {"credit": {"judge_api_key_env": "MY_JUDGE_CRED", "judge": "openai"}, "x": {"token_env": ""}}
    assert S.referenced_env_names(nested) == {"MY_JUDGE_CRED"}
    assert S.referenced_env_names({"credit.judge_api_key_env": "MY_JUDGE_CRED"}) == {"MY_JUDGE_CRED"}
    assert S.referenced_env_names(OmegaConf.create(nested)) == {"MY_JUDGE_CRED"}


def test_mask_text_values_urls_and_short_values(monkeypatch):
    monkeypatch.setenv("CF_UNIT_API_KEY", "sk-unit-0123456789")
    monkeypatch.setenv("CF_UNIT_PIN_TOKEN", "abc")  # too short to mask in free text
    monkeypatch.setenv("PLAIN_SETTING", "plain-value-123")
    text = "key sk-unit-0123456789 abc plain-value-123 postgresql://cf:hunter2pw@db:5432/x http://host:80/a"
    assert S.mask_text(text) == "key *** abc plain-value-123 postgresql://cf:***@db:5432/x http://host:80/a"
    # a name referenced by a config's *_env key is secret whatever it is called
    cfg = {"credit": {"judge_api_key_env": "PLAIN_SETTING"}}
    assert "plain-value-123" not in S.mask_text(text, cfg=cfg)
    assert S.mask_text(None) is None and S.mask_text(3) == 3


def test_mask_config_keys_and_values(monkeypatch):
    monkeypatch.setenv("CF_UNIT2_API_KEY", "sk-unit2-abcdefgh")
    cfg = {"credit": {"judge_api_key_env": "CF_UNIT2_API_KEY", "judge_api_key": "literal-key", "judge": "openai"},
           "report": {"notes": "pasted sk-unit2-abcdefgh here"}, "list": ["sk-unit2-abcdefgh", 1],
           "tracking": {"token": None}}
    out = S.mask_config(cfg)
    assert out["credit"] == {"judge_api_key_env": "CF_UNIT2_API_KEY", "judge_api_key": "***", "judge": "openai"}
    assert out["report"]["notes"] == "pasted *** here"
    assert out["list"] == ["***", 1] and out["tracking"]["token"] is None
    assert cfg["credit"]["judge_api_key"] == "literal-key"  # a copy
    flat = S.mask_config({"credit.judge_api_key": "literal-key", "report.notes": "sk-unit2-abcdefgh"})
    assert flat == {"credit.judge_api_key": "***", "report.notes": "***"}


def test_secret_filter_masks_messages_args_and_tracebacks(monkeypatch):
    monkeypatch.setenv("CF_UNIT3_TOKEN", "tok-unit3-987654")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(S.SecretFilter())
    log = logging.getLogger("cf-test-secret-filter")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("calling with %s", "tok-unit3-987654")
        try:
            raise RuntimeError("401 for key tok-unit3-987654")
        except RuntimeError:
            log.exception("judge failed")
    finally:
        log.removeHandler(handler)
    text = stream.getvalue()
    assert "tok-unit3-987654" not in text
    assert "calling with ***" in text and "RuntimeError: 401 for key ***" in text


def test_install_log_filter_reaches_child_loggers(monkeypatch):
    monkeypatch.setenv("CF_UNIT4_SECRET", "s3cr3t-unit4-value")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        S.install_log_filter()
        logging.getLogger("some.library").warning("value=s3cr3t-unit4-value")
    finally:
        root.removeHandler(handler)
    assert "s3cr3t-unit4-value" not in stream.getvalue() and "value=***" in stream.getvalue()


def test_masked_std_streams(monkeypatch, capsys):
    monkeypatch.setenv("CF_UNIT5_API_KEY", "sk-unit5-streams")
    with S.masked_std_streams():
        print("out sk-unit5-streams")
        import sys

        print("err sk-unit5-streams", file=sys.stderr)
    captured = capsys.readouterr()
    assert captured.out == "out ***\n" and captured.err == "err ***\n"


# ------------------------------------------------------------------------------ a real run
def _judge_method_with_key_env():
    """A registered credit method whose config names its API key variable (``judge_api_key_env``)."""
    import stages.credit.methods  # noqa: F401  (registers the built-in methods)
    from stages.credit.registry import get_method_class

    for name in ("capo", "int"):
        try:
            cls = get_method_class(name)
        except KeyError:
            continue
        if "judge_api_key_env" in getattr(cls.Config, "__dataclass_fields__", {}):
            return name
    return None


def _grep_tree(root: Path, needle: bytes) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


@pytest.mark.parametrize("variant", ["pattern-named", "config-referenced"])
def test_run_leaves_no_trace_of_a_secret(prefect_harness, shared_home, tmp_path, monkeypatch, capfd, variant):
    """(The shared home caches the tiny policy; the value is fresh, so any trace of it is this run's.)"""
    from flows import api
    from flows.cli import main as cli

    value = "sk-cftest-" + pysecrets.token_hex(16)
    if variant == "pattern-named":
        var, extra = "CF_TEST_SECRET_API_KEY", []
    else:
        method = _judge_method_with_key_env()
        if method is None:
            pytest.skip("no registered credit method has a judge_api_key_env key yet")
        # a name that matches no pattern: only the config's *_env key makes it secret
        var, extra = "CF_TEST_JUDGE_CRED", [f"credit={method}", "credit.judge=policy",
                                             "credit.judge_api_key_env=CF_TEST_JUDGE_CRED"]
    monkeypatch.setenv(var, value)
    monkeypatch.setenv("CREDITFLOW_HOME", str(shared_home))
    cf_home = shared_home
    overrides = [*TINY, *extra, f"report.notes=judge key ${{oc.env:{var}}}", f"run_name=cf-${{oc.env:{var}}}"]
    out = api.start_run(overrides, home=cf_home, progress=True)
    assert out["success_after"] >= 0

    # MLflow: params, tags, run name, and every artifact (downloaded through MLflow)
    tracker = api.tracker_for(cf_home)
    run = tracker.client.get_run(out["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["report.notes"] == "judge key ***"  # the text is kept, the value masked
    for k, v in {**run.data.params, **run.data.tags}.items():
        assert value not in v, k
    assert value not in (run.info.run_name or "")
    dl = tmp_path / "downloaded"
    dl.mkdir()
    tracker.client.download_artifacts(run.info.run_id, "", str(dl))
    assert (dl / "checklist.json").is_file() and (dl / "config" / "resolved.yaml").is_file()
    assert not _grep_tree(dl, value.encode())
    # the home: run directory, persisted results, checkpoints, the MLflow SQLite store, artifacts
    assert (cf_home / "mlflow.db").is_file() and (cf_home / "runs" / out["run_id"] / "results").is_dir()
    assert not _grep_tree(cf_home, value.encode())
    # Prefect: the flow run's parameters
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        fr = client.read_flow_run(run.data.tags["prefect.flow_run_id"])
    assert value not in repr(fr.parameters)

    # `creditflow config show` with the value pasted in literally
    assert cli(["config", "show", *extra, f"report.notes={value}"]) == 0
    captured = capfd.readouterr()
    assert "notes: '***'" in captured.out or "notes: ***" in captured.out, captured.out[-2000:]
    assert value not in captured.out + captured.err
