"""Rollout engine on a transformers model with its KV cache (survey §8, stage 2, rollout).

One :meth:`HFEngine.generate` call samples a continuation for every request at once:

1. the contexts are left-padded to a common length and run through the model in one prefill
   forward (``attention_mask`` and ``position_ids`` make the padding invisible);
2. a decode loop runs one forward per new-token step for the whole batch, feeding the sampled
   tokens with the KV cache (no Python loop over batch rows);
3. at each step the logits are divided by the temperature, optionally truncated to the top-p
   nucleus and renormalised, and each row's token is drawn by inverse CDF at a uniform that depends
   only on that request's seed and the decode step (:func:`sample_per_request`). The engine records
   the token's log-prob under exactly that sampling distribution and the distribution's entropy.

With ``top_p == 1`` the recorded log-prob is ``log_softmax(logits / temperature)`` of the token,
the same formula as :func:`stages.rollout.policy.sequence_logprobs`, so behaviour log-probs
equal the update's recomputed log-probs up to float error (tested to 1e-4 in fp32). With
``top_p < 1`` they are log-probs of the truncated distribution (what was actually sampled from).

Randomness: per request, never per batch. An episode's tokens depend on its own seed (run seed,
episode uid, turn) and the policy only — not on which other requests share the call — so rollouts
split into shards on other workers (flows/scaleout.py), Monte Carlo continuations and re-runs give
the same samples (float-rounding differences of the logits across batch shapes aside). Rows whose sampled token is a stop token
are finished (``finish_reason="stop"``, the stop token kept in ``token_ids``); the batch keeps
stepping for the other rows with the finished rows masked out, until all rows are finished or
``max_new_tokens`` is reached (``finish_reason="length"``).
"""

from __future__ import annotations

import functools
import inspect

import time
from typing import Any, Optional

import torch

from stages.rollout.engine import GenerationOutput, GenerationRequest, RolloutEngine


# ---------------------------------------------------------------------------------- per-request sampling
_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, m: int) -> torch.Tensor:
    """``x * m mod 2**32`` for int64 tensors holding values < 2**32, without int64 overflow."""
    return (x * (m & 0xFFFF) + (((x * (m >> 16)) & 0xFFFF) << 16)) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash with full avalanche (lowbias32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def request_uniforms(seeds: torch.Tensor, step: int) -> torch.Tensor:
    """One uniform in [0, 1) (float64, 53 bits) per request seed (int64, >= 0) at decode ``step``.

    Counter-based: the value depends on (seed, step) only, never on the other rows."""
    lo, hi = seeds & _M32, (seeds >> 32) & _M32
    s = _mix32(torch.full_like(lo, (step * 0x9E3779B9 + 0x632BE5AB) & _M32))
    a = _mix32(lo ^ _mix32(hi ^ s))
    b = _mix32(a ^ _mix32(s ^ 0x85EBCA6B))
    return ((a >> 5) * (1 << 26) + (b >> 6)).double() / float(1 << 53)


def sample_per_request(logits: torch.Tensor, temperature: float, top_p: float, seeds: torch.Tensor,
                       step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One token per row, drawn from that row's own seed stream (inverse CDF of the sampling
    distribution at a counter-based uniform of (seed, step)): returns (token, log-prob under the
    sampling distribution, its entropy). Temperature 0 is greedy (log-prob and entropy 0)."""
    if temperature == 0:  # greedy: a point mass on the argmax
        tok = logits.argmax(-1)
        zeros = torch.zeros(tok.shape, dtype=torch.float32, device=tok.device)
        return tok, zeros, zeros
    logp = sampling_distribution(logits, temperature, top_p)
    probs = logp.exp()
    cdf = probs.double().cumsum(-1)
    target = request_uniforms(seeds, step) * cdf[:, -1]
    tok = torch.searchsorted(cdf, target[:, None], right=True).squeeze(-1)
    # rounding can put the target at the very top: take the last token with mass, never a masked one
    vocab = torch.arange(probs.shape[-1], device=probs.device)
    last = torch.where(probs > 0, vocab, torch.zeros_like(vocab)).amax(-1)
    tok = torch.minimum(tok, last)
    lp = logp.gather(-1, tok[:, None]).squeeze(-1)
    ent = torch.special.entr(probs).sum(-1)
    return tok, lp, ent


def sampling_distribution(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Log-probs (float32) of the distribution tokens are sampled from: temperature-scaled
    softmax, restricted to the smallest top-p nucleus and renormalised when ``top_p < 1``."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    logp = torch.log_softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_lp, idx = logp.sort(dim=-1, descending=True)
        sorted_p = sorted_lp.exp()
        # keep a token if the mass strictly before it is < top_p (the top token is always kept)
        remove = (sorted_p.cumsum(-1) - sorted_p) >= top_p
        sorted_lp = sorted_lp.masked_fill(remove, float("-inf"))
        logp = torch.full_like(logp, float("-inf")).scatter(-1, idx, sorted_lp)
        logp = torch.log_softmax(logp, dim=-1)
    return logp


class HFEngine(RolloutEngine):
    """Batched KV-cache sampling with a transformers causal LM."""

    name = "hf"

    def __init__(self, model: torch.nn.Module, pad_token_id: Optional[int] = None, max_batch_rows: int = 256):
        self.model = model
        if max_batch_rows < 1:
            raise ValueError(f"max_batch_rows must be >= 1, got {max_batch_rows}")
        #: most rows in one batched sampling loop; a larger call runs in chunks (see :meth:`_generate`)
        self.max_batch_rows = int(max_batch_rows)
        if pad_token_id is None:
            pad_token_id = getattr(model.config, "pad_token_id", None)
            if pad_token_id is None:
                eos = getattr(model.config, "eos_token_id", None)
                pad_token_id = (eos[0] if isinstance(eos, (list, tuple)) else eos) if eos is not None else 0
        self.pad_token_id = int(pad_token_id)
        #: counters over the engine's life (forward passes, generated tokens)
        self.stats: dict[str, float] = {"forward_passes": 0, "forward_tokens": 0, "generated_tokens": 0, "calls": 0, "seconds": 0.0}

    def sync_weights(self, model: Optional[object] = None) -> float:
        """The engine samples from the live model object; with a new ``model`` it switches to it."""
        if model is not None:
            self.model = model  # type: ignore[assignment]
        return 0.0

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _generate(self, requests: list[GenerationRequest], max_new_tokens: int, stop_token_ids: set[int],
                  temperature: float, top_p: float) -> list[GenerationOutput]:
        """Up to ``max_batch_rows`` requests: one batched loop. More (MC continuations: every fork's k
        continuations of a batch, thousands of rows): the requests sorted by context length, run in
        chunks of ``max_batch_rows``, returned in the caller's order. Sorting leaves little left
        padding in a chunk, and a chunk's KV cache stays small; each row samples from its own seed, so
        its tokens do not depend on the chunk it lands in (``benchmarks/continuations.py``: 2-3x
        the tokens/s of one call over thousands of forks of mixed lengths on CPU)."""
        self.stats["calls"] += 1
        if len(requests) <= self.max_batch_rows:
            return self._generate_batch(requests, max_new_tokens, stop_token_ids, temperature, top_p)
        order = sorted(range(len(requests)), key=lambda i: len(requests[i].context_ids))
        outputs: list[Optional[GenerationOutput]] = [None] * len(requests)
        for c in range(0, len(order), self.max_batch_rows):
            chunk = order[c:c + self.max_batch_rows]
            outs = self._generate_batch([requests[i] for i in chunk], max_new_tokens, stop_token_ids, temperature, top_p)
            for i, out in zip(chunk, outs):
                outputs[i] = out
        return outputs  # type: ignore[return-value]

    def _generate_batch(self, requests: list[GenerationRequest], max_new_tokens: int, stop_token_ids: set[int],
                        temperature: float, top_p: float) -> list[GenerationOutput]:
        t0 = time.perf_counter()
        model = self.model
        was_training = model.training
        model.eval()
        dev = self.device
        B = len(requests)
        # every row samples from its own seed: an episode's tokens do not depend on its batch
        seeds = torch.tensor([int(r.seed) & ((1 << 63) - 1) for r in requests], dtype=torch.long, device=dev)
        stops = torch.tensor(sorted(int(s) for s in stop_token_ids), dtype=torch.long, device=dev)

        tokens = torch.full((B, max_new_tokens), self.pad_token_id, dtype=torch.long, device=dev)
        lps = torch.zeros((B, max_new_tokens), dtype=torch.float32, device=dev)
        ents = torch.zeros((B, max_new_tokens), dtype=torch.float32, device=dev)
        finished = torch.zeros(B, dtype=torch.bool, device=dev)
        n_new = torch.zeros(B, dtype=torch.long, device=dev)
        forwards = 0
        try:
            with torch.inference_mode():
                logits, past, attn, next_pos, forwards = self._prefill(requests)
                for t in range(max_new_tokens):
                    tok, lp, ent = sample_per_request(logits, temperature, top_p, seeds, t)
                    alive = ~finished
                    tok = torch.where(alive, tok, torch.full_like(tok, self.pad_token_id))
                    tokens[:, t] = tok
                    lps[:, t] = torch.where(alive, lp, torch.zeros_like(lp))
                    ents[:, t] = torch.where(alive, ent, torch.zeros_like(ent))
                    n_new += alive.long()
                    finished = finished | (alive & torch.isin(tok, stops))
                    if t == max_new_tokens - 1 or bool(finished.all()):
                        break
                    attn = torch.cat([attn, torch.ones((B, 1), dtype=attn.dtype, device=dev)], dim=1)
                    next_pos = next_pos + 1
                    out = self._forward(tok[:, None], attn, next_pos[:, None], past)
                    forwards += 1
                    logits = out.logits[:, -1]
                    past = _cache_of(out)
        finally:
            model.train(was_training)
        tok_l, lp_l, ent_l = tokens.cpu().tolist(), lps.cpu().tolist(), ents.cpu().tolist()
        n_l, fin_l = n_new.cpu().tolist(), finished.cpu().tolist()
        outputs = [
            GenerationOutput(
                token_ids=tok_l[i][: n_l[i]],
                logprobs=lp_l[i][: n_l[i]],
                entropies=ent_l[i][: n_l[i]],
                finish_reason="stop" if fin_l[i] else "length",
            )
            for i in range(B)
        ]
        self.stats["forward_passes"] += forwards
        self.stats["generated_tokens"] += sum(n_l)
        self.stats["seconds"] += time.perf_counter() - t0
        return outputs

    def _prefill(self, requests: list[GenerationRequest]) -> tuple[torch.Tensor, Any, torch.Tensor, torch.Tensor, int]:
        """Run the contexts through the model: ``(last-position logits (B, V), KV cache, attention
        mask (B, L), position of each row's last token (B,), forward passes)``.

        Requests that declare a ``shared_prefix`` are grouped by the tokens of that prefix (capped
        one token short of the context, so every row has a token of its own to take logits at):
        each distinct prefix is prefilled **once**, its KV cache rows are expanded to the rows of
        its group (``DynamicCache.reorder_cache``: an ``index_select`` on every layer's keys and
        values), and only the rows' own suffixes are prefilled on top of it. A row's layout is then
        ``[pad | prefix | pad | suffix]``: the attention mask hides both pads and the position ids
        continue the prefix, so every row sees exactly its own context (VinePPO's ``k`` continuations
        of one fork, a GRPO group's prompt). Without sharing, one left-padded prefill."""
        dev = self.device
        B = len(requests)
        shared = [min(max(int(r.shared_prefix), 0), len(r.context_ids) - 1) for r in requests]
        groups: dict[tuple[int, ...], int] = {}
        row_group = [groups.setdefault(tuple(r.context_ids[:n]), len(groups)) for r, n in zip(requests, shared)]
        if len(groups) == B or not any(shared):  # nothing shared: one prefill of whole contexts
            ids, attn = _left_pad([r.context_ids for r in requests], self.pad_token_id)
            ids, attn = ids.to(dev), attn.to(dev)
            pos = (attn.cumsum(-1) - 1).clamp(min=0)
            out = self._forward(ids, attn, pos, None, logits_to_keep=1)
            return out.logits[:, -1], _cache_of(out), attn, pos[:, -1], 1
        prefixes = list(groups)
        ids, attn_p = _left_pad([list(p) for p in prefixes], self.pad_token_id)
        ids, attn_p = ids.to(dev), attn_p.to(dev)
        out = self._forward(ids, attn_p, (attn_p.cumsum(-1) - 1).clamp(min=0), None, logits_to_keep=1)
        past = _cache_of(out)
        index = torch.tensor(row_group, dtype=torch.long, device=dev)
        past.reorder_cache(index)  # (groups, ...) -> (B, ...): each row gets its prefix's keys/values
        attn_p = attn_p.index_select(0, index)
        suffix, attn_s = _left_pad([r.context_ids[n:] for r, n in zip(requests, shared)], self.pad_token_id)
        suffix, attn_s = suffix.to(dev), attn_s.to(dev)
        start = torch.tensor(shared, dtype=torch.long, device=dev)
        pos = start[:, None] + (attn_s.cumsum(-1) - 1).clamp(min=0)
        attn = torch.cat([attn_p, attn_s], dim=1)
        out = self._forward(suffix, attn, pos, past, logits_to_keep=1)
        return out.logits[:, -1], _cache_of(out), attn, pos[:, -1], 2

    def _forward(self, ids, attn, pos, past, logits_to_keep: Optional[int] = None) -> Any:
        kwargs: dict[str, Any] = dict(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True)
        if past is not None:
            kwargs[_cache_kwarg(type(self.model))] = past
        if logits_to_keep is not None:
            try:
                return self.model(**kwargs, logits_to_keep=logits_to_keep)
            except TypeError:
                pass
        return self.model(**kwargs)


def _left_pad(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, attention mask)``, both (len(seqs), longest) int64, each sequence right-aligned."""
    L = max(len(q) for q in seqs)
    ids = torch.full((len(seqs), L), pad, dtype=torch.long)
    attn = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, q in enumerate(seqs):  # host-side batch assembly
        if q:
            ids[i, L - len(q):] = torch.as_tensor(q, dtype=torch.long)
            attn[i, L - len(q):] = 1
    return ids, attn


@functools.lru_cache(maxsize=None)
def _cache_kwarg(model_cls: type) -> str:
    """The forward keyword of the KV cache: ``cache`` from transformers 5.25 on (which deprecates
    ``past_key_values`` with a FutureWarning per call), ``past_key_values`` before (one look-up per model class)."""
    fwd = getattr(model_cls, "forward", None)
    try:
        return "cache" if "cache" in inspect.signature(fwd).parameters else "past_key_values"
    except (TypeError, ValueError):
        return "past_key_values"


def _cache_of(out: Any) -> Any:
    """The KV cache of a model output under either name (``cache`` on transformers >= 5.25)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)
