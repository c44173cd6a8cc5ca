"""``Judge`` on an OpenAI-compatible HTTP endpoint (``/v1/chat/completions`` or ``/v1/completions``).

The API key is read from the environment variable *named* by the config (``judge_api_key_env``)
at each request; it is never stored on the object, never part of its repr, never logged and
never returned. Timeouts and retries (429 / 5xx / connection errors, exponential backoff) with
errors naming the URL and status. A verdict is the first word of the reply (CAPO's generative
critic, survey §3.3.1); proposals are the first line (InT, §3.3.3).
"""

from __future__ import annotations

import json
import math
import os
import random
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from stages.reward.judge_prompts import batch_step_queries
from stages.schema import Batch

DEFAULT_API_KEY_ENV = "CREDITFLOW_JUDGE_API_KEY"


class JudgeEndpointError(RuntimeError):
    """An OpenAI-compatible judge endpoint failed (after retries where retrying makes sense)."""


class OpenAIJudge:
    """``Judge`` on an OpenAI-compatible endpoint.

    ``base_url`` is the server root or its ``/v1`` (``http://host:8000`` or
    ``http://host:8000/v1``); ``api`` picks ``"chat"`` (``/v1/chat/completions``) or
    ``"completions"`` (``/v1/completions``). A verdict is the first word of the reply (greedy,
    ``max_tokens`` small): yes-like = 1.0, no-like = 0.0, anything else = nan (counted in
    ``unparsed``). Steps are sent ``max_concurrency`` at a time.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key_env: str = DEFAULT_API_KEY_ENV,
        api: str = "chat",
        timeout_s: float = 30.0,
        max_retries: int = 3,
        backoff_s: float = 0.5,
        max_concurrency: int = 4,
        verdict_max_tokens: int = 3,
        propose_temperature: float = 0.0,
    ):
        if not base_url:
            raise ValueError("config key 'credit.judge_url' must be set when credit.judge is 'openai'")
        if not model:
            raise ValueError("config key 'credit.judge_model' must be set when credit.judge is 'openai'")
        if api not in ("chat", "completions"):
            raise ValueError(f"judge api must be 'chat' or 'completions', got {api!r}")
        if timeout_s <= 0 or max_retries < 0 or max_concurrency < 1:
            raise ValueError(f"judge timeout_s must be > 0, max_retries >= 0, max_concurrency >= 1; got "
                             f"{timeout_s}, {max_retries}, {max_concurrency}")
        if api_key_env and not os.environ.get(api_key_env):
            raise ValueError(
                f"the judge endpoint's API key is read from the environment variable {api_key_env!r} "
                f"(config key 'credit.judge_api_key_env'), which is not set; set it, or set "
                f"credit.judge_api_key_env='' for an endpoint without authentication"
            )
        root = base_url.rstrip("/")
        self.base_url = root if root.endswith("/v1") else root + "/v1"
        self.model = model
        self.api_key_env = api_key_env  # the variable's NAME; the key itself is never stored
        self.api = api
        self.timeout_s = float(timeout_s)
        self.max_retries = int(max_retries)
        self.backoff_s = float(backoff_s)
        self.max_concurrency = int(max_concurrency)
        self.verdict_max_tokens = int(verdict_max_tokens)
        self.propose_temperature = float(propose_temperature)
        self.calls = 0
        self.requests = 0
        self.retries = 0
        self.unparsed = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.forward_passes = 0

    def __repr__(self) -> str:
        return f"OpenAIJudge(base_url={self.base_url!r}, model={self.model!r}, api={self.api!r}, api_key_env={self.api_key_env!r})"

    # -- HTTP
    @property
    def url(self) -> str:
        return self.base_url + ("/chat/completions" if self.api == "chat" else "/completions")

    def _post(self, payload: dict[str, Any]) -> dict[str, Any]:
        data = json.dumps(payload).encode()
        last = ""
        for attempt in range(self.max_retries + 1):
            headers = {"Content-Type": "application/json"}
            if self.api_key_env:
                key = os.environ.get(self.api_key_env)
                if not key:
                    raise JudgeEndpointError(f"environment variable {self.api_key_env!r} (the judge API key) is not set")
                headers["Authorization"] = "Bearer " + key
            req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            self.requests += 1
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    body = resp.read()
                try:
                    return json.loads(body)
                except json.JSONDecodeError as e:
                    raise JudgeEndpointError(f"judge endpoint {self.url} returned a non-JSON body: {body[:200]!r}") from e
            except urllib.error.HTTPError as e:
                detail = e.read()[:200].decode("utf-8", "replace") if e.fp is not None else ""
                last = f"HTTP {e.code} {e.reason}: {detail}"
                if e.code not in (408, 409, 429) and e.code < 500:
                    hint = f" (check the key in ${self.api_key_env})" if e.code in (401, 403) else ""
                    raise JudgeEndpointError(f"judge endpoint {self.url} answered {last}{hint}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                reason = getattr(e, "reason", e)
                last = f"{type(e).__name__}: {reason}"
            if attempt < self.max_retries:
                self.retries += 1
                time.sleep(self.backoff_s * (2 ** attempt) * (1 + 0.1 * random.random()))
        raise JudgeEndpointError(
            f"judge endpoint {self.url} failed after {self.max_retries + 1} attempts "
            f"(timeout {self.timeout_s}s each); last error: {last}"
        )

    def _complete(self, prompt: str, max_tokens: int, temperature: float) -> str:
        if self.api == "chat":
            payload = {"model": self.model, "messages": [{"role": "user", "content": prompt}],
                       "max_tokens": int(max_tokens), "temperature": float(temperature)}
        else:
            payload = {"model": self.model, "prompt": prompt, "max_tokens": int(max_tokens),
                       "temperature": float(temperature)}
        out = self._post(payload)
        try:
            choice = out["choices"][0]
            text = choice["message"]["content"] if self.api == "chat" else choice["text"]
        except (KeyError, IndexError, TypeError) as e:
            raise JudgeEndpointError(f"judge endpoint {self.url} returned no choices[0] text: {str(out)[:200]}") from e
        u = out.get("usage") or {}
        self.prompt_tokens += int(u.get("prompt_tokens", 0) or 0)
        self.completion_tokens += int(u.get("completion_tokens", 0) or 0)
        return text or ""

    def _map(self, fn, items: list[Any]) -> list[Any]:
        if self.max_concurrency == 1 or len(items) <= 1:
            return [fn(x) for x in items]
        with ThreadPoolExecutor(max_workers=self.max_concurrency) as pool:
            return list(pool.map(fn, items))

    # -- Judge protocol
    @staticmethod
    def parse_verdict(text: str) -> float:
        word = text.strip().lstrip("*\"'`([").split(maxsplit=1)[0].strip(".,:;!*\"'`)]").lower() if text.strip() else ""
        if word in ("yes", "correct", "true", "y"):
            return 1.0
        if word in ("no", "incorrect", "wrong", "false", "n"):
            return 0.0
        return float("nan")

    def step_verdicts(self, batch: Batch) -> torch.Tensor:
        positions, prompts, K = batch_step_queries(batch)
        verdicts = torch.full((len(batch.trajectories), K), float("nan"))
        texts = self._map(lambda p: self._complete(p, self.verdict_max_tokens, 0.0), prompts)
        self.calls += len(prompts)
        for (b, k), text in zip(positions, texts):
            v = self.parse_verdict(text)
            if math.isnan(v):
                self.unparsed += 1
            verdicts[b, k] = v
        return verdicts

    def prompt_scores(self, prompts: list[str]) -> torch.Tensor:
        """(N,) the verdict of each free-form yes/no prompt (first word of the reply: 1.0 yes-like,
        0.0 no-like, nan unparsed and counted in ``unparsed``): turn-level judges (TARL,
        CriticSearch, LaRe)."""
        texts = self._map(lambda p: self._complete(p, self.verdict_max_tokens, 0.0), list(prompts))
        self.calls += len(prompts)
        out = torch.tensor([self.parse_verdict(t) for t in texts], dtype=torch.float32)
        self.unparsed += int(torch.isnan(out).sum())
        return out

    def propose(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        texts = self._map(lambda p: self._complete(p, max_new_tokens, self.propose_temperature), list(prompts))
        self.calls += len(prompts)
        return [t.strip().split("\n")[0].strip() if t.strip() else "" for t in texts]
