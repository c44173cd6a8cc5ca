"""A process reward model (PRM) trained here (survey §3.3.1: Math-Shepherd, OmegaPRM, PURE's PRM).

The PRM scores each reasoning step of a solution: ``P(step k is correct | prompt, steps 0..k)``.
It is a small Qwen2-architecture transformer trunk (built from a config, no download) with a
scalar value head; the score of step ``k`` is ``sigmoid(head(h))`` at the step's *last token*
(its ``"\\n"``), so one causal forward pass scores every step prefix of a solution at once.

Text layout (the agent loop's, so the PRM sees what the policy wrote): the prompt, then each step
followed by ``"\\n"``; pieces are tokenized one by one and concatenated, so step boundaries are
exact token boundaries.

Training (:func:`train_prm`): binary cross-entropy between the step scores and 0/1 step labels —
from the task family's procedural step checks (``turns[k].info["step_correct"]``) or from
Math-Shepherd MC estimates — with AdamW. Input: any iterable of
``(prompt_text, [step_texts], [labels])``; the CLI (:mod:`flows.prm_cli`, ``creditflow prm
train``) collects them by playing episodes of a task family with the run's (tiny) policy.

Saved as a directory (:func:`save_prm` / :func:`load_prm`): ``model.safetensors`` (trunk + head,
float32), ``config.json`` (the Qwen2 config, the :class:`PRMConfig` and training statistics) and
the tokenizer files; written to a temporary directory and renamed into place.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import torch
from torch import nn
from stages.config_fields import param

#: format tag in config.json
PRM_FORMAT = "creditflow-prm"
PRM_FORMAT_VERSION = 1

Example = tuple[str, Sequence[str], Sequence[float]]


@dataclass
class PRMConfig:
    """Size and training recipe of a PRM built here."""

    hidden_size: int = param(64, help="trunk width (Qwen2 architecture, like the tiny policy)", ge=1)
    num_layers: int = param(2, help="transformer blocks", ge=1)
    num_heads: int = param(4, help="attention heads", ge=1)
    num_kv_heads: int = param(2, help="key/value heads (GQA)", ge=1)
    intermediate_size: int = param(128, help="MLP width", ge=1)
    vocab_size: int = param(384, help="size of the BPE tokenizer trained on the examples (when none is given)", ge=1)
    max_length: int = param(512, help="tokens per solution; steps ending beyond it are not scored (nan)", ge=1)
    steps: int = param(300, help="optimizer steps", ge=1)
    batch_size: int = param(16, help="solutions per step", ge=1)
    lr: float = param(3e-3, help="AdamW learning rate", gt=0)
    weight_decay: float = param(0.0, help="AdamW weight decay", ge=0)
    seed: int = param(0, help="seed of the initial weights and of the minibatch order")


def _step_text(step: str) -> str:
    return step if step.endswith("\n") else step + "\n"


class ProcessRewardModel(nn.Module):
    """Qwen2 trunk + scalar head; :meth:`score` gives per-step probabilities."""

    def __init__(self, qwen2_config: Any, tokenizer: Any, cfg: PRMConfig):
        super().__init__()
        from transformers import Qwen2Model

        self.cfg = cfg
        self.tokenizer = tokenizer
        self.qwen2_config = qwen2_config
        #: non-pad tokens :meth:`score` ran through the model (the CA overhead's forward_tokens)
        self.forward_tokens = 0
        self.trunk = Qwen2Model(qwen2_config)
        self.head = nn.Linear(qwen2_config.hidden_size, 1)

    # ---------------------------------------------------------------- encoding

    def encode(self, examples: Sequence[tuple[str, Sequence[str]]]) -> list[tuple[list[int], list[int]]]:
        """``(token ids, end index of each step)`` per example; ids truncated to ``max_length``
        (a step whose last token falls beyond it gets end ``-1``: not scored)."""
        pieces: list[str] = []
        owner: list[tuple[int, bool]] = []
        for e, (prompt, steps) in enumerate(examples):
            pieces.append(prompt)
            owner.append((e, False))
            for s in steps:
                pieces.append(_step_text(s))
                owner.append((e, True))
        enc = self.tokenizer(pieces, add_special_tokens=False)["input_ids"] if pieces else []
        ids: list[list[int]] = [[] for _ in examples]
        ends: list[list[int]] = [[] for _ in examples]
        for (e, is_step), piece in zip(owner, enc):
            ids[e].extend(piece)
            if is_step:
                ends[e].append(len(ids[e]) - 1 if piece else -1)
        L = self.cfg.max_length
        return [(x[:L], [j if 0 <= j < L else -1 for j in en]) for x, en in zip(ids, ends)]

    def _pad(self, encoded: Sequence[tuple[list[int], list[int]]]):
        device = next(self.parameters()).device
        B = len(encoded)
        L = max([len(x) for x, _ in encoded] + [1])
        S = max([len(en) for _, en in encoded] + [1])
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        x = torch.full((B, L), pad, dtype=torch.long)
        am = torch.zeros((B, L), dtype=torch.long)
        ends = torch.full((B, S), -1, dtype=torch.long)
        for i, (ids, en) in enumerate(encoded):  # host-side batch assembly
            x[i, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
            am[i, : len(ids)] = 1
            if en:
                ends[i, : len(en)] = torch.as_tensor(en, dtype=torch.long)
        return x.to(device), am.to(device), ends.to(device)

    def step_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        """(B, S) logits at each step's last token (garbage where ``ends < 0``; mask them)."""
        h = self.trunk(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        logits = self.head(h.float()).squeeze(-1)  # (B, L)
        return logits.gather(1, ends.clamp(min=0))

    @torch.no_grad()
    def score(self, examples: Sequence[tuple[str, Sequence[str]]], batch_size: int = 64) -> list[torch.Tensor]:
        """Per example, a float tensor with ``P(step correct | prefix)`` of each step (nan if truncated)."""
        was = self.training
        self.eval()
        out: list[torch.Tensor] = []
        try:
            for start in range(0, len(examples), batch_size):
                chunk = list(examples[start : start + batch_size])
                encoded = self.encode(chunk)
                x, am, ends = self._pad(encoded)
                self.forward_tokens += int(am.sum())
                p = torch.sigmoid(self.step_logits(x, am, ends)).float().cpu()
                p = torch.where(ends.cpu() >= 0, p, torch.full_like(p, float("nan")))
                out.extend(p[i, : len(steps)].clone() for i, (_, steps) in enumerate(chunk))
        finally:
            self.train(was)
        return out


# --------------------------------------------------------------------------------------------
# building / training
# --------------------------------------------------------------------------------------------


def build_prm(cfg: PRMConfig, tokenizer: Any = None, corpus_texts: Optional[list[str]] = None) -> ProcessRewardModel:
    """A fresh PRM (weights seeded by ``cfg.seed``). Without ``tokenizer`` a byte-level BPE
    tokenizer is trained on ``corpus_texts`` (the policy's recipe, :func:`stages.rollout.policy.build_tokenizer`)."""
    from stages.rollout.policy import build_tiny_qwen2, build_tokenizer

    if tokenizer is None:
        tokenizer = build_tokenizer(cfg.vocab_size, list(corpus_texts or []))
    return build_tiny_qwen2(cfg, tokenizer, lambda qcfg: ProcessRewardModel(qcfg, tokenizer, cfg), seed=cfg.seed,
                            max_position_embeddings=max(cfg.max_length, 16), key="prm")


def _check_examples(examples: Iterable[Example]) -> list[Example]:
    out = []
    for i, ex in enumerate(examples):
        try:
            prompt, steps, labels = ex
        except (TypeError, ValueError):
            raise ValueError(f"PRM example {i} must be (prompt_text, [step_texts], [labels]), got {ex!r}") from None
        steps, labels = list(steps), [float(v) for v in labels]
        if len(steps) != len(labels):
            raise ValueError(f"PRM example {i}: {len(steps)} steps but {len(labels)} labels")
        for k, v in enumerate(labels):
            if not (math.isfinite(v) and 0.0 <= v <= 1.0):
                raise ValueError(f"PRM example {i}: labels[{k}] must be in [0, 1], got {v!r}")
        out.append((str(prompt), steps, labels))
    return out


def _label_matrix(examples: Sequence[Example], encoded, S: int) -> torch.Tensor:
    y = torch.full((len(examples), S), float("nan"))
    for i, ((_, _, labels), (_, ends)) in enumerate(zip(examples, encoded)):
        for k, (v, e) in enumerate(zip(labels, ends)):
            if e >= 0:
                y[i, k] = v
    return y


def train_prm(
    examples: Iterable[Example],
    cfg: Optional[PRMConfig] = None,
    tokenizer: Any = None,
    log_every: int = 0,
) -> tuple[ProcessRewardModel, dict[str, Any]]:
    """Train a PRM by BCE on step labels. Returns ``(model, stats)`` (model in eval mode, on CPU
    or CUDA when available). Deterministic for a fixed ``cfg.seed`` on one device."""
    cfg = cfg or PRMConfig()
    data = _check_examples(examples)
    if not data or not any(ex[1] for ex in data):
        raise ValueError("train_prm: no labelled steps in the training examples")
    texts = [p + "".join(_step_text(s) for s in steps) for p, steps, _ in data]
    model = build_prm(cfg, tokenizer=tokenizer, corpus_texts=texts)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    encoded = model.encode([(p, s) for p, s, _ in data])
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    t0 = time.perf_counter()
    losses: list[float] = []
    n = len(data)
    order = torch.randperm(n, generator=gen).tolist()
    pos = 0
    model.train()
    try:
        for step in range(cfg.steps):
            rows = []
            while len(rows) < min(cfg.batch_size, n):
                if pos >= n:
                    order, pos = torch.randperm(n, generator=gen).tolist(), 0
                rows.append(order[pos])
                pos += 1
            enc = [encoded[r] for r in rows]
            x, am, ends = model._pad(enc)
            y = _label_matrix([data[r] for r in rows], enc, ends.shape[1]).to(device)
            valid = torch.isfinite(y) & (ends >= 0)
            logits = model.step_logits(x, am, ends)
            bce = nn.functional.binary_cross_entropy_with_logits(logits, torch.nan_to_num(y), reduction="none")
            loss = (bce * valid).sum() / valid.sum().clamp(min=1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(float(loss.detach()))
            if log_every and (step + 1) % log_every == 0:
                print(f"prm step {step + 1}/{cfg.steps}: loss {sum(losses[-log_every:]) / log_every:.4f}", flush=True)
    finally:
        model.eval()
        opt.zero_grad(set_to_none=True)
    final = float(sum(losses[-10:]) / len(losses[-10:])) if losses else float("nan")
    if losses and not math.isfinite(final):
        raise RuntimeError(f"PRM training diverged: final loss {final}")
    labels = [v for _, _, ls in data for v in ls]
    stats = {
        "examples": n,
        "steps_labelled": len(labels),
        "positive_fraction": sum(v >= 0.5 for v in labels) / max(len(labels), 1),
        "first_loss": losses[0] if losses else float("nan"),
        "final_loss": final,
        "seconds": time.perf_counter() - t0,
        "optimizer_steps": cfg.steps,
    }
    return model, stats


def evaluate_prm(model: ProcessRewardModel, examples: Iterable[Example]) -> dict[str, float]:
    """Step-level accuracy (threshold 0.5 on label and score), balanced accuracy and BCE."""
    data = _check_examples(examples)
    scores = model.score([(p, s) for p, s, _ in data])
    p_all, y_all = [], []
    for sc, (_, _, labels) in zip(scores, data):
        for p, y in zip(sc.tolist(), labels):
            if math.isfinite(p):
                p_all.append(p)
                y_all.append(y)
    if not p_all:
        return {"steps": 0.0}
    p = torch.tensor(p_all, dtype=torch.float64)
    y = torch.tensor(y_all, dtype=torch.float64)
    pred, truth = p >= 0.5, y >= 0.5
    acc = float((pred == truth).double().mean())
    recalls = [float((pred[truth == c] == c).double().mean()) for c in (True, False) if bool((truth == c).any())]
    bce = float(nn.functional.binary_cross_entropy(p.clamp(1e-7, 1 - 1e-7), y))
    return {"steps": float(len(p_all)), "accuracy": acc, "balanced_accuracy": sum(recalls) / len(recalls), "bce": bce}


# --------------------------------------------------------------------------------------------
# save / load
# --------------------------------------------------------------------------------------------


def save_prm(model: ProcessRewardModel, path: str | os.PathLike, stats: Optional[dict[str, Any]] = None) -> Path:
    """Write the PRM directory atomically (temporary directory in the same parent, then rename;
    an existing directory at ``path`` is replaced)."""
    from safetensors.torch import save_file

    final = Path(path).expanduser().resolve()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    try:
        tmp.mkdir()
        state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": PRM_FORMAT})
        meta = {
            "format": PRM_FORMAT,
            "version": PRM_FORMAT_VERSION,
            "prm": dataclasses.asdict(model.cfg),
            "qwen2": model.qwen2_config.to_dict(),
            "stats": stats or {},
        }
        (tmp / "config.json").write_text(json.dumps(meta, indent=1, sort_keys=True, default=str))
        model.tokenizer.save_pretrained(str(tmp))
        old = None
        if final.exists():
            old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:6]}"
            os.rename(final, old)
        os.rename(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def load_prm(path: str | os.PathLike, device: Optional[str] = None) -> ProcessRewardModel:
    """Load a PRM directory written by :func:`save_prm` (eval mode)."""
    from safetensors.torch import load_file
    from transformers import PreTrainedTokenizerFast, Qwen2Config

    p = Path(path).expanduser()
    cfg_file = p / "config.json"
    if not cfg_file.is_file() or not (p / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"PRM directory {str(p)!r} has no config.json / model.safetensors (config key 'credit.prm_path'; "
            f"train one with `creditflow prm train --env math --out DIR`)"
        )
    meta = json.loads(cfg_file.read_text())
    if meta.get("format") != PRM_FORMAT:
        raise ValueError(f"{str(cfg_file)!r} is not a creditflow PRM (format {meta.get('format')!r})")
    known = {f.name for f in dataclasses.fields(PRMConfig)}
    cfg = PRMConfig(**{k: v for k, v in meta["prm"].items() if k in known})
    qcfg = Qwen2Config.from_dict(meta["qwen2"])
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(p), local_files_only=True)
    model = ProcessRewardModel(qcfg, tokenizer, cfg)
    model.load_state_dict(load_file(str(p / "model.safetensors")))
    model.eval()
    if device is not None:
        from stages.rollout.policy import resolve_device

        model.to(resolve_device(device))
    model.stats = meta.get("stats", {})  # type: ignore[attr-defined]
    return model


# --------------------------------------------------------------------------------------------
# training data from a task family (CLI path)
# --------------------------------------------------------------------------------------------


def reference_examples(family: Any, instances: Sequence[Any], seed: int) -> list[Example]:
    """Labelled solutions built from each instance's privileged reference solution
    (``env.privileged()["reference_steps"]`` and ``["answer"]``, where the family provides them):
    the reference itself, and a copy with one step's result changed (+1), each played through a
    fresh environment so that every label is the family's own procedural step check. A weak
    policy rarely writes a correct step; these give the PRM positives and near-miss negatives."""
    import random
    import re

    rng = random.Random(seed)
    out: list[Example] = []
    for inst in instances:
        probe = family.make(inst)
        try:
            probe.reset()
            priv = probe.privileged() or {}
        finally:
            probe.close()
        ref = [str(x).rstrip("\n") for x in priv.get("reference_steps") or []]
        if not ref or priv.get("answer") is None:
            continue
        lines = ref + [f"answer {priv['answer']}"]
        variants = [lines]
        j = rng.randrange(len(lines))
        m = re.search(r"(-?\d+)(?!.*\d)", lines[j])
        if m:
            bad = lines[j][: m.start()] + str(int(m.group(1)) + 1) + lines[j][m.end():]
            variants.append(lines[:j] + [bad] + lines[j + 1:])
        for steps in variants:
            env = family.make(inst)
            try:
                prompt = env.reset()
                played, labels = [], []
                for line in steps:
                    res = env.step(line + "\n")
                    flag = res.info.get("step_correct")
                    if flag is None:
                        break
                    played.append(line)
                    labels.append(1.0 if flag is True else 0.0 if flag is False else float(flag))
                    if res.done:
                        break
            finally:
                env.close()
            if played:
                out.append((prompt, played, labels))
    return out
