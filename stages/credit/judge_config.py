"""Judge fields shared by the credit methods that use an LLM judge (``needs={"judge"}``: CAPO, InT,
TARL, CriticSearch, LaRe); read by :func:`stages.reward.judge.make_judge`."""

from __future__ import annotations

from dataclasses import dataclass

from stages.config_fields import param
from stages.credit.base import CreditConfig
from stages.reward.judge import check_judge_config
from stages.reward.judge_openai import DEFAULT_API_KEY_ENV


@dataclass
class JudgeCreditConfig(CreditConfig):
    """Judge fields shared by the LLM-as-critic methods (read by :func:`stages.reward.judge.make_judge`)."""

    judge: str = param("policy", help="LLM judge: 'policy' (the live policy), 'openai' (endpoint), or a local HF model directory")
    judge_url: str = param("", help="OpenAI-compatible endpoint root (e.g. http://localhost:8000/v1) when judge='openai'")
    judge_model: str = param("", help="model name sent to the endpoint when judge='openai'")
    judge_api_key_env: str = param(DEFAULT_API_KEY_ENV, help="NAME of the env variable holding the endpoint's API key ('' = none)")
    judge_api: str = param("chat", help="endpoint flavour: 'chat' (/v1/chat/completions) or 'completions' (/v1/completions)", choices=("chat", "completions"))
    judge_timeout_s: float = param(30.0, help="per-request timeout of the endpoint judge (seconds)", gt=0)
    judge_max_retries: int = param(3, help="retries of the endpoint judge on 429/5xx/connection errors (exponential backoff)", ge=0)
    judge_margin: float = param(0.0, help="local judge: a step is correct iff log P(yes) - log P(no) > margin")
    judge_batch_size: int = param(32, help="local judge: sequences per forward pass", ge=1)

    def world_rules(self):
        """Rules that look at the outside world (judge directory, endpoint key), run before compute."""
        try:
            check_judge_config(self)
        except (ValueError, OSError) as exc:  # OSError: a local judge directory that does not exist
            yield "judge", str(exc)
