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

This module imports nothing from vLLM at import time (only torch), so it is importable wherever
the worker runs.
"""

from __future__ import annotations

import time
from typing import Any, Iterable, Optional

import torch


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
