"""LLM judges backed by real models (stage 3 of survey §8: "LLM judges"): choice and accounting.

Credit methods that use an LLM as a critic (CAPO, InT: survey §3.3.1, §3.3.3) declare
``needs={"judge"}``; the stages hand them the judge :func:`make_judge` builds from the method's
config fields:

* ``"policy"`` or a local Hugging Face directory — :class:`stages.reward.judge_hf.HFJudge`
  (yes/no log-odds through the project's one scorer, :class:`stages.rollout.scorer.HFScorer`);
* ``"openai"`` — :class:`stages.reward.judge_openai.OpenAIJudge` on an OpenAI-compatible endpoint.

The prompts are in :mod:`stages.reward.judge_prompts`. Accounting: every judge exposes ``calls``
(judged steps + proposals = model queries), ``forward_passes`` (local models), ``prompt_tokens``
and ``completion_tokens``; :func:`judge_overhead` turns the difference of two :func:`usage`
snapshots into an :class:`~stages.schema.Overhead` (``judge_calls``, ``extra_forward_passes``,
``forward_tokens`` = prompt + completion tokens,
``extra_tokens``). Scorers expose the same counters, so attribution methods account the same way.

No ``prefect``/``mlflow`` imports (stages rule).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from stages.reward.judge_hf import HFJudge
from stages.reward.judge_openai import DEFAULT_API_KEY_ENV, OpenAIJudge
from stages.schema import Overhead

USAGE_KEYS = ("calls", "forward_passes", "prompt_tokens", "completion_tokens")


def usage(judge: Any) -> dict[str, int]:
    """Snapshot of a judge's (or scorer's) counters; missing counters read 0."""
    return {k: int(getattr(judge, k, 0) or 0) for k in USAGE_KEYS}


def judge_overhead(judge: Any, before: dict[str, int]) -> Overhead:
    """Overhead spent by ``judge`` since the ``before`` snapshot of :func:`usage`."""
    now = usage(judge)
    return Overhead(
        judge_calls=now["calls"] - before["calls"],
        extra_forward_passes=now["forward_passes"] - before["forward_passes"],
        forward_tokens=(now["prompt_tokens"] - before["prompt_tokens"])
        + (now["completion_tokens"] - before["completion_tokens"]),
        extra_tokens=now["completion_tokens"] - before["completion_tokens"],
    )


def _field(cfg: Any, name: str, default: Any) -> Any:
    if isinstance(cfg, dict):
        return cfg.get(name, default)
    return getattr(cfg, name, default)


def check_judge_config(cfg: Any) -> None:
    """Validate a method config's judge fields without loading anything (run before compute):
    a local judge directory must exist and hold a ``config.json``; ``openai`` needs
    ``judge_url``, ``judge_model`` and, unless ``judge_api_key_env`` is empty, that variable set."""
    judge = _field(cfg, "judge", "policy")
    if not isinstance(judge, str) or not judge:
        raise ValueError(f"config key 'credit.judge' must be 'policy', 'openai' or a local model directory, got {judge!r}")
    if judge == "policy":
        return
    if judge == "openai":
        if not _field(cfg, "judge_url", ""):
            raise ValueError("config key 'credit.judge_url' must be set when credit.judge is 'openai'")
        if not _field(cfg, "judge_model", ""):
            raise ValueError("config key 'credit.judge_model' must be set when credit.judge is 'openai'")
        env = _field(cfg, "judge_api_key_env", DEFAULT_API_KEY_ENV)
        if env and not os.environ.get(env):
            raise ValueError(
                f"config key 'credit.judge_api_key_env' names the environment variable {env!r}, which is not set "
                f"(it must hold the judge endpoint's API key; '' = no authentication)"
            )
        return
    p = Path(judge).expanduser()
    if not p.is_dir() or not (p / "config.json").is_file():
        raise FileNotFoundError(
            f"config key 'credit.judge': {str(p)!r} is not a local Hugging Face model directory "
            f"({'no config.json' if p.is_dir() else 'does not exist'}); use 'policy', 'openai' or a model directory"
        )


def make_judge(cfg_fields: Any, policy: torch.nn.Module | None = None, tokenizer: Any = None):
    """The judge a method config asks for (``judge``, ``judge_url``, ``judge_model``,
    ``judge_api_key_env``, optional ``judge_margin``, ``judge_batch_size``, ``judge_timeout_s``,
    ``judge_max_retries``, ``judge_api``, ``seed``):

    * ``"policy"`` — :class:`HFJudge` on the live policy ``policy`` + ``tokenizer``;
    * ``"openai"`` — :class:`OpenAIJudge` on ``judge_url`` / ``judge_model``;
    * anything else — a local HF model directory, loaded (no download) onto the policy's device.
    """
    check_judge_config(cfg_fields)
    judge = _field(cfg_fields, "judge", "policy")
    margin = float(_field(cfg_fields, "judge_margin", 0.0))
    bs = int(_field(cfg_fields, "judge_batch_size", 32))
    temp = float(_field(cfg_fields, "judge_propose_temperature", 0.0))
    if judge == "policy":
        if policy is None or tokenizer is None:
            raise ValueError("credit.judge='policy' needs the live policy model and its tokenizer")
        return HFJudge(policy, tokenizer, margin=margin, batch_size=bs, propose_temperature=temp, name="policy")
    if judge == "openai":
        return OpenAIJudge(
            _field(cfg_fields, "judge_url", ""), _field(cfg_fields, "judge_model", ""),
            api_key_env=_field(cfg_fields, "judge_api_key_env", DEFAULT_API_KEY_ENV),
            api=_field(cfg_fields, "judge_api", "chat"),
            timeout_s=float(_field(cfg_fields, "judge_timeout_s", 30.0)),
            max_retries=int(_field(cfg_fields, "judge_max_retries", 3)),
            propose_temperature=temp,
        )
    from stages.rollout.policy import load_policy

    device = str(next(policy.parameters()).device) if policy is not None else None
    model, tok = load_policy(judge, device=device)
    return HFJudge(model, tok, margin=margin, batch_size=bs, propose_temperature=temp, name=str(judge))
