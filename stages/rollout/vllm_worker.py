"""vLLM worker extension: in-place weight sync for the vLLM rollout engine (survey §8, stage 2).

vLLM mixes this class into its worker class when the engine is created with
``worker_extension_cls="stages.rollout.vllm_worker.CreditflowWorkerExtension"`` (offline
``LLM(...)`` or ``vllm serve --worker-extension-cls ...``). Its methods run *inside* the worker
that owns the model and are called with ``collective_rpc`` (offline: ``LLM.collective_rpc``;
server: ``POST /collective_rpc`` with ``VLLM_SERVER_DEV_MODE=1``). Method names carry a
``creditflow_`` prefix so they cannot collide with the worker's own attributes (vLLM refuses
an extension that redefines one).

Weights are loaded with the model runner's ``reload_weights`` (vLLM's layer-wise in-place
reload: every layer's ``process_weights_after_loading`` runs again, so CPU oneDNN / packed GEMM
weights are rebuilt). With tied input/output embeddings that reload rebuilds ``embed_tokens``
but leaves ``lm_head`` pointing at the old tensor (and its packed GEMM at the old values): the
policy would sample from the *new* trunk with the *old* output layer. :meth:`creditflow_retie`
re-ties ``lm_head.weight`` to the embedding and re-runs the head's post-load processing; every
sync calls it. :meth:`creditflow_check_lm_head` exists for the tests: it compares the head's
logits on a probe with ``probe @ embed_tokens.weight.T``.

Exact entropies at the price of one extra log-prob (:meth:`creditflow_enable_entropy`): the
sampler already holds the full processed log-prob matrix ``(num_seqs, vocab)`` of every step
(``logprobs_mode="processed_logprobs"``: after temperature and top-p); the hook computes each
row's entropy ``sum_v entr(exp(logp_v))`` there, on the tensor, and returns it in the *top-1
slot* of the step's log-prob output: a request asking for ``logprobs=1`` gets, per position,
``[sampled token, its log-prob]`` followed by ``[ENTROPY_TOKEN_ID, entropy]`` instead of the
top-1 token. The value travels through vLLM's own per-request output path (so it stays attached
to the right request under batching, chunked prefill, preemption or a separate engine-core
process) and costs one float per token instead of a vocabulary-sized log-prob list converted to
Python objects. The hook only acts inside ``Sampler.forward`` (prompt log-probs, used by
``VLLMEngine.score``, are untouched) and only on steps whose largest requested ``logprobs`` is
1; the engine installs it only when it asks every request for exactly that.

This module imports nothing from vLLM at import time (only torch), so it is importable wherever
the worker runs.
"""

from __future__ import annotations

import time
from typing import Any, Iterable, Optional

import torch

#: token id of the entropy entry in the top-1 slot of a position's log-probs (never a real token)
ENTROPY_TOKEN_ID = -1


def entropy_rows(logprobs: torch.Tensor) -> torch.Tensor:
    """Entropy of each row of a log-prob matrix (``-inf`` entries, e.g. outside the top-p
    nucleus, contribute 0): ``sum entr(exp(logp))``, float32, the formula of ``HFEngine``."""
    return torch.special.entr(logprobs.float().exp()).sum(-1)


def _embed_and_head(model: Any) -> tuple[Optional[torch.nn.Module], Optional[torch.nn.Module]]:
    inner = getattr(model, "model", None)
    embed = getattr(inner, "embed_tokens", None) if inner is not None else None
    head = getattr(model, "lm_head", None)
    return embed, head


class CreditflowWorkerExtension:
    """Methods added to vLLM's worker (``self`` is the worker: ``self.model_runner`` holds the model)."""

    # ------------------------------------------------------------------ helpers (run in the worker)
    def _creditflow_model(self) -> Any:
        return self.model_runner.get_model()  # type: ignore[attr-defined]

    def _creditflow_tied(self) -> bool:
        mc = self.model_runner.model_config  # type: ignore[attr-defined]
        hf = getattr(mc, "hf_text_config", None) or mc.hf_config
        return bool(getattr(hf, "tie_word_embeddings", False))

    def _creditflow_reset_caches(self) -> None:
        # KV blocks computed with the old weights must not be reused (prefix caching)
        runner = self.model_runner  # type: ignore[attr-defined]
        for name in ("reset_encoder_cache", "reset_mm_cache"):
            fn = getattr(runner, name, None)
            if callable(fn):
                fn()

    # ------------------------------------------------------------------ RPC methods
    def creditflow_enable_entropy(self) -> bool:
        """Install the entropy hook on the model runner's sampler (idempotent); False when this
        vLLM's sampler is not the one the hook knows (the engine then falls back to a top-k
        estimate) or does not return processed log-probs."""
        runner = self.model_runner  # type: ignore[attr-defined]
        sampler = getattr(runner, "sampler", None)
        try:
            from vllm.v1.sample.sampler import Sampler
        except ImportError:  # pragma: no cover - other vLLM layouts
            return False
        if not isinstance(sampler, Sampler) or getattr(sampler, "logprobs_mode", None) != "processed_logprobs":
            return False
        if getattr(sampler, "_creditflow_entropy", False):
            return True
        orig_forward = sampler.forward  # bound method of this instance
        orig_gather = sampler.gather_logprobs  # staticmethod, called as self.gather_logprobs(...)
        active = [False]

        def gather_logprobs(logprobs: torch.Tensor, num_logprobs: int, token_ids: torch.Tensor):
            out = orig_gather(logprobs, num_logprobs, token_ids)
            if active[0] and num_logprobs == 1:
                ids, lps = out.logprob_token_ids, out.logprobs  # (n, 2): [sampled, top-1]
                ids[:, 1] = ENTROPY_TOKEN_ID
                lps[:, 1] = entropy_rows(logprobs).to(lps.dtype)
            return out

        def forward(*args: Any, **kwargs: Any):
            active[0] = True
            try:
                return orig_forward(*args, **kwargs)
            finally:
                active[0] = False

        sampler.gather_logprobs = gather_logprobs
        sampler.forward = forward
        sampler._creditflow_entropy = True
        return True

    def creditflow_retie(self) -> bool:
        """Re-tie ``lm_head`` to ``embed_tokens`` and rebuild the head's kernel weights.
        Returns True when the model has tied embeddings (and was re-tied), False otherwise."""
        if not self._creditflow_tied():
            return False
        model = self._creditflow_model()
        embed, head = _embed_and_head(model)
        if embed is None or head is None or not hasattr(head, "weight"):
            return False
        if head.weight is not embed.weight:
            head.weight = embed.weight
        qm = getattr(head, "quant_method", None)
        if qm is not None and hasattr(qm, "process_weights_after_loading"):
            qm.process_weights_after_loading(head)
        return True

    def creditflow_update_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> dict[str, Any]:
        """Load ``(name, tensor)`` pairs named as in the Hugging Face checkpoint, in place."""
        t0 = time.perf_counter()
        weights = list(weights)
        dev = self.model_runner.device  # type: ignore[attr-defined]
        it = ((n, t.to(dev, non_blocking=True) if t.device != dev else t) for n, t in weights)
        self.model_runner.reload_weights(weights_iterator=it, is_checkpoint_format=True)  # type: ignore[attr-defined]
        retied = self.creditflow_retie()
        self._creditflow_reset_caches()
        return {"seconds": time.perf_counter() - t0, "tensors": len(weights), "retied": retied}

    def creditflow_reload_from_path(self, path: str) -> dict[str, Any]:
        """Load weights from a Hugging Face directory (safetensors) on the worker's filesystem.
        This is the server-mode sync: the trainer writes the directory, the server reads it."""
        t0 = time.perf_counter()
        self.model_runner.reload_weights(weights_path=str(path), is_checkpoint_format=True)  # type: ignore[attr-defined]
        retied = self.creditflow_retie()
        self._creditflow_reset_caches()
        return {"seconds": time.perf_counter() - t0, "path": str(path), "retied": retied}

    def creditflow_check_lm_head(self, seed: int = 0) -> dict[str, Any]:
        """Test hook: is the output layer the (current) input embedding?

        Returns ``tied`` (config), ``same_tensor`` (``lm_head.weight is embed_tokens.weight``) and
        ``max_abs_diff`` between the model's logits of a random probe hidden state and
        ``probe @ embed_tokens.weight.T`` (only meaningful for tied models)."""
        model = self._creditflow_model()
        embed, head = _embed_and_head(model)
        tied = self._creditflow_tied()
        out: dict[str, Any] = {"tied": tied, "same_tensor": bool(head is not None and embed is not None
                                                                 and head.weight is embed.weight)}
        if embed is not None and head is not None and hasattr(model, "compute_logits"):
            w = embed.weight
            g = torch.Generator(device="cpu").manual_seed(seed)
            probe = torch.randn(3, w.shape[1], generator=g, dtype=torch.float32).to(device=w.device, dtype=w.dtype)
            with torch.inference_mode():
                got = model.compute_logits(probe)
                want = probe @ w.t()
            n = min(got.shape[-1], want.shape[-1])
            out["max_abs_diff"] = float((got[..., :n].float() - want[..., :n].float()).abs().max())
        return out
