"""Log-probs of given tokens after given contexts under a causal LM: the one scorer of the project.

:class:`HFScorer` implements the ``Scorer`` protocol of :mod:`stages.credit.base` (the
``scorer`` need of self-rewarding and attribution methods: T-REG, ACPO §3.3.2, Shapley credit)
and is the forward pass of the local LLM judge (:class:`stages.reward.judge_hf.HFJudge`)::

    logp[i][j] = log softmax(logits(contexts[i] + targets[i][:j]) / temperature)[targets[i][j]]

— the formula of :func:`stages.rollout.policy.sequence_logprobs` (and of the behaviour log-probs
the engines record), so under the behaviour policy at the rollout temperature the scorer
reproduces a trajectory's recorded log-probs. :meth:`HFScorer.next_token_logprobs` gives the
next-token log-probs of candidate tokens after each context (the judge's yes/no words), and
:func:`response_logprobs` the (B, R) log-probs of a batch's response tokens under any model
(the ``ref_logprobs`` need: the frozen initial policy, the KL reference).

Batching: sequences ``context + target`` are sorted by length, grouped in chunks of at most
``batch_size`` rows and ``max_tokens`` padded tokens (``None``: no limit, one forward per call),
left-padded (every target ends at the right edge; ``attention_mask`` and ``position_ids`` make
the padding invisible) and run in one forward per chunk with ``logits_to_keep = max target
length + 1``. Float32 log-softmax; no grad; the model's train/eval mode is restored afterwards.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from stages.rollout.policy import pad_token_id


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


class HFScorer:
    """``Scorer`` on a transformers causal LM: ``log p(targets[i] | contexts[i])`` per target token.

    ``temperature``: the logits are divided by it before the log-softmax (the rollout temperature
    makes the scores comparable with behaviour log-probs); ``batch_size`` / ``max_tokens``: chunk
    limits (rows, padded tokens), ``None`` = unlimited. Counters: ``forward_passes`` (one per
    chunk) and ``prompt_tokens`` (non-pad tokens run)."""

    def __init__(self, model: torch.nn.Module, pad_token_id: Optional[int] = None, batch_size: Optional[int] = 32,
                 max_tokens: Optional[int] = 65536, temperature: float = 1.0):
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"scorer batch_size must be >= 1, got {batch_size}")
        if not temperature > 0:
            raise ValueError(f"scorer temperature must be > 0, got {temperature}")
        self.model = model
        self.pad_token_id = _pad_of(model) if pad_token_id is None else int(pad_token_id)
        self.batch_size = None if batch_size is None else int(batch_size)
        self.max_tokens = None if max_tokens is None else int(max_tokens)
        self.temperature = float(temperature)
        self.forward_passes = 0
        self.prompt_tokens = 0

    def __repr__(self) -> str:
        return f"HFScorer(model={type(self.model).__name__}, batch_size={self.batch_size})"

    def _chunks(self, order: list[int], length: Any) -> list[list[int]]:
        """Rows in ``order`` cut into chunks within ``batch_size`` rows and ``max_tokens`` padded tokens
        (rows sorted by length, so a chunk's padded width is its last row's length)."""
        chunks: list[list[int]] = []
        cur: list[int] = []
        for i in order:
            L = length(i)
            full = self.batch_size is not None and len(cur) >= self.batch_size
            too_big = self.max_tokens is not None and L * (len(cur) + 1) > self.max_tokens
            if cur and (full or too_big):
                chunks.append(cur)
                cur = []
            cur.append(i)
        if cur:
            chunks.append(cur)
        return chunks

    def _forward(self, seqs: list[list[int]], keep: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded forward of ``seqs``: float32 logits of the last ``keep`` positions, divided by the
        temperature, and the padded input ids (on the model's device)."""
        L = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), L), self.pad_token_id, dtype=torch.long)
        attn = torch.zeros((len(seqs), L), dtype=torch.long)
        for r, s in enumerate(seqs):  # host-side assembly of the padded chunk (once per chunk, not per token)
            ids[r, L - len(s):] = torch.as_tensor(s, dtype=torch.long)
            attn[r, L - len(s):] = 1
        dev = _device_of(self.model)
        ids, attn = ids.to(dev), attn.to(dev)
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        kw = dict(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False)
        try:
            logits = self.model(**kw, logits_to_keep=keep).logits
        except TypeError:
            logits = self.model(**kw).logits
        self.forward_passes += 1
        self.prompt_tokens += int(attn.sum())
        logits = logits[:, -keep:].float()
        if self.temperature != 1.0:
            logits = logits / self.temperature
        return logits, ids

    def _eval_mode(self):
        model = self.model
        was_training = model.training
        model.eval()
        return was_training

    def __call__(self, contexts: list[list[int]], targets: list[list[int]]) -> list[torch.Tensor]:
        if len(contexts) != len(targets):
            raise ValueError(f"scorer: {len(contexts)} contexts but {len(targets)} targets")
        for i, c in enumerate(contexts):
            if len(c) < 1:
                raise ValueError(f"scorer: contexts[{i}] is empty (need at least one token to condition on)")
        out: list[torch.Tensor] = [torch.zeros(0) for _ in contexts]  # an empty target scores to an empty tensor
        rows_with_targets = [i for i in range(len(contexts)) if len(targets[i])]
        order = sorted(rows_with_targets, key=lambda i: len(contexts[i]) + len(targets[i]))
        was_training = self._eval_mode()
        try:
            with torch.inference_mode():
                for rows in self._chunks(order, lambda i: len(contexts[i]) + len(targets[i])):
                    T = max(len(targets[i]) for i in rows)
                    logits, ids = self._forward([list(contexts[i]) + list(targets[i]) for i in rows], T + 1)
                    logp = torch.log_softmax(logits[:, :-1], dim=-1)
                    lp = logp.gather(-1, ids[:, ids.shape[1] - T:].unsqueeze(-1)).squeeze(-1).cpu()
                    for r, i in enumerate(rows):
                        out[i] = lp[r, T - len(targets[i]):].clone()
        finally:
            self.model.train(was_training)
        return out

    def next_token_logprobs(self, contexts: list[list[int]], token_ids: list[int]) -> torch.Tensor:
        """(N, C) log-probs of each of the candidate ``token_ids`` as the next token after each context
        (one forward per chunk of contexts, ``logits_to_keep=1``)."""
        for i, c in enumerate(contexts):
            if not c:
                raise ValueError(f"scorer: contexts[{i}] is empty (need at least one token to condition on)")
        out = torch.empty(len(contexts), len(token_ids))
        cand = torch.tensor(token_ids, dtype=torch.long)
        order = sorted(range(len(contexts)), key=lambda i: len(contexts[i]))
        was_training = self._eval_mode()
        try:
            with torch.inference_mode():
                for rows in self._chunks(order, lambda i: len(contexts[i])):
                    logits, _ = self._forward([list(contexts[i]) for i in rows], 1)
                    logp = torch.log_softmax(logits[:, -1], dim=-1).cpu()
                    out[torch.tensor(rows)] = logp[:, cand]
        finally:
            self.model.train(was_training)
        return out


def _pad_of(model: torch.nn.Module) -> int:
    return pad_token_id(None, model)


def response_logprobs(model: torch.nn.Module, batch: Any, pad: int, temperature: float = 1.0) -> torch.Tensor:
    """(B, R) log-probs of ``batch``'s response tokens under ``model`` at ``temperature`` (0 outside
    the policy-token mask): the ``ref_logprobs`` of KL-regularised and implicit-reward methods."""
    from stages.rollout.policy import sequence_logprobs

    t = batch.to_tensors(pad_token_id=pad)
    device = _device_of(model)
    with torch.no_grad():
        lp, _ = sequence_logprobs(model, t.input_ids.to(device), t.attention_mask.to(device),
                                  t.position_ids.to(device), t.prompt_len, temperature=temperature)
    return lp.cpu() * t.response_mask


def response_hidden_states(model: torch.nn.Module, batch: Any, pad: int) -> torch.Tensor:
    """(B, R, H) float32 last-layer hidden states of ``model`` at ``batch``'s response positions
    (0 on padding): position j is the trunk's output *at* response token j, so it has read the
    prompt and the response up to and including token j and nothing after it (a causal model).
    One forward over the batch, no grad; SPA-RL's progress features (``needs={"hidden_states"}``)."""
    t = batch.to_tensors(pad_token_id=pad)
    device = _device_of(model)
    trunk = getattr(model, "base_model", None) or model
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = trunk(input_ids=t.input_ids.to(device), attention_mask=t.attention_mask.to(device),
                        position_ids=t.position_ids.to(device), use_cache=False)
    finally:
        model.train(was_training)
    h = out.last_hidden_state[:, t.prompt_len:].float().cpu()
    return h * (t.attention_mask[:, t.prompt_len:] != 0).unsqueeze(-1).to(h.dtype)
