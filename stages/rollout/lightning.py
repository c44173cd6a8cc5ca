"""Agent Lightning's decoupled execution, the rollout side (Luo et al. 2025, arXiv 2508.03680, §3;
survey §5.7): serve the policy to an outside agent program, record its calls as transitions.

:class:`AgentProgramPlayer` plays an iteration's slots (``env=lightning``) like
:class:`environments.start.SlotPlayer` plays a family's, returning the same ``(Batch, Overhead,
generated tokens)``, so the reward, credit and update stages (and per-stage resume, which persists
the batch) are unchanged:

1. an OpenAI-compatible HTTP endpoint (:class:`LightningServer`, stdlib ``http.server`` on
   127.0.0.1, an ephemeral port) generates with the run's rollout engine:
   ``POST /v1/chat/completions`` (messages rendered by :func:`environments.tasks.lightning.render_chat`),
   ``POST /v1/completions`` (a prompt string), ``GET /v1/models``. Every call names its episode by
   the ``X-Episode-Id`` header or the request's ``user`` field; the endpoint records its prompt
   token ids, completion token ids, behaviour log-probs and entropies (the engine's, at the
   rollout temperature; per-call seed from (rollout seed, episode, call index): reproducible for a
   deterministic program). ``POST /v1/episodes/{id}/reward`` with ``{"reward": r, "success": b}``
   is the agent's own report of the episode's outcome;
2. the program (``env.agent_command``) is launched once for the iteration's episodes with
   ``CREDITFLOW_LIGHTNING_URL`` (base URL, ending in ``/v1``) and ``CREDITFLOW_LIGHTNING_EPISODES``
   (a JSON file: ``[{"episode_id", "task_id", "task_index", "split", "group", "seed"}, ...]``) in
   its environment, and waited for (``env.agent_timeout``);
3. the calls become trajectories (:meth:`EpisodeRecord.trajectories`). Each call is a transition
   (LightningRL's unit). Token-in-token-out: when a call's prompt text extends the text of the
   episode's previous calls (a chat agent appending to its history), its prompt ids are that
   context's *ids* plus the new text's tokens, and the call becomes the next turn of the same
   trajectory row (the new text is the previous turn's observation, ``policy_mask`` False); the
   update's forward pass then conditions every completion on exactly what the engine saw. A call
   whose prompt does not extend the context (an agent that rewrites its context, a second agent)
   starts a new row of the same episode. Every row carries the episode's reward (LightningRL: the
   final reward to every transition) and ``meta["episode"]``, so credit can count each episode once.

Faults (survey §8.2): an episode whose program never reported a reward ends with reward 0 and
``done_reason`` ``no_reward`` (the program exited 0), ``agent_exit:<code>`` (it crashed) or
``agent_timeout``; refused calls (unknown episode, too many calls, context overflow, malformed
request) are answered with an OpenAI-style error and counted. An episode with no call at all has
no transition; its whole group is dropped (a group with a missing member would bias the group
baseline, as :func:`environments.start.start_environments` drops groups) and counted in the batch's
``meta["dropped_groups"]``; the run goes on with the rest, and only a rollout without any episode
left raises.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Optional

from environments.construct import EnvSlot
from environments.tasks.lightning import render_chat
from stages.rollout.agent_loop import stop_token_ids
from stages.rollout.config import RolloutConfig
from stages.rollout.engine import GenerationRequest
from stages.schema import Batch, Overhead, Trajectory, Turn

URL_ENV = "CREDITFLOW_LIGHTNING_URL"
EPISODES_ENV = "CREDITFLOW_LIGHTNING_EPISODES"
EPISODE_HEADER = "X-Episode-Id"


class CallRefused(Exception):
    """A call the endpoint answers with an OpenAI-style error (``status``, ``code``)."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code = status, code


@dataclass
class Call:
    """One LLM call of an episode: a transition (prompt -> completion)."""

    row: int
    #: tokens of the prompt that extend the row's context (the whole prompt for a row's first call)
    new_prompt_ids: list[int]
    new_prompt_text: str
    completion_ids: list[int]
    logprobs: list[float]
    entropies: list[float]
    completion_text: str
    finish_reason: str


@dataclass
class EpisodeRecord:
    """Everything the endpoint recorded for one episode (slot)."""

    slot: EnvSlot
    calls: list[Call] = field(default_factory=list)
    #: per row: (context token ids, context text) after its last call
    rows: list[tuple[list[int], str]] = field(default_factory=list)
    reward: Optional[float] = None
    success: bool = False
    refused: list[str] = field(default_factory=list)

    def trajectories(self, env_name: str, reason: str, seed: int, wall: float) -> list[Trajectory]:
        """The episode's rows as trajectories (see the module docstring, step 3)."""
        out = []
        for r in range(len(self.rows)):
            calls = [c for c in self.calls if c.row == r]
            prompt_ids = list(calls[0].new_prompt_ids)
            resp: list[int] = []
            mask: list[bool] = []
            lps: list[float] = []
            ents: list[float] = []
            turns: list[Turn] = []
            for k, c in enumerate(calls):
                if k:  # the new prompt text is the previous turn's observation
                    o0 = len(resp)
                    resp.extend(c.new_prompt_ids)
                    mask.extend([False] * len(c.new_prompt_ids))
                    lps.extend([0.0] * len(c.new_prompt_ids))
                    ents.extend([0.0] * len(c.new_prompt_ids))
                    turns[-1].obs_span, turns[-1].observation = (o0, len(resp)), c.new_prompt_text
                a0 = len(resp)
                resp.extend(c.completion_ids)
                mask.extend([True] * len(c.completion_ids))
                lps.extend(c.logprobs)
                ents.extend(c.entropies)
                turns.append(Turn(index=k, action_span=(a0, len(resp)), obs_span=(len(resp), len(resp)),
                                  action_text=c.completion_text, observation="", reward=0.0,
                                  state_key=f"{self.slot.uid}/r{r}/t{k}", action=c.completion_text,
                                  info={"finish_reason": c.finish_reason}))
            gen = sum(len(c.completion_ids) for c in calls)
            out.append(Trajectory(
                uid=self.slot.uid if r == 0 else f"{self.slot.uid}.r{r}", group_id=int(self.slot.group_id),
                task_id=self.slot.instance.task_id, env_name=env_name, prompt_ids=prompt_ids, response_ids=resp,
                policy_mask=mask, logprobs=lps, entropies=ents, turns=turns,
                reward=float(self.reward) if self.reward is not None else 0.0,
                success=bool(self.success) if self.reward is not None else False, done_reason=reason,
                prompt_text=calls[0].new_prompt_text,
                meta={"episode": self.slot.uid, "episode_row": r, "episode_rows": len(self.rows),
                      "episode_calls": len(self.calls), "refused_calls": len(self.refused),
                      "env_steps": len(calls), "env_resets": float(r == 0), "generated_tokens": gen,
                      "engine_calls": len(calls), "wall_seconds": wall, "seed": seed}))
        return out


def _call_seed(seed: int, uid: str, k: int) -> int:
    h = hashlib.blake2b(f"{seed}|{uid}|call{k}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


class EpisodeStore:
    """The calls and rewards of one rollout's episodes; generates for the endpoint (one call at a
    time: the engine is not shared between threads)."""

    def __init__(self, slots: list[EnvSlot], engine: Any, tokenizer: Any, cfg: RolloutConfig, seed: int,
                 max_calls: int, model_name: str = "creditflow-policy"):
        self.episodes = {s.uid: EpisodeRecord(s) for s in slots}
        self.engine, self.tokenizer, self.cfg, self.seed = engine, tokenizer, cfg, seed
        self.max_calls, self.model_name = max_calls, model_name
        self.stop_ids = stop_token_ids(tokenizer)
        self.lock = threading.Lock()
        self.refused = 0
        self.generated_tokens = 0

    def _episode(self, uid: Optional[str]) -> EpisodeRecord:
        if not uid or uid not in self.episodes:
            raise CallRefused(404, "unknown_episode", f"unknown episode id {uid!r}: send one of the episodes in "
                                                      f"${EPISODES_ENV} as the {EPISODE_HEADER} header or 'user'")
        return self.episodes[uid]

    def refuse(self, uid: Optional[str], exc: CallRefused) -> None:
        with self.lock:
            self.refused += 1
            if uid in self.episodes:
                self.episodes[uid].refused.append(f"{exc.code}: {exc}"[:200])

    def complete(self, uid: Optional[str], prompt_text: str, max_tokens: Optional[int]) -> tuple[str, str, int, int]:
        """Generate one completion of ``prompt_text`` for episode ``uid``: (text without its stop
        newline, finish reason, prompt tokens, completion tokens)."""
        with self.lock:
            ep = self._episode(uid)
            if ep.reward is not None:
                raise CallRefused(400, "episode_over", f"episode {uid} already reported its reward")
            if len(ep.calls) >= self.max_calls:
                raise CallRefused(400, "max_calls", f"episode {uid} made env.max_calls={self.max_calls} calls")
            if ep.rows and prompt_text.startswith(ep.rows[-1][1]):  # token-in-token-out: extend the row
                row = len(ep.rows) - 1
                ctx_ids, ctx_text = ep.rows[row]
                new_text = prompt_text[len(ctx_text):]
            else:
                row, ctx_ids, ctx_text, new_text = len(ep.rows), [], "", prompt_text
            new_ids = list(self.tokenizer(new_text, add_special_tokens=False)["input_ids"]) if new_text else []
            ids = ctx_ids + new_ids
            budget = self.cfg.max_new_tokens_per_turn if max_tokens is None else min(int(max_tokens),
                                                                                     self.cfg.max_new_tokens_per_turn)
            if not ids:
                raise CallRefused(400, "empty_prompt", "the prompt is empty")
            if len(ids) + budget > self.cfg.max_context_tokens:
                raise CallRefused(400, "context_length_exceeded",
                                  f"prompt of {len(ids)} tokens + {budget} new > rollout.max_context_tokens="
                                  f"{self.cfg.max_context_tokens}")
            req = GenerationRequest(context_ids=ids, seed=_call_seed(self.seed, ep.slot.uid, len(ep.calls)))
            out = self.engine.generate([req], budget, self.stop_ids, self.cfg.temperature, self.cfg.top_p)[0]
            toks = list(out.token_ids[:budget])
            text = self.tokenizer.decode(toks, skip_special_tokens=True)
            finish = "stop" if out.finish_reason == "stop" and len(toks) == len(out.token_ids) else "length"
            ep.calls.append(Call(row, new_ids, new_text, toks, list(out.logprobs[:budget]),
                                 list(out.entropies[:budget]), text, finish))
            if row == len(ep.rows):
                ep.rows.append((ids + toks, prompt_text + text))
            else:
                ep.rows[row] = (ids + toks, prompt_text + text)
            self.generated_tokens += len(toks)
            return (text[:-1] if text.endswith("\n") else text), finish, len(ids), len(toks)

    def report(self, uid: Optional[str], body: dict[str, Any]) -> None:
        reward = body.get("reward")
        if isinstance(reward, bool) or not isinstance(reward, (int, float)) or not math.isfinite(reward):
            raise CallRefused(400, "invalid_reward", f"reward must be a finite number, got {reward!r}")
        with self.lock:
            ep = self._episode(uid)
            if ep.reward is not None:
                raise CallRefused(400, "episode_over", f"episode {uid} already reported its reward")
            ep.reward, ep.success = float(reward), bool(body.get("success", False))


def _handler(store: EpisodeStore) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # no console chatter
            pass

        def _send(self, status: int, obj: dict[str, Any]) -> None:
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path.rstrip("/") == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": store.model_name, "object": "model",
                                                             "owned_by": "creditflow"}]})
            else:
                self._send(404, {"error": {"message": f"no route {self.path}", "type": "invalid_request_error",
                                           "code": "not_found"}})

        def do_POST(self) -> None:
            uid: Optional[str] = self.headers.get(EPISODE_HEADER)
            try:
                n = int(self.headers.get("Content-Length") or 0)
                try:
                    body = json.loads(self.rfile.read(n) or b"{}")
                except ValueError:
                    raise CallRefused(400, "invalid_json", "the request body is not JSON") from None
                if not isinstance(body, dict):
                    raise CallRefused(400, "invalid_json", "the request body must be a JSON object")
                uid = uid or body.get("user")
                path = self.path.rstrip("/")
                if path.startswith("/v1/episodes/") and path.endswith("/reward"):
                    uid = path[len("/v1/episodes/"):-len("/reward")]
                    store.report(uid, body)
                    self._send(200, {"episode_id": uid, "recorded": True})
                    return
                created = int(time.time())
                if path == "/v1/chat/completions":
                    try:
                        prompt = render_chat(body.get("messages"))
                    except ValueError as exc:
                        raise CallRefused(400, "invalid_messages", str(exc)) from None
                    text, finish, p, c = store.complete(uid, prompt, body.get("max_tokens"))
                    choice = {"index": 0, "message": {"role": "assistant", "content": text},
                              "finish_reason": finish, "logprobs": None}
                    obj = "chat.completion"
                elif path == "/v1/completions":
                    prompt = body.get("prompt")
                    if isinstance(prompt, list) and len(prompt) == 1:
                        prompt = prompt[0]
                    if not isinstance(prompt, str):
                        raise CallRefused(400, "invalid_prompt", "prompt must be a string")
                    text, finish, p, c = store.complete(uid, prompt, body.get("max_tokens"))
                    choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
                    obj = "text_completion"
                else:
                    raise CallRefused(404, "not_found", f"no route {self.path}")
                self._send(200, {"id": f"cf-{uid}-{len(store.episodes[uid].calls)}", "object": obj,
                                 "created": created, "model": store.model_name, "choices": [choice],
                                 "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}})
            except CallRefused as exc:
                store.refuse(uid, exc)
                self._send(exc.status, {"error": {"message": str(exc), "type": "invalid_request_error",
                                                  "code": exc.code}})

    return Handler


class LightningServer:
    """The OpenAI-compatible endpoint over an :class:`EpisodeStore`, in a background thread
    (a context manager: started on enter, shut down on exit)."""

    def __init__(self, store: EpisodeStore, host: str = "127.0.0.1", port: int = 0):
        self.store = store
        self.httpd = ThreadingHTTPServer((host, port), _handler(store))
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="lightning-endpoint", daemon=True)

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def __enter__(self) -> "LightningServer":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def run_agent_program(command: str, url: str, episodes_file: str, timeout: float) -> tuple[Optional[int], str]:
    """Run ``command`` (shell words, ``{python}`` = this interpreter) with the endpoint's URL and the
    episodes file in its environment; ``(exit code or None on timeout, stderr tail)``. The program
    runs in its own process group, killed whole at the timeout."""
    argv = [w.replace("{python}", sys.executable) for w in shlex.split(command)]
    env = {**os.environ, URL_ENV: url, EPISODES_ENV: episodes_file}
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                start_new_session=True)
        try:
            code: Optional[int] = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            code = None
        err.seek(0)
        tail = err.read()[-2000:].decode("utf-8", "replace")
    return code, tail


def _end_reason(ep: EpisodeRecord, code: Optional[int]) -> str:
    if ep.reward is not None:
        return "success" if ep.success else "failure"
    if code is None:
        return "agent_timeout"
    return "no_reward" if code == 0 else f"agent_exit:{code}"


@dataclass
class AgentProgramPlayer:
    """Plays slots of ``env=lightning`` with the agent program (see the module docstring); the
    counterpart of :class:`environments.start.SlotPlayer` for families with ``external_agent``."""

    family: Any
    engine: Any
    tokenizer: Any
    rollout: RolloutConfig
    new_sandbox: Any = None

    def play(self, slots: list[EnvSlot], seed: int, temperature: float, starts: Optional[list[Any]] = None,
             replay: Optional[list[list[Any]]] = None, uids: Optional[list[str]] = None,
             restore: Optional[list[Any]] = None) -> tuple[Batch, Overhead, int]:
        """Serve, run the program over ``slots``, collect: ``(batch, overhead, generated tokens)``.
        Continuations (``starts``) are impossible: the program's state is its own."""
        if starts is not None or replay is not None or restore is not None:
            raise ValueError(f"env {self.family.name!r}: episodes of an outside agent program cannot be continued, "
                             "replayed or forked")
        env_cfg = self.family.cfg
        cfg = replace(self.rollout, temperature=temperature)
        store = EpisodeStore(slots, self.engine, self.tokenizer, cfg, seed, int(env_cfg.max_calls))
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="cf-lightning-") as tmp:
            path = Path(tmp) / "episodes.json"
            path.write_text(json.dumps([
                {"episode_id": s.uid, "task_id": s.instance.task_id, "group": s.group_id, "seed": s.episode_seed,
                 **s.instance.spec} for s in slots]))
            with LightningServer(store) as server:
                code, stderr = run_agent_program(env_cfg.agent_command, server.url, str(path),
                                                 float(env_cfg.agent_timeout))
        wall = time.perf_counter() - t0
        empty_groups = {s.group_id for s in slots if not store.episodes[s.uid].calls}
        trajs: list[Trajectory] = []
        reasons: dict[str, int] = {}
        for s in slots:
            ep = store.episodes[s.uid]
            reason = _end_reason(ep, code)
            reasons[reason] = reasons.get(reason, 0) + 1
            if s.group_id not in empty_groups:
                trajs.extend(ep.trajectories(self.family.name, reason, seed, wall))
        info: dict[str, Any] = {
            "dropped_groups": len(empty_groups), "start_failures": 0, "agent_exit_code": code,
            "agent_stderr_tail": stderr[-500:], "refused_calls": store.refused,
            "episode_end_reasons": reasons, "episodes": len(slots),
            "episodes_kept": len({t.meta["episode"] for t in trajs}),
        }
        if not trajs:
            raise RuntimeError(
                f"env {self.family.name!r}: the agent program `{env_cfg.agent_command}` made no call for any of the "
                f"{len(slots)} episodes (exit code {code}); its stderr ends: {stderr[-300:]!r}")
        calls = sum(len(ep.calls) for ep in store.episodes.values())
        overhead = Overhead(env_resets=len(slots) - sum(1 for s in slots if s.group_id in empty_groups),
                            env_steps=sum(len(t.turns) for t in trajs), wall_seconds=wall)
        info["calls"] = calls
        return Batch(trajectories=trajs, meta=info), overhead, store.generated_tokens
