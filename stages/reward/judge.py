"""LLM judges and scorers backed by real models (stage 3 of survey §8: "LLM judges").

Credit methods that use an LLM as a critic (CAPO, InT: survey §3.3.1, §3.3.3) or as an
attribution source (ACPO, §3.3.2) declare ``needs={"judge"}`` / ``needs={"scorer"}``; the
stages hand them one of the objects defined here (see :func:`make_judge`):

* :class:`HFScorer` — log-probs of given target tokens after given contexts under a local
  transformers causal LM (the live policy or any local Hugging Face directory). Implements the
  ``Scorer`` protocol of :mod:`stages.credit.base`. Batched: contexts+targets are left-padded
  into one forward per chunk; only the last ``max(len(target)) + 1`` positions go through the
  LM head.
* :class:`HFJudge` — the ``Judge`` protocol on a local causal LM. For each step it builds a
  judging prompt (problem, previous steps, the step, "Is this step correct?") and compares the
  model's log-probability of a "yes"-like continuation with that of a "no"-like one:

      score = logsumexp_{y in yes_words} log p(y | prompt) - logsumexp_{n in no_words} log p(n | prompt)
      verdict = 1.0 if score > margin else 0.0

  All steps of a batch are scored together (one forward per chunk of ``batch_size`` sequences;
  when every yes/no word is a single token the prompts alone are run once and the candidate
  tokens gathered). ``propose`` generates free text (greedy by default) with
  :class:`stages.rollout.hf_engine.HFEngine`, stopping at the end of a line.
* :class:`OpenAIJudge` — the ``Judge`` protocol on an OpenAI-compatible HTTP endpoint
  (``/v1/chat/completions`` or ``/v1/completions``). The API key is read from the environment
  variable *named* by the config (``judge_api_key_env``) at each request; it is never stored
  on the object, never part of its repr, never logged and never returned. Timeouts and retries
  (429 / 5xx / connection errors, exponential backoff) with errors naming the URL and status.

Accounting: every judge exposes ``calls`` (judged steps + proposals = model queries),
``forward_passes`` (local models), ``prompt_tokens`` and ``completion_tokens``;
:func:`judge_overhead` turns the difference of two :func:`usage` snapshots into an
:class:`~stages.schema.Overhead` (``judge_calls``, ``extra_forward_passes``, ``extra_tokens``).

No ``prefect``/``mlflow`` imports (stages rule).
"""

from __future__ import annotations

import json
import math
import os
import random
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from stages.schema import Batch, Overhead

DEFAULT_API_KEY_ENV = "CREDITFLOW_JUDGE_API_KEY"
DEFAULT_YES = (" yes", " Yes")
DEFAULT_NO = (" no", " No")
USAGE_KEYS = ("calls", "forward_passes", "prompt_tokens", "completion_tokens")


# --------------------------------------------------------------------------- prompts


def _clean(text: str) -> str:
    return " ".join(str(text).strip().split("\n")).strip() if text else ""


def step_prompt(problem: str, previous: Sequence[str], step: str) -> str:
    """The judging prompt of one step: problem, the steps before it, the step, the question.
    Ends with ``"Answer:"`` so that the verdict is the next word (``" yes"`` / ``" no"``)."""
    lines = [f"Problem: {_clean(problem)}"]
    if previous:
        lines.append("Previous steps:")
        lines.extend(_clean(s) for s in previous)
    lines.append(f"Step: {_clean(step)}")
    lines.append("Is this step correct? Answer yes or no.")
    return "\n".join(lines) + "\nAnswer:"


def correction_prompt(problem: str, previous: Sequence[str], wrong_step: str,
                      reference: Sequence[str] = ()) -> str:
    """InT's intervention prompt: the prefix up to a wrong step, the wrong step, and a request for
    the corrected step (one line). With ``reference`` (the task's reference solution steps,
    privileged training-time information) the proposer sees it first, as in Yang et al. 2026
    (the model contrasts its trace with the reference to correct the first error)."""
    lines = [f"Problem: {_clean(problem)}"]
    if reference:
        lines.append("Reference solution:")
        lines.extend(_clean(s) for s in reference)
    if previous:
        lines.append("Previous steps:")
        lines.extend(_clean(s) for s in previous)
    lines.append(f"This next step is wrong: {_clean(wrong_step)}")
    return "\n".join(lines) + "\nCorrect next step:\n"  # a new line: the policy writes steps one per line


def batch_step_queries(batch: Batch) -> tuple[list[tuple[int, int]], list[str], int]:
    """``(positions, prompts, K)``: one judging prompt per step (turn) of every trajectory, with its
    ``(row, step)`` position; ``K = max(1, most turns)`` (the K of :class:`BatchTensors`)."""
    trajs = batch.trajectories
    K = max([len(t.turns) for t in trajs] + [1])
    positions: list[tuple[int, int]] = []
    prompts: list[str] = []
    for b, traj in enumerate(trajs):
        steps = [turn.action_text for turn in traj.turns]
        for k, step in enumerate(steps):
            positions.append((b, k))
            prompts.append(step_prompt(traj.prompt_text, steps[:k], step))
    return positions, prompts, K


def usage(judge: Any) -> dict[str, int]:
    """Snapshot of a judge's (or scorer's) counters; missing counters read 0."""
    return {k: int(getattr(judge, k, 0) or 0) for k in USAGE_KEYS}


def judge_overhead(judge: Any, before: dict[str, int]) -> Overhead:
    """Overhead spent by ``judge`` since the ``before`` snapshot of :func:`usage`."""
    now = usage(judge)
    return Overhead(
        judge_calls=now["calls"] - before["calls"],
        extra_forward_passes=now["forward_passes"] - before["forward_passes"],
        extra_tokens=now["completion_tokens"] - before["completion_tokens"],
    )


# --------------------------------------------------------------------------- local models


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _pad_id(model: torch.nn.Module, tokenizer: Any = None) -> int:
    if tokenizer is not None and getattr(tokenizer, "pad_token_id", None) is not None:
        return int(tokenizer.pad_token_id)
    pad = getattr(model.config, "pad_token_id", None)
    if pad is None:
        eos = getattr(model.config, "eos_token_id", None)
        pad = (eos[0] if isinstance(eos, (list, tuple)) else eos) if eos is not None else 0
    return int(pad)


class HFScorer:
    """``Scorer`` on a transformers causal LM: ``log p(targets[i] | contexts[i])`` per target token.

    Sequences ``context + target`` are sorted by length, grouped in chunks of at most
    ``batch_size`` rows and ``max_tokens`` padded tokens, left-padded (so every target ends at the
    right edge) and run in one forward per chunk with ``logits_to_keep = max target length + 1``.
    Float32 log-softmax; no grad; the model's train/eval mode is restored afterwards.
    """

    def __init__(self, model: torch.nn.Module, pad_token_id: int | None = None, batch_size: int = 32,
                 max_tokens: int = 65536):
        if batch_size < 1:
            raise ValueError(f"scorer batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.pad_token_id = _pad_id(model) if pad_token_id is None else int(pad_token_id)
        self.batch_size = int(batch_size)
        self.max_tokens = int(max_tokens)
        self.forward_passes = 0
        self.prompt_tokens = 0

    def __repr__(self) -> str:
        return f"HFScorer(model={type(self.model).__name__}, batch_size={self.batch_size})"

    def __call__(self, contexts: list[list[int]], targets: list[list[int]]) -> list[torch.Tensor]:
        if len(contexts) != len(targets):
            raise ValueError(f"scorer: {len(contexts)} contexts but {len(targets)} targets")
        for i, (c, t) in enumerate(zip(contexts, targets)):
            if len(c) < 1:
                raise ValueError(f"scorer: contexts[{i}] is empty (need at least one token to condition on)")
            if len(t) < 1:
                raise ValueError(f"scorer: targets[{i}] is empty")
        out: list[torch.Tensor | None] = [None] * len(contexts)
        order = sorted(range(len(contexts)), key=lambda i: len(contexts[i]) + len(targets[i]))
        chunks: list[list[int]] = []
        cur: list[int] = []
        for i in order:
            L = len(contexts[i]) + len(targets[i])
            if cur and (len(cur) >= self.batch_size or L * (len(cur) + 1) > self.max_tokens):
                chunks.append(cur)
                cur = []
            cur.append(i)
        if cur:
            chunks.append(cur)
        model = self.model
        was_training = model.training
        model.eval()
        dev = _device_of(model)
        try:
            with torch.inference_mode():
                for rows in chunks:
                    seqs = [list(contexts[i]) + list(targets[i]) for i in rows]
                    L = max(len(s) for s in seqs)
                    T = max(len(targets[i]) for i in rows)
                    ids = torch.full((len(rows), L), self.pad_token_id, dtype=torch.long)
                    attn = torch.zeros((len(rows), L), dtype=torch.long)
                    for r, s in enumerate(seqs):  # host-side assembly of the padded chunk
                        ids[r, L - len(s):] = torch.as_tensor(s, dtype=torch.long)
                        attn[r, L - len(s):] = 1
                    ids, attn = ids.to(dev), attn.to(dev)
                    pos = (attn.cumsum(-1) - 1).clamp(min=0)
                    kw = dict(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False)
                    try:
                        logits = model(**kw, logits_to_keep=T + 1).logits
                    except TypeError:
                        logits = model(**kw).logits
                    self.forward_passes += 1
                    self.prompt_tokens += int(attn.sum())
                    logp = torch.log_softmax(logits[:, -(T + 1):-1].float(), dim=-1)
                    lp = logp.gather(-1, ids[:, L - T:].unsqueeze(-1)).squeeze(-1).cpu()
                    for r, i in enumerate(rows):
                        out[i] = lp[r, T - len(targets[i]):].clone()
        finally:
            model.train(was_training)
        return out  # type: ignore[return-value]


class HFJudge:
    """``Judge`` on a local transformers causal LM (the live policy or a local HF directory).

    ``yes_words`` / ``no_words``: continuations of the prompt's ``"Answer:"`` whose summed
    probabilities are compared; ``margin``: the log-odds threshold (``score > margin`` = correct);
    ``propose_temperature``: 0 = greedy proposals.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        yes_words: Sequence[str] = DEFAULT_YES,
        no_words: Sequence[str] = DEFAULT_NO,
        margin: float = 0.0,
        batch_size: int = 32,
        propose_temperature: float = 0.0,
        seed: int = 0,
        name: str = "policy",
    ):
        if tokenizer is None:
            raise ValueError("HFJudge needs the model's tokenizer")
        if not math.isfinite(margin):
            raise ValueError(f"judge margin must be a finite number, got {margin!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.margin = float(margin)
        self.propose_temperature = float(propose_temperature)
        self.seed = int(seed)
        self.scorer = HFScorer(model, pad_token_id=_pad_id(model, tokenizer), batch_size=batch_size)
        self.yes_ids = [self._encode(w, "yes_words") for w in yes_words]
        self.no_ids = [self._encode(w, "no_words") for w in no_words]
        if not self.yes_ids or not self.no_ids:
            raise ValueError("HFJudge needs at least one yes word and one no word")
        if {tuple(x) for x in self.yes_ids} & {tuple(x) for x in self.no_ids}:
            raise ValueError(f"yes_words {list(yes_words)} and no_words {list(no_words)} share a tokenization")
        self.calls = 0
        self.completion_tokens = 0
        self._gen_forwards = 0
        #: log-odds scores of the last step_verdicts call ((B, K), nan where absent)
        self.last_scores: torch.Tensor | None = None

    def __repr__(self) -> str:
        return f"HFJudge(name={self.name!r}, model={type(self.model).__name__}, margin={self.margin})"

    def _encode(self, text: str, what: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"judge {what}: {text!r} encodes to no tokens")
        return list(ids)

    @property
    def forward_passes(self) -> int:
        return self.scorer.forward_passes + self._gen_forwards

    @property
    def prompt_tokens(self) -> int:
        return self.scorer.prompt_tokens

    def score_prompts(self, prompts: list[str]) -> torch.Tensor:
        """(N,) log-odds ``log P(yes-like) - log P(no-like)`` of the next words after each prompt."""
        if not prompts:
            return torch.zeros(0)
        ctx = self.tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
        cands = self.yes_ids + self.no_ids
        if all(len(c) == 1 for c in cands):
            # fast path: one forward per chunk of prompts, the candidates' next-token log-probs gathered
            lps = self._next_token_logprobs(ctx, [c[0] for c in cands])
        else:  # multi-token words: score every (prompt, word) pair in the same batched forwards
            flat_c = [c for c in ctx for _ in cands]
            flat_t = [t for _ in ctx for t in cands]
            lps = torch.stack([x.sum() for x in self.scorer(flat_c, flat_t)]).view(len(ctx), len(cands))
        ny = len(self.yes_ids)
        return torch.logsumexp(lps[:, :ny], -1) - torch.logsumexp(lps[:, ny:], -1)

    def _next_token_logprobs(self, contexts: list[list[int]], token_ids: list[int]) -> torch.Tensor:
        """(N, C) next-token log-probs of ``token_ids`` after each context, via the scorer's forwards
        with a one-token dummy target (the logits predicting it are the next-token logits)."""
        sc = self.scorer
        out = torch.empty(len(contexts), len(token_ids))
        cand = torch.tensor(token_ids, dtype=torch.long)
        model = sc.model
        was_training = model.training
        model.eval()
        dev = _device_of(model)
        order = sorted(range(len(contexts)), key=lambda i: len(contexts[i]))
        try:
            with torch.inference_mode():
                for s in range(0, len(order), sc.batch_size):
                    rows = order[s:s + sc.batch_size]
                    L = max(len(contexts[i]) for i in rows)
                    ids = torch.full((len(rows), L), sc.pad_token_id, dtype=torch.long)
                    attn = torch.zeros((len(rows), L), dtype=torch.long)
                    for r, i in enumerate(rows):
                        if not contexts[i]:
                            raise ValueError(f"judge prompt {i} encodes to no tokens")
                        ids[r, L - len(contexts[i]):] = torch.as_tensor(contexts[i], dtype=torch.long)
                        attn[r, L - len(contexts[i]):] = 1
                    ids, attn = ids.to(dev), attn.to(dev)
                    pos = (attn.cumsum(-1) - 1).clamp(min=0)
                    kw = dict(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False)
                    try:
                        logits = model(**kw, logits_to_keep=1).logits
                    except TypeError:
                        logits = model(**kw).logits
                    sc.forward_passes += 1
                    sc.prompt_tokens += int(attn.sum())
                    logp = torch.log_softmax(logits[:, -1].float(), dim=-1).cpu()
                    out[torch.tensor(rows)] = logp[:, cand]
        finally:
            model.train(was_training)
        return out

    def step_verdicts(self, batch: Batch) -> torch.Tensor:
        positions, prompts, K = batch_step_queries(batch)
        verdicts = torch.full((len(batch.trajectories), K), float("nan"))
        scores = torch.full_like(verdicts, float("nan"))
        if positions:
            s = self.score_prompts(prompts)
            rows = torch.tensor([p[0] for p in positions])
            cols = torch.tensor([p[1] for p in positions])
            scores[rows, cols] = s
            verdicts[rows, cols] = (s > self.margin).float()
        self.calls += len(positions)
        self.last_scores = scores
        return verdicts

    def propose(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        from stages.rollout.engine import GenerationRequest
        from stages.rollout.hf_engine import HFEngine
        from stages.rollout.agent_loop import stop_token_ids

        if not prompts:
            return []
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        engine = HFEngine(self.model, pad_token_id=self.scorer.pad_token_id)
        ctx = self.tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
        reqs = [GenerationRequest(context_ids=list(c), seed=self.seed + i) for i, c in enumerate(ctx)]
        outs = engine.generate(reqs, max_new_tokens, stop_token_ids(self.tokenizer),
                               temperature=self.propose_temperature)
        self.calls += len(prompts)
        self._gen_forwards += int(engine.stats["forward_passes"])
        self.scorer.prompt_tokens += sum(len(c) for c in ctx)
        self.completion_tokens += int(engine.stats["generated_tokens"])
        texts = self.tokenizer.batch_decode([o.token_ids for o in outs], skip_special_tokens=True)
        return [t.strip() for t in texts]


# --------------------------------------------------------------------------- OpenAI-compatible endpoint


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

    def propose(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        texts = self._map(lambda p: self._complete(p, max_new_tokens, self.propose_temperature), list(prompts))
        self.calls += len(prompts)
        return [t.strip().split("\n")[0].strip() if t.strip() else "" for t in texts]


# --------------------------------------------------------------------------- factory


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

    device = str(_device_of(policy)) if policy is not None else None
    model, tok = load_policy(judge, device=device)
    return HFJudge(model, tok, margin=margin, batch_size=bs, propose_temperature=temp, name=str(judge))
