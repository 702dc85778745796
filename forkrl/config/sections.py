"""The run configuration's sections: one dataclass per section, every field documented next to itself.

`forkrl.config` assembles them into `Config` and loads, validates and saves it; the allowed names
and numeric bounds come from the core's registries (`forkrl.config.fields`).
"""

from __future__ import annotations

from dataclasses import dataclass

from forkrl.config import fields as choices
from forkrl.config.fields import opt
from forkrl.config.loss import AlgorithmConfig, LossConfig

__all__ = [
    "ModelConfig",
    "TaskConfig",
    "DataConfig",
    "RolloutConfig",
    "SelectionConfig",
    "LossConfig",
    "AlgorithmConfig",
    "SamplingConfig",
    "RewardConfig",
    "OptimConfig",
    "TrainConfig",
]


@dataclass
class ModelConfig:
    path: str | None = opt(
        None,
        "local Hugging Face causal-LM folder, or a model name (Qwen/Qwen3-0.6B) in the local Hugging Face "
        "cache, never downloaded; empty = the shipped tiny warm start",
    )
    dtype: str = opt("float32", "parameter dtype for training", ("float32", "bfloat16", "float16"))
    device: str = opt("auto", "auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    selective_head: bool = opt(
        True, "apply the LM head only at selected tokens in the update (DESIGN: Selective LM head)"
    )
    pad_token: str | None = opt(None, "padding token to use when the tokenizer has none (e.g. its EOS token)")
    share_prompt: bool = opt(
        True,
        "run each prompt once per group in training forwards (same values up to rounding): a group's "
        "prompt and its responses as one packed sequence without padding where that costs fewer FLOPs "
        "(llama, qwen2/3, mistral with sdpa or eager attention), else the prompt's KV cache repeated "
        "(not under gradient checkpointing)",
    )
    chat_template: bool = opt(False, "wrap prompts with the tokenizer's chat template")
    trust_remote_code: bool = opt(
        False, "run a model folder's own Python code (auto_map) to load it; only for code you have read"
    )
    gradient_checkpointing: bool = opt(
        False,
        "recompute each decoder layer in the backward instead of keeping its activations (transformers' "
        "gradient checkpointing; shared prompts stay on where they run packed, see model.share_prompt)",
    )
    update_dtype: str = opt(
        "float32",
        "dtype of the transformer body in the update's forward and backward (torch.autocast; weights, "
        "optimizer, LM head and sampling stay in model.dtype): bfloat16 halves a CPU update with AMX/AVX512-BF16 "
        "(bench/results/real-model-cpu.md)",
        ("float32", "bfloat16"),
    )
    lora_rank: int = opt(
        0, "LoRA adapters of this rank (PEFT) instead of training every weight; 0 = full fine-tuning", lo=0
    )
    lora_alpha: float = opt(16.0, "LoRA scaling alpha (the update is alpha / rank x B A)", lo=0.0)
    lora_dropout: float = opt(
        0.0, "dropout on the LoRA input (0 keeps a resumed run bit-identical)", lo=0.0, lt=1.0
    )
    lora_targets: str = opt(
        "all-linear",
        "modules that get adapters: all-linear (every linear layer but the LM head) or a "
        "comma-separated list of module names (q_proj,v_proj)",
    )


@dataclass
class TaskConfig:
    name: str = opt(
        "pick",
        "built-in task used when data.path is empty: pick (for the shipped tiny model), arith "
        "(arithmetic in words, for pretrained instruct models)",
        ("pick", "arith"),
    )
    max_value: int = opt(30, "pick: addends are drawn from 1..max_value", lo=2)
    n_candidates: int = opt(4, "pick: candidates shown per problem (one is right)", lo=2)
    level: str = opt(
        "add1",
        "arith: add1 (one-digit addition), add2 (two-digit), mul1 (one-digit multiplication), word "
        "(one-step word problems), mix (all four in turn)",
        ("add1", "add2", "mul1", "word", "mix"),
    )


@dataclass
class DataConfig:
    path: str | None = opt(
        None,
        "training data: a local .jsonl or .parquet file, a folder written by datasets' Dataset.save_to_disk "
        "or DatasetDict.save_to_disk, or a Hugging Face dataset name (owner/name, owner/name:config) read "
        "from the local datasets cache, never downloaded; empty = the built-in task",
    )
    eval_path: str | None = opt(
        None,
        "held-out data for periodic evaluation, in any form data.path takes (default: the task's test split)",
    )
    split: str = opt(
        "train",
        "split of data.path read when it is a DatasetDict folder or a dataset name (a .jsonl/.parquet file "
        "or a Dataset.save_to_disk folder is read whole)",
    )
    eval_split: str = opt(
        "test",
        "split of data.eval_path read when it is a DatasetDict folder or a dataset name (so data.path and "
        "data.eval_path may name the same dataset: train on its train split, evaluate on its test split)",
    )
    dapo_template: bool = opt(
        False,
        "put each prompt in DAPO's prompt template (Solve ... Answer: $Answer), before model.chat_template",
    )
    prompt_field: str = opt("prompt", "row field holding the prompt (a string)")
    answer_field: str = opt("answer", "row field holding the ground-truth answer")
    on_error: str = opt("raise", "what to do with a malformed row", ("raise", "skip"))


@dataclass
class RolloutConfig:
    backend: str = opt(
        "hf",
        "generation backend: hf (transformers), vllm (CUDA: pip install 'forkrl[vllm]'; CPU: bash scripts/setup.sh --vllm)",
        ("hf", "vllm"),
    )
    prompts_per_step: int = opt(16, "prompts whose groups are trained on per RL step", lo=1)
    group_size: int = opt(8, "completions sampled per prompt (G)", lo=1)
    temperature: float = opt(
        1.0, "sampling temperature T; entropies and log-probs use softmax(z / T)", gt=0.0
    )
    # vLLM's SamplingParams refuses top_p outside (0, 1]; 0 would keep no nucleus at all.
    top_p: float = opt(1.0, "nucleus sampling mass (1.0 = off, as in training in the paper)", gt=0.0, hi=1.0)
    max_new_tokens: int = opt(0, "completion length budget; 0 = the task's default", lo=0)
    threads: int = opt(
        0,
        "torch CPU threads while generating with the hf backend on CPU; 0 = auto: 1 for models under "
        "2M parameters (their decode steps are bound by per-op overhead, which more threads add to; "
        "bench/decode.py), else train.threads",
        lo=0,
    )
    lean_decode: bool = opt(
        True,
        "hf backend: decode steps of Llama/Qwen2/Qwen3/Mistral models through forkrl's lean step (the same "
        "logits as the model's forward, less overhead per token); false = the model's forward every step",
    )
    dtype: str = opt(
        "float32",
        "hf backend: sample from the policy itself (float32: in model.dtype) or from a bfloat16 copy of "
        "its weights, cast from the policy for each rollout and freed after it (1.8x faster decoding with "
        "AMX/AVX512-BF16; half the weights' memory more while sampling). The copy's entropies select; its "
        "log-probs are not old log-probs: with optim.mini_batches=1 the update's own are (ratio 1), else "
        "the scoring pass runs (DESIGN: Precision)",
        ("float32", "bfloat16"),
    )
    reuse_logprobs: bool = opt(
        True,
        "take old log-probs and entropies from the sampler (same model, same T) "
        "instead of a separate scoring pass (hf only: vllm gives no entropies)",
    )
    vllm_gpu_memory_utilization: float = opt(
        0.3, "vllm: share of GPU memory the colocated engine may take (weights + KV cache)", lo=0.01, hi=1
    )
    vllm_sleep: bool = opt(
        True, "vllm: free the engine's GPU memory during the update (sleep level 1: weights to CPU)"
    )


@dataclass
class SelectionConfig:
    rho: float = opt(0.2, "fraction of tokens that carry the gradient (paper: 0.2)", lo=0.0, hi=1.0)
    rule: str = opt(
        "top",
        "which tokens: highest entropy, lowest, uniform random, or all (forkrl.core.selection.RULES)",
        choices.rules,
    )
    count: str = opt(
        "exact",
        "exact: k = ceil(rho*N) with deterministic ties; quantile: H >= (1-rho) quantile (TRL)",
        choices.counts,
    )
    scope: str = opt("batch", "the token set rho is taken over", ("batch", "micro_batch", "sequence"))
    entropy_source: str = opt(
        "old",
        "old: entropies of the scoring pass; current: recomputed in each training forward",
        ("old", "current"),
    )
    reuse_entropy: bool = opt(
        True,
        "entropy_source=current: until the update's first optimizer step the weights are those that scored "
        "the rollout (sampler or scoring pass), so the first mini-batch selects on those entropies instead "
        "of recomputing them over the full vocabulary in its forward (the same values up to float "
        "rounding; the per-micro-batch plans not with dropout active); false: every training forward "
        "recomputes them, as TRL and verl do",
    )
    across_ranks: bool = opt(
        True,
        "under torchrun, select over the same micro-batch (or the whole batch) of every rank together "
        "(TRL gathers every process's entropies before torch.quantile); false: each rank selects among "
        "its own tokens (the official verl fork)",
    )


@dataclass
class SamplingConfig:
    dynamic: bool = opt(True, "DAPO dynamic sampling: drop groups whose rewards are all equal and refill")
    max_rounds: int = opt(10, "most generation rounds per step when refilling", lo=1)
    overlong_filter: bool = opt(False, "mask truncated responses out of the loss")


@dataclass
class RewardConfig:
    fn: str | None = opt(
        None,
        "reward: a registered name (math, dapo, pick; forkrl.rewards.register_reward) or a user's "
        "'package.module:function', called as fn(prompts, completions, **row_fields), or model:PATH (a "
        "local sequence-classification reward model, the logit of its first label); several, comma-separated, "
        "are summed with reward.weights and each logged as reward/NAME; empty = math for data files, the "
        "task's grader else",
    )
    weights: str | None = opt(None, "comma-separated weights of the rewards in reward.fn (empty = 1 each)")
    isolate: bool = opt(
        True,
        "score in worker processes with a timeout enforced from outside (a hung or crashing "
        "verifier cannot stall training)",
    )
    timeout: float = opt(10.0, "seconds one completion's reward may take before it counts as 0", lo=0.001)
    workers: int = opt(0, "reward worker processes (0 = half the CPUs, at least 1)", lo=0)
    batch_size: int = opt(
        1,
        "rows per reward call in a worker: 1 = one completion per call (a timeout names the row); N > 1 "
        "calls the reward with N rows at once (a batched judge), re-scoring a failed batch row by row",
        lo=1,
    )
    on_error: str = opt(
        "default",
        "a reward that raises or returns NaN/inf: count it and give 0 (default), or stop the run (raise)",
        ("default", "raise"),
    )
    max_failed_calls: int = opt(
        3,
        "stop the run after this many reward calls in a row where every completion failed (timed out, "
        "crashed, raised, non-finite, skipped); 0 = never",
        lo=0,
    )
    worker_max_rows: int = opt(
        0, "replace a reward worker after it scored this many completions (0 = never)", lo=0
    )
    worker_max_rss_mb: float = opt(
        4096.0,
        "replace a reward worker after a completion that left it above this resident memory, MB (0 = no cap; Linux)",
        lo=0.0,
    )
    overlong_buffer: int = opt(
        0, "DAPO soft overlong punishment: length of the buffer before the budget (0 = off)", lo=0
    )
    overlong_factor: float = opt(1.0, "DAPO soft overlong punishment: penalty at the budget", lo=0.0)


@dataclass
class OptimConfig:
    lr: float = opt(2e-4, "AdamW learning rate", lo=0.0)
    weight_decay: float = opt(0.0, "AdamW weight decay", lo=0.0)
    # torch.optim.AdamW refuses betas outside [0, 1).
    beta1: float = opt(0.9, "AdamW beta1", lo=0.0, lt=1.0)
    beta2: float = opt(0.99, "AdamW beta2", lo=0.0, lt=1.0)
    warmup_steps: int = opt(5, "linear learning-rate warmup, in optimizer steps", lo=0)
    grad_clip: float = opt(1.0, "global gradient-norm clip (0 = off)", lo=0.0)
    mini_batches: int = opt(
        1, "optimizer steps per RL step (the batch is split into this many mini-batches)", lo=1
    )
    micro_batch_size: int = opt(
        64, "sequences per forward/backward (gradient accumulation inside a mini-batch)", lo=1
    )
    micro_batch_tokens: int = opt(
        0,
        "token budget of a micro-batch: the prompt + response tokens of its rows, as verl counts them "
        "(use_dynamic_bsz / ppo_max_token_len_per_gpu); 0 = fixed micro_batch_size rows. Long "
        "chain-of-thought runs need it",
        lo=0,
    )
    micro_batch_packing: str = opt(
        "in_order",
        "with micro_batch_tokens: in_order = consecutive rows while they fit (keeps groups together for "
        "model.share_prompt); balanced = verl's rearrange_micro_batches (ceil(tokens / budget) "
        "micro-batches, the most of any rank, balanced by Karmarkar-Karp, longest first), as the "
        "official fork runs",
        ("in_order", "balanced"),
    )


@dataclass
class TrainConfig:
    steps: int = opt(40, "RL steps", lo=0)
    seed: int = opt(0, "seed for data order, sampling and selection ties", lo=0)
    eval_every: int = opt(10, "evaluate every N steps (0 = only at start and end)", lo=0)
    eval_n: int = opt(500, "held-out problems per evaluation", lo=1)
    out_dir: str = opt("runs/forkrl", "run folder (metrics.jsonl, config.yaml, checkpoints/, final model)")
    dump_every: int = opt(
        0,
        "save the step's rollouts with per-token entropy, log-prob, selection, advantage, covariance (cov) "
        "and the tokens the loss mode acted on (acted) to rollouts/ every N steps, for `forkrl analyze` and "
        "the token view (0 = off)",
        lo=0,
    )
    save_every: int = opt(
        0, "write a checkpoint every N steps (0 = only at the end and on SIGINT/SIGTERM)", lo=0
    )
    keep_checkpoints: int = opt(2, "newest checkpoints kept", lo=1)
    max_skipped_steps: int = opt(
        5, "stop after this many optimizer steps in a row skipped for NaN/inf gradients", lo=1
    )
    progress: bool = opt(True, "live progress display")
    mmap_threshold_mib: float = opt(
        1.0,
        "glibc: allocations from this many MiB are mmapped and returned to the OS when freed, so a step's "
        "peak memory follows the tensors alive, not heap fragmentation (forkrl.training.memory; at Qwen3's "
        "vocabulary a step peaked at 8,872 instead of 3,287 MiB without it); 0 = glibc's adaptive default",
        lo=0.0,
    )
    update_mmap_threshold_mib: float = opt(
        0.0,
        "the same during the update's forward and backward; 0 = train.mmap_threshold_mib (lean); 32 serves "
        "the activations from the reused heap: SmolLM2's update 1.3-1.7x faster on CPU at a higher peak "
        "(bench/results/real-model-cpu.md)",
        lo=0.0,
    )
    threads: int = opt(
        1,
        "torch CPU threads (0 = torch's default); the tiny model's small matmuls gain little from more, and "
        "multithreaded small ops slow down badly on a busy machine",
        lo=0,
    )
    log_completions: int = opt(
        0,
        "with each train.dump_every dump, print this many completions (selected tokens in [brackets], "
        "reward, advantage, entropy) and append them to RUN_DIR/train.log; TRL's log_completions",
        lo=0,
    )
    tensorboard: bool = opt(
        True,
        "also write TensorBoard events to RUN_DIR/tb when tensorboard is installed (pip install "
        "'forkrl[tensorboard]')",
    )
    wandb: str | None = opt(
        None,
        "also log every metrics row to Weights & Biases (pip install 'forkrl[wandb]'): a project name, "
        "true (project forkrl), or null/false (off); the run is named after the run folder, its id is kept "
        "in RUN_DIR/wandb_id so a resumed run continues it; WANDB_MODE=offline and WANDB_DIR work as usual",
    )
    parallel: str = opt(
        "ddp",
        "with several processes (torchrun): `ddp` replicates the model and averages gradients; `fsdp` "
        "shards each decoder layer with FSDP2 (fully_shard)",
        ("ddp", "fsdp"),
    )
