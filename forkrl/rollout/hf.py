"""Rollouts with a Hugging Face causal LM: batched sampling with a KV cache (`model.generate`)."""

from __future__ import annotations

import contextlib
import functools
import inspect
from types import SimpleNamespace

import torch
from torch import Tensor
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from forkrl.models.lora import unwrap
from forkrl.rollout.base import Rollout, assemble_rollout
from forkrl.rollout.lean import LeanDecoder

SMALL_MODEL_PARAMS = 2_000_000  # below this, decoding on CPU is fastest with one thread


def decode_threads(model, setting: int, train_threads: int) -> int:
    """Torch CPU threads for generation: `setting`, or for 0 (auto) 1 for small models, else `train_threads`.

    A small model's decode step is a few hundred tiny ops whose cost is dispatch and, with more
    threads, waking and joining them; from a few million parameters the matmuls dominate and threads
    pay (`bench/decode.py` measures both).
    """
    if setting:
        return setting
    if sum(p.numel() for p in model.parameters()) < SMALL_MODEL_PARAMS:
        return 1
    return train_threads or torch.get_num_threads()


_LEAN_DEFAULT = [True]  # what `generate(lean=None)` does; `lean_decoding` sets it for a block


@contextlib.contextmanager
def lean_decoding(enabled: bool):
    """`generate` calls in the block use the lean decode step or not (`rollout.lean_decode`)."""
    _LEAN_DEFAULT.append(bool(enabled))
    try:
        yield
    finally:
        _LEAN_DEFAULT.pop()


@contextlib.contextmanager
def torch_threads(n: int | None, device=None):
    """Run the block with `n` torch CPU threads (then restore); a no-op for None/0 or a non-CPU `device`."""
    old = torch.get_num_threads()
    if not n or n == old or (device is not None and torch.device(device).type != "cpu"):
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def cache_kwarg(module) -> str:
    """The forward's KV-cache argument: `cache` in newer transformers, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


class Scratch:
    """Buffers of (rows, V) reused by every step of one decode loop.

    Each decode step needs a few (rows, V) float tensors (scaled logits, log-probs, probabilities and
    their CDF, the lean step's logits). Allocating them fresh every step costs, at a 151,936-token
    vocabulary, either page faults (blocks above glibc's mmap threshold are mapped and unmapped each
    time; see `forkrl.training.memory`) or, under the adaptive threshold, heap holes that stay resident.
    A `Scratch` allocates each buffer once, at the batch's first row count, and hands out views of its
    first rows as rows leave the batch. The results are bit-equal to the allocating ops (the same
    kernels with `out=`; `tests/rollout/test_scratch.py`).
    """

    def __init__(self) -> None:
        self._bufs: dict[str, Tensor] = {}

    def get(self, name: str, rows: int, cols: int, dtype: torch.dtype, device) -> Tensor:
        """A contiguous (rows, cols) tensor, overwritten by the next `get` of the same `name`."""
        buf = self._bufs.get(name)
        if (
            buf is None
            or buf.shape[0] < rows
            or buf.shape[1] != cols
            or buf.dtype != dtype
            or buf.device != torch.device(device)
        ):
            buf = self._bufs[name] = torch.empty(rows, cols, dtype=dtype, device=device)
        return buf[:rows]


def _pick(
    logits: Tensor,
    *,
    temperature: float,
    top_p: float,
    greedy: bool,
    logits_processor,
    ids_so_far,
    u: Tensor | None = None,
    scratch: Scratch | None = None,
):
    """Next token, and log-prob and entropy of softmax(logits / T) (the policy, untruncated).

    Sampling inverts each row's CDF at its own uniform draw `u` (A,), so which rows are still in the
    batch never changes what a row samples. The (A, V) intermediates live in `scratch` (fresh
    buffers when None); the values are those of the plain ops.
    """
    scratch = scratch if scratch is not None else Scratch()
    A, V = logits.shape
    z = scratch.get("z", A, V, torch.float32, logits.device)
    if logits.dtype == torch.float32:
        torch.div(logits, temperature, out=z)
    else:
        z.copy_(logits).div_(temperature)  # = logits.float() / temperature
    logp_all = scratch.get("logp", A, V, torch.float32, logits.device)
    torch._log_softmax(z, -1, False, out=logp_all)
    p = scratch.get("p", A, V, torch.float32, logits.device)
    torch.exp(logp_all, out=p)
    entropy = -p.mul_(logp_all).sum(-1)  # (A,)
    if greedy:
        tok = z.argmax(-1)
    else:
        scores = z
        if logits_processor is not None:  # e.g. dual-temperature decoding; sees raw logits like generate()
            scores = logits_processor(ids_so_far, logits.float()) / 1.0
        if top_p < 1.0:
            scores = _top_p_filter(scores, top_p)
        cdf = torch._softmax(scores, -1, False, out=p).cumsum_(-1)  # (A, V)
        # right=True: the first token whose CDF exceeds the draw, so zero-probability tokens are never picked.
        tok = (
            torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)
            .squeeze(-1)
            .clamp_(max=cdf.shape[-1] - 1)
        )
    return tok, logp_all.gather(-1, tok[:, None]).squeeze(-1), entropy


class _ReservedLayer(DynamicLayer):
    """A `DynamicLayer` that appends into a preallocated buffer instead of concatenating.

    `DynamicLayer.update` copies the whole cache (`torch.cat`) at every decode step: quadratic in the
    length and, for small models, the largest single cost of decoding. This layer keeps `reserve` free
    slots past the prompt and exposes `keys`/`values` as views of the filled part, so a step writes one
    slot. Attention sees the same tensors (a view instead of a copy).
    """

    def __init__(self, reserve: int, **kwargs):
        super().__init__(**kwargs)
        self.reserve = reserve
        self._k = self._v = None  # (B, H, capacity, D) buffers
        self._n = 0  # filled slots

    def _expose(self) -> None:
        self.keys, self.values = self._k[..., : self._n, :], self._v[..., : self._n, :]

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.device, self.is_initialized = key_states.device, True
        n, t = self._n, key_states.shape[-2]
        if self._k is None or n + t > self._k.shape[-2]:  # first call, or the reserve is spent: grow
            cap = n + t + max(self.reserve, t)
            k = key_states.new_empty(*key_states.shape[:-2], cap, key_states.shape[-1])
            v = value_states.new_empty(*value_states.shape[:-2], cap, value_states.shape[-1])
            if n:
                k[..., :n, :], v[..., :n, :] = self._k[..., :n, :], self._v[..., :n, :]
            self._k, self._v = k, v
        self._k[..., n : n + t, :] = key_states
        self._v[..., n : n + t, :] = value_states
        self._n = n + t
        self._expose()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self._n

    def reset(self) -> None:
        self._k = self._v = None
        self._n = 0
        super().reset()

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove < 0 and self._n:
            self._n = max(0, self._n + tokens_to_remove)
            self._expose()

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self._n:
            self._k, self._v = self._k.repeat_interleave(repeats, 0), self._v.repeat_interleave(repeats, 0)
            self._expose()

    def batch_select_indices(self, indices: Tensor) -> None:
        if self._n:
            self._k, self._v = self._k[indices], self._v[indices]
            self._expose()


def decode_cache(reserve: int):
    """A `DynamicCache` whose layers reserve room for `reserve` more tokens (see `_ReservedLayer`)."""
    cache = DynamicCache()
    if getattr(cache, "layer_class_to_replicate", None) is DynamicLayer and not cache.layers:
        cache.layer_class_to_replicate = functools.partial(_ReservedLayer, reserve)
    return cache


def _top_p_filter(scores: Tensor, top_p: float) -> Tensor:
    """Nucleus filtering as transformers' TopPLogitsWarper: keep the smallest set with mass >= top_p."""
    sorted_scores, idx = scores.sort(dim=-1, descending=False)
    cum = sorted_scores.softmax(-1).cumsum(-1)
    remove_sorted = cum <= (1 - top_p)
    remove_sorted[..., -1] = False  # always keep the most likely token
    remove = remove_sorted.scatter(-1, idx, remove_sorted)
    return scores.masked_fill(remove, float("-inf"))


def _last_logits(model, **inputs):
    """The model's forward keeping the last position's logits, `.logits` (rows, 1, V).

    Under `torch.autocast` (model.compute_dtype) the body runs in the autocast dtype and the LM head
    in its weights' dtype, as in training (forkrl.core.lm_head.no_autocast); models whose head is not
    a plain linear layer run their whole forward under autocast.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    device = inputs["input_ids"].device.type
    plain = type(head) is torch.nn.Linear and getattr(model, "base_model_prefix", None)
    if not torch.is_autocast_enabled(device) or not plain:
        return model(**inputs, logits_to_keep=1)
    out = getattr(model, model.base_model_prefix)(**inputs)
    with torch.autocast(device, enabled=False):
        logits = head(out.last_hidden_state[:, -1:].to(head.weight.dtype))  # (rows, 1, V)
    return SimpleNamespace(logits=logits)


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[str],
    *,
    n: int = 1,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 64,
    greedy: bool = False,
    generator_seed: int | None = None,
    logits_processor=None,
    compact_every: int = 8,
    prompt_seeds: list[int] | None = None,
    lean: bool | None = None,
) -> Rollout:
    """Sample `n` completions per prompt with a KV cache, stopping rows at EOS.

    A plain decode loop over the model's forward (`past_key_values`, explicit position ids for the
    left-padded prompts) rather than `model.generate`: it is leaner per token for small models, and
    it returns the log-prob and entropy of every sampled token under softmax(logits / T), which
    are the scoring pass's values when the sampler and the trained policy are the same model.
    Pure temperature sampling over the full vocabulary unless `top_p` < 1.

    With `lean` (None: on, unless inside `lean_decoding(False)`), decode steps of Llama-family models
    run through `LeanDecoder`, the same function with less per-token overhead; other models, and
    `lean=False`, use the model's forward.
    """
    model = unwrap(model)  # a PEFT policy: the model inside, its adapters active
    if generator_seed is not None:
        torch.manual_seed(generator_seed)
    if prompt_seeds is not None and len(prompt_seeds) != len(prompts):
        raise ValueError(f"{len(prompt_seeds)} prompt seeds for {len(prompts)} prompts")
    # With a seed per prompt, a row's draws depend only on its prompt's seed, not on which other
    # prompts share the call: data-parallel ranks then sample exactly what one process would.
    gens = [torch.Generator().manual_seed(int(x)) for x in prompt_seeds] if prompt_seeds is not None else None
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    expanded = [p for p in prompts for _ in range(n)]
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    enc = tokenizer(expanded, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    prompt_ids, prompt_attn = enc["input_ids"], enc["attention_mask"]
    B, P = prompt_ids.shape
    was_training = model.training
    model.eval()
    pos = (prompt_attn.cumsum(-1) - 1).clamp(min=0)  # (B, P), as generate() builds them
    # The lean step needs a decode step to run (max_new_tokens > 1) and a model it reproduces exactly.
    lean = _LEAN_DEFAULT[-1] if lean is None else lean
    decoder = LeanDecoder.for_model(model, P + max_new_tokens) if lean and max_new_tokens > 1 else None
    cache = decode_cache(max_new_tokens) if decoder is None else DynamicCache()
    kw = cache_kwarg(model)
    # Prefill each distinct prompt once, then repeat its KV cache for its n samples.
    out = _last_logits(
        model,
        input_ids=prompt_ids[::n],
        attention_mask=prompt_attn[::n],
        position_ids=pos[::n],
        **{kw: cache},
        use_cache=True,
    )
    if decoder is not None:
        decoder.begin(cache, n, capacity=P + max_new_tokens)
        cache = None
        # 0 on the keys a row attends to, -inf on its prompt padding; one more 0 column per step.
        key_bias = out.logits.new_zeros(B, P + max_new_tokens).masked_fill_(
            torch.cat([prompt_attn, prompt_attn.new_ones(B, max_new_tokens)], 1) == 0, float("-inf")
        )
    elif n > 1:
        cache.batch_repeat_interleave(n)
    logits = out.logits[:, -1].repeat_interleave(n, dim=0)  # (B, V)
    next_pos = pos[:, -1:] + 1  # (B, 1)
    attn = prompt_attn
    # Rows leave the batch (and the KV cache) once they emit EOS, so later steps only run the rest.
    # With a logits processor every row stays (it sees the whole batch, like generate()'s processors).
    drop_finished = logits_processor is None
    active = torch.arange(B, device=device)  # row index of each cache entry
    done = torch.zeros(B, dtype=torch.bool, device=device)
    toks, logps, ents = [], [], []
    ids_so_far = prompt_ids
    scratch = Scratch()  # the loop's (rows, V) buffers, allocated once
    for _ in range(max_new_tokens):
        # One draw per row, whether or not the row is still active.
        u = (
            torch.cat([torch.rand(n, generator=g) for g in gens]).to(device)
            if gens
            else torch.rand(B, device=device)
        )
        u = u[active]
        tok_a, lp_a, ent_a = _pick(
            logits,
            temperature=temperature,
            top_p=top_p,
            greedy=greedy,
            logits_processor=logits_processor,
            ids_so_far=ids_so_far,
            u=u,
            scratch=scratch,
        )
        tok_a = tok_a.masked_fill(done[active], pad_id)
        tok = torch.full((B,), pad_id, dtype=tok_a.dtype, device=device).index_copy_(0, active, tok_a)
        toks.append(tok)
        logps.append(torch.zeros(B, device=device).index_copy_(0, active, lp_a))
        ents.append(torch.zeros(B, device=device).index_copy_(0, active, ent_a))
        done = done | (tok == eos_id)
        if bool(done.all()):
            break
        if logits_processor is not None:
            ids_so_far = torch.cat([ids_so_far, tok[:, None]], dim=1)
        finished = done[active]  # (A,)
        # Compacting copies the whole KV cache, so wait until it pays: at least 1/`compact_every` of
        # the rows still in the batch are finished (finished rows meanwhile decode padding, unused).
        if drop_finished and int(finished.sum()) * compact_every >= max(1, len(active)):
            keep = (~finished).nonzero().squeeze(1)  # (A',)
            active, attn, next_pos, tok_a = active[keep], attn[keep], next_pos[keep], tok_a[keep]
            if decoder is not None:
                decoder.select(keep)
                key_bias = key_bias[keep]
            else:
                cache.batch_select_indices(keep)
        if decoder is not None:
            logits = decoder.step(
                tok_a,
                next_pos[:, 0],
                key_bias[:, : decoder.n + 1],
                out=scratch.get("logits", len(active), decoder.vocab, decoder.dtype, device),
            )  # (A, V)
        else:
            attn = torch.cat([attn, torch.ones(len(active), 1, dtype=attn.dtype, device=device)], dim=1)
            out = _last_logits(
                model,
                input_ids=tok_a[:, None],
                attention_mask=attn,
                position_ids=next_pos,
                **{kw: cache},
                use_cache=True,
            )
            logits = out.logits[:, -1]  # (A, V)
        next_pos = next_pos + 1
    model.train(was_training)
    L = len(toks)
    if L:
        response = torch.stack(toks, dim=1)  # (B, L)
        sampler_logp = torch.stack(logps, dim=1)  # (B, L)
        sampler_entropy = torch.stack(ents, dim=1)  # (B, L)
    else:
        response = torch.zeros(B, 0, dtype=torch.long, device=device)
        sampler_logp = sampler_entropy = torch.zeros(B, 0, device=device)
    return assemble_rollout(
        tokenizer,
        prompt_ids,
        prompt_attn,
        response,
        eos_id=eos_id,
        pad_id=pad_id,
        group_size=n,
        sampler_logp=sampler_logp,
        sampler_entropy=sampler_entropy,
    )
