"""The policy model of stage 2, rollout generation (survey §8, stage 2).

Two ways to get a policy:

* ``model.path`` set: any local Hugging Face causal-LM directory (:func:`load_policy`), loaded
  with ``local_files_only=True`` (nothing is downloaded).
* ``model.path`` unset: a tiny Qwen2-architecture model built locally (:func:`build_tiny_policy`)
  with a byte-level BPE tokenizer trained on the task family's own text, then given a short
  supervised *format* warm-up (:func:`stages.rollout.warmup.warmup`) so that its first rollouts produce well-formed
  actions. The built model is cached on disk (:func:`get_policy`).

:func:`sequence_logprobs` is the forward pass the policy update (stage 5) uses to re-score
rollout tokens; :class:`stages.rollout.hf_engine.HFEngine` computes behaviour log-probs with the
same formula (log-softmax of temperature-scaled logits), so the importance ratio of the first
update step is exactly 1 up to float error (tested).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from environments.base import TaskFamily
from stages.rollout.config import ModelConfig, RolloutConfig
from stages.rollout.warmup import warmup

PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|eos|>"
#: bump when the tiny-model recipe (tokenizer, init, warm-up) changes: invalidates cached models
RECIPE_VERSION = 3
#: episodes of the warm-up corpus the tokenizer is trained on
TOKENIZER_CORPUS_EPISODES = 512


# --------------------------------------------------------------------------- helpers


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"config key 'model.device' is {device!r} but CUDA is not available")
    return torch.device(device)


def resolve_dtype(dtype: str) -> torch.dtype:
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in table:
        raise ValueError(f"config key 'model.dtype' must be one of {sorted(table)}, got {dtype!r}")
    return table[dtype]


def pad_token_id(tokenizer: Any = None, model: Any = None) -> int:
    """The padding id of a policy: the tokenizer's pad token, else the model config's, else eos
    (tokenizer's, then the model config's first), else 0. Padding is masked out everywhere, so
    any id works; this one keeps padded batches inside the vocabulary."""
    if tokenizer is not None and getattr(tokenizer, "pad_token_id", None) is not None:
        return int(tokenizer.pad_token_id)
    config = getattr(model, "config", None)
    if getattr(config, "pad_token_id", None) is not None:
        return int(config.pad_token_id)
    if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
        return int(tokenizer.eos_token_id)
    eos = getattr(config, "eos_token_id", None)
    if eos is not None:
        return int(eos[0] if isinstance(eos, (list, tuple)) else eos)
    return 0


def count_parameters(model: torch.nn.Module) -> int:
    """Number of distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())


def _episode_texts(corpus: list[tuple[str, list[tuple[str, str]]]]) -> list[str]:
    out = []
    for prompt, steps in corpus:
        parts = [prompt]
        for action, obs in steps:
            parts.append(action if action.endswith("\n") else action + "\n")
            parts.append(obs)
        out.append("".join(parts))
    return out


# --------------------------------------------------------------------------- building / loading


def build_tokenizer(vocab_size: int, corpus_texts: list[str]):
    """Byte-level BPE trained locally on ``corpus_texts``; every byte is in the initial alphabet
    (all printable ASCII included), so any text encodes. The GPT-2 pre-tokenizer splits newlines
    from letters, so ``"\\n"`` and each uppercase letter are single tokens that never merge with
    their neighbours (the action ``"A"`` followed by the stop token ``"\\n"``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 2:
        raise ValueError(
            f"config key 'model.vocab_size' must be at least {len(alphabet) + 2} (256 bytes + 2 special "
            f"tokens), got {vocab_size}"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[PAD_TOKEN, EOS_TOKEN],
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus_texts) or [" "], trainer=trainer)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        clean_up_tokenization_spaces=False,
    )
    hf_tok.padding_side = "left"
    for text in ["\n", *[chr(c) for c in range(ord("A"), ord("Z") + 1)]]:
        ids = hf_tok.encode(text, add_special_tokens=False)
        if len(ids) != 1:  # pragma: no cover - guaranteed by the byte-level alphabet
            raise RuntimeError(f"tokenizer encodes {text!r} as {len(ids)} tokens, expected 1")
    return hf_tok


def build_tiny_qwen2(cfg: Any, tokenizer: Any, build: Callable[[Any], torch.nn.Module], *, seed: int,
                     max_position_embeddings: int, tie_word_embeddings: bool = False, key: str = "model"
                     ) -> torch.nn.Module:
    """A tiny Qwen2-architecture model built here (the policy; the PRM's trunk): ``build(config)``
    on the ``Qwen2Config`` whose sizes are ``cfg``'s ``hidden_size``, ``intermediate_size``,
    ``num_layers``, ``num_heads`` and ``num_kv_heads`` and whose vocabulary and special tokens are
    the tokenizer's. The weights are drawn under ``torch.manual_seed(seed)`` without touching the
    global RNG stream (``fork_rng``), so they are a deterministic function of the config; the
    model is returned in eval mode. ``ValueError`` (naming ``key``'s fields) when the head counts
    do not divide the width."""
    from transformers import Qwen2Config

    if cfg.hidden_size % cfg.num_heads or cfg.num_heads % cfg.num_kv_heads:
        raise ValueError(
            f"{key}.hidden_size ({cfg.hidden_size}) must be divisible by {key}.num_heads ({cfg.num_heads}) "
            f"and num_heads by {key}.num_kv_heads ({cfg.num_kv_heads})"
        )
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build(config)
    model.eval()
    return model


def build_tiny_policy(cfg: ModelConfig, corpus_texts: list[str]):
    """Build the tiny Qwen2-architecture policy and its locally trained tokenizer.

    Returns ``(model, tokenizer)``; the model is float32 on CPU in eval mode, its weights a
    deterministic function of ``cfg`` (seeded with ``cfg.init_seed``) and the tokenizer's
    vocabulary size. Input and output embeddings are tied when ``cfg.tie_embeddings``.
    """
    from transformers import Qwen2ForCausalLM

    tokenizer = build_tokenizer(cfg.vocab_size, corpus_texts)
    model = build_tiny_qwen2(cfg, tokenizer, Qwen2ForCausalLM, seed=cfg.init_seed, max_position_embeddings=2048,
                             tie_word_embeddings=cfg.tie_embeddings)
    return model, tokenizer


def _declares_generic_fast_tokenizer(path: Path) -> bool:
    cfg_file = path / "tokenizer_config.json"
    if not (path / "tokenizer.json").is_file() or not cfg_file.is_file():
        return False
    try:
        declared = json.loads(cfg_file.read_text()).get("tokenizer_class")
    except (json.JSONDecodeError, OSError):
        return False
    return declared in ("TokenizersBackend", "PreTrainedTokenizerFast")


def load_policy(path: str | os.PathLike, device: Optional[str] = None, dtype: Optional[str] = None):
    """Load ``(model, tokenizer)`` from a local Hugging Face model directory (no download).

    Raises ``FileNotFoundError`` naming the path when it does not exist or holds no
    ``config.json``. A tokenizer without a pad token gets ``pad = eos``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(f"model directory {str(p)!r} does not exist (config key 'model.path')")
    if not (p / "config.json").is_file():
        raise FileNotFoundError(
            f"model directory {str(p)!r} has no config.json; expected a local Hugging Face model "
            f"directory (config key 'model.path')"
        )
    kwargs: dict[str, Any] = {"local_files_only": True}
    if dtype is not None:
        kwargs["dtype"] = resolve_dtype(dtype)
    model = AutoModelForCausalLM.from_pretrained(str(p), **kwargs)
    if _declares_generic_fast_tokenizer(p):
        # AutoTokenizer would pick the model type's tokenizer class (Qwen2Tokenizer, which adds
        # an unk token); honour the class the directory declares, as saved by build_tiny_policy
        from transformers import PreTrainedTokenizerFast

        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(p), local_files_only=True)
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer in {str(p)!r} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    if device is not None:
        model.to(resolve_device(device))
    model.eval()
    return model, tokenizer


# --------------------------------------------------------------------------- log-probs


def sequence_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    prompt_len: int,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs and entropies of the response columns ``input_ids[:, prompt_len:]``.

    ``logprobs[b, j] = log softmax(logits / temperature)[token prompt_len + j]`` where the logits
    are those at position ``prompt_len + j - 1``; ``entropies`` are the entropies of the same
    distributions. Both (B, R) float32, differentiable; one forward pass, gather on log_softmax.
    Only the R+1 last positions go through the LM head (``logits_to_keep``) where supported.
    """
    L = input_ids.shape[1]
    R = L - prompt_len
    if prompt_len < 1 or R < 1:
        raise ValueError(f"need prompt_len >= 1 and at least one response column, got prompt_len={prompt_len}, L={L}")
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    try:
        logits = model(**kwargs, logits_to_keep=R + 1).logits
    except TypeError:
        logits = model(**kwargs).logits
    logits = logits[:, -(R + 1) : -1].float()
    if temperature != 1.0:
        logits = logits / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    targets = input_ids[:, prompt_len:]
    logprobs = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropies = -(logp_all.exp() * logp_all).sum(-1)
    return logprobs, entropies


# --------------------------------------------------------------------------- get_policy (cached)


def policy_hash(model_cfg: ModelConfig, family: TaskFamily, seed: int) -> str:
    """Hash of everything that determines the warmed-up tiny model: the model config (less the
    device it runs on), the task family's name and config, the warm-up seed and the recipe."""
    mc = dataclasses.asdict(model_cfg)
    mc.pop("device", None)
    env_cfg = dataclasses.asdict(family.cfg) if dataclasses.is_dataclass(family.cfg) else dict(vars(family.cfg))
    key = {"model": mc, "env": {"name": family.name, "config": env_cfg}, "seed": seed, "recipe": RECIPE_VERSION}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _finalize(model, tokenizer, model_cfg: ModelConfig):
    model.to(device=resolve_device(model_cfg.device), dtype=resolve_dtype(model_cfg.dtype))
    model.eval()
    return model, tokenizer


def get_policy(model_cfg: ModelConfig, family: TaskFamily, home: Path, seed: int,
               rollout_cfg: Optional[RolloutConfig] = None):
    """The policy of a run: ``(model, tokenizer, info)``. ``rollout_cfg`` (the run's) sets the
    tokens per turn of the warm-up's before/after measurement episodes.

    With ``model_cfg.path`` set the local directory is loaded (``FileNotFoundError`` naming
    ``model.path`` if missing). Otherwise the tiny model is built and warmed up, cached under
    ``home/"models"/f"{name}-{hash}"`` (see :func:`policy_hash`) and reused when present; the
    cache entry is written to a temporary directory in the same parent and renamed into place,
    so a reader never sees a half-written model. ``info`` holds name, parameter count, config
    hash, cache path, ``from_cache`` and the warm-up statistics.
    """
    if model_cfg.path:
        p = Path(model_cfg.path).expanduser()
        if not (p / "config.json").is_file():
            raise FileNotFoundError(
                f"config key 'model.path': {str(p)!r} is not a local Hugging Face model directory "
                f"({'no config.json' if p.is_dir() else 'does not exist'})"
            )
        model, tokenizer = load_policy(p)
        model, tokenizer = _finalize(model, tokenizer, model_cfg)
        info = {
            "name": model_cfg.name,
            "path": str(p),
            "num_parameters": count_parameters(model),
            "config_hash": hashlib.sha256(str(p.resolve()).encode()).hexdigest()[:12],
            "cache_path": None,
            "from_cache": False,
            "warmup": {},
        }
        return model, tokenizer, info

    h = policy_hash(model_cfg, family, seed)
    root = Path(home) / "models"
    final = root / f"{model_cfg.name}-{h}"
    if (final / "config.json").is_file() and (final / "creditflow_policy.json").is_file():
        model, tokenizer = load_policy(final)
        meta = json.loads((final / "creditflow_policy.json").read_text())
        model, tokenizer = _finalize(model, tokenizer, model_cfg)
        info = {
            "name": model_cfg.name,
            "num_parameters": count_parameters(model),
            "config_hash": h,
            "cache_path": str(final),
            "from_cache": True,
            "warmup": meta.get("warmup", {}),
            "build_seconds": meta.get("build_seconds"),
        }
        return model, tokenizer, info

    t0 = time.perf_counter()
    corpus_texts = _episode_texts(family.warmup_corpus(TOKENIZER_CORPUS_EPISODES, model_cfg.init_seed))
    model, tokenizer = build_tiny_policy(model_cfg, corpus_texts)
    model.to(resolve_device(model_cfg.device))  # warm-up in float32, cast afterwards
    stats = warmup(model, tokenizer, family, model_cfg, seed, rollout_cfg=rollout_cfg)
    build_seconds = time.perf_counter() - t0
    model.to("cpu")
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    try:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        meta = {"model": dataclasses.asdict(model_cfg), "env": family.name, "seed": seed, "config_hash": h,
                "warmup": stats, "build_seconds": build_seconds, "recipe": RECIPE_VERSION}
        (tmp / "creditflow_policy.json").write_text(json.dumps(meta, indent=1, sort_keys=True, default=str))
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "creditflow_policy.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process won the race; identical content
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    model, tokenizer = _finalize(model, tokenizer, model_cfg)
    info = {
        "name": model_cfg.name,
        "num_parameters": count_parameters(model),
        "config_hash": h,
        "cache_path": str(final),
        "from_cache": False,
        "warmup": stats,
        "build_seconds": build_seconds,
    }
    return model, tokenizer, info


@dataclasses.dataclass
class LivePolicy:
    """A run's live policy: the model (on its device, in the configured dtype, eval mode), its
    tokenizer, the rollout engine sampling from it, and :func:`get_policy`'s ``info``."""

    model: torch.nn.Module
    tokenizer: Any
    engine: Any
    info: dict[str, Any]


def build_live_policy(model_cfg: ModelConfig, rollout_cfg: RolloutConfig, family: TaskFamily, home: Path,
                      seed: int, device: torch.device) -> LivePolicy:
    """The policy of a run, as the flow process and every rollout shard's worker build it (one
    builder, so shards sample from exactly the run's policy): :func:`get_policy` under
    ``torch.manual_seed(seed)``, cast to ``model.dtype`` on ``device``, and the engine
    ``rollout.engine`` names (:func:`stages.rollout.engines.make_engine`)."""
    from stages.rollout.engines import make_engine

    torch.manual_seed(seed)
    model, tokenizer, info = get_policy(model_cfg, family, home, seed, rollout_cfg)
    model = model.to(device=device, dtype=resolve_dtype(model_cfg.dtype)).eval()
    # rollout.engine: hf samples from this model object; vllm keeps its own copy (synced on demand)
    engine = make_engine(rollout_cfg, model, tokenizer, seed=seed)
    return LivePolicy(model=model, tokenizer=tokenizer, engine=engine, info=dict(info))
