"""A lean decode step for Llama-family causal LMs (Llama, Qwen2, Qwen3, Mistral without sliding window).

`generate` spends most of a small model's decode step in the module machinery around the arithmetic:
module calls, keyword plumbing, mask construction, output dataclasses, and one intra-op thread
wake-up per tensor op. `LeanDecoder.step` computes the same function for one new token per row
with the model's own parameters and about half the tensor ops:

- Q, K and V come from one matmul (and gate and up from one) when the fused weights are small;
- Qwen3's q/k norms run as one RMSNorm over the q and k heads together;
- rotary embedding of the q and k heads together reads precomputed cos/sin tables (the model's own
  `rotary_emb` evaluated once); the attention scale is folded into the q weights;
- attention over the KV cache is a grouped matmul (no repeat of K/V) over transposed keys, the padding
  bias added in place.

It reads the parameters at each call (no copies, except the small fused weights, rebuilt per
`LeanDecoder`), so a decoder made for one `generate` call sees the weights of that call. The prompt
prefill still runs through the model's own forward; `begin` takes its KV cache over into buffers
with room for the whole response (keys transposed), and `step` appends one key and value per row.
`unsupported(model)` says why a model must take the plain path (anything else: subclasses or remote
code, hooks or replaced forwards, adapters, quantized or sharded weights, sliding windows, rope
scaling that depends on the length, custom attention functions, ...).
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SUPPORTED_TYPES = {
    "llama": "Llama",
    "qwen2": "Qwen2",
    "qwen3": "Qwen3",
    "mistral": "Mistral",
}  # class prefixes
STATIC_ROPE = (
    "default",
    "linear",
    "llama3",
    "yarn",
)  # cos/sin depend on the position only (not longrope, dynamic)
ATTENTION = (
    None,
    "eager",
    "sdpa",
    "flash_attention_2",
    "flash_attention_3",
    "flex_attention",
)  # same function
FUSE_MAX_BYTES = 64 << 20  # fuse Q/K/V and gate/up weights up to this many bytes in all
# The decode step's LM head on CPU in float32: (V, E) @ (E, A) and one transpose copy is faster than
# MKL's (A, E) @ (E, V) for a few rows at a large vocabulary and a wide model; measured by
# bench/decode_head.py (bench/results/decode-head-cpu.md), which also shows where it loses (bfloat16,
# narrow models, one row, small vocabularies). The shapes where it is used:
HEAD_T_ROWS = (2, 64)  # rows per step, inclusive
HEAD_T_MIN_HIDDEN = 512
HEAD_T_MIN_VOCAB = 32_000


def head_transposed(weight: Tensor, rows: int) -> bool:
    """Whether the decode step computes `rows` rows of logits as (weight @ x.T).T (see HEAD_T_*)."""
    V, E = weight.shape
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and HEAD_T_ROWS[0] <= rows <= HEAD_T_ROWS[1]
        and E >= HEAD_T_MIN_HIDDEN
        and V >= HEAD_T_MIN_VOCAB
    )


def rope_type(config) -> str:
    """The config's rotary scaling type ("default" without one)."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return params.get("rope_type", params.get("type", "default")) or "default"


def sliding_window(config) -> bool:
    """Whether any layer attends through a sliding window (Mistral's whenever it sets one)."""
    layer_types = getattr(config, "layer_types", None) or []
    window = getattr(config, "sliding_window", None)
    on = getattr(config, "use_sliding_window", False) or config.model_type == "mistral"
    return any(t != "full_attention" for t in layer_types) or bool(window and on)


def _classes(model_type: str) -> dict[str, type]:
    """transformers' own classes for `model_type` (the forward this step reproduces)."""
    mod = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    prefix = SUPPORTED_TYPES[model_type]
    return {
        part: getattr(mod, prefix + part)
        for part in ("ForCausalLM", "Model", "DecoderLayer", "Attention", "MLP", "RMSNorm")
    }


def _plain(m: nn.Module) -> bool:
    """No forward hooks and no replaced forward (FSDP, accelerate's offloading hooks, adapters, probes)."""
    return not (
        m._forward_hooks
        or m._forward_pre_hooks
        or getattr(m, "_forward_hooks_with_kwargs", None)
        or "forward" in m.__dict__
        or hasattr(m, "_hf_hook")
    )


def _global_hooks() -> bool:
    from torch.nn.modules import module

    return any(
        getattr(module, name, None)
        for name in (
            "_global_forward_hooks",
            "_global_forward_pre_hooks",
            "_global_forward_hooks_with_kwargs",
        )
    )


def unsupported(model) -> str | None:
    """Why `model` cannot use `LeanDecoder`, or None when it can.

    Only transformers' own Llama/Qwen2/Qwen3/Mistral classes pass (exact types: a subclass or remote
    code may change the forward), with plain `nn.Linear`/`nn.Embedding` weights, no hooks or
    replaced forwards anywhere, no sliding window, a position-only rope and a standard attention.
    """
    config = getattr(model, "config", None)
    body = getattr(model, "model", None)
    if config is None or body is None or not hasattr(body, "layers"):
        return f"{type(model).__name__} is not a Hugging Face *ForCausalLM with model.layers"
    if config.model_type not in SUPPORTED_TYPES:
        return f"model_type {config.model_type!r} is not one of {tuple(SUPPORTED_TYPES)}"
    cls = _classes(config.model_type)
    if type(model) is not cls["ForCausalLM"] or type(body) is not cls["Model"]:
        return f"{type(model).__name__} is not transformers' own {cls['ForCausalLM'].__name__}"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"hidden_act {config.hidden_act!r} (only silu)"
    if getattr(config, "_attn_implementation", None) not in ATTENTION:
        return f"attention implementation {config._attn_implementation!r}"
    if sliding_window(config):
        return "sliding-window attention"
    if rope_type(config) not in STATIC_ROPE:
        return f"rope type {rope_type(config)!r} changes with the sequence length"
    if type(model.lm_head) is not nn.Linear or model.lm_head.bias is not None:
        return "lm_head is not a plain bias-free nn.Linear"
    if type(body.embed_tokens) is not nn.Embedding:
        return "embed_tokens is not a plain nn.Embedding"
    modules: list[nn.Module] = [model, body, body.embed_tokens, body.norm, body.rotary_emb, model.lm_head]
    for i, layer in enumerate(body.layers):
        attn, mlp = layer.self_attn, layer.mlp
        if (type(layer), type(attn), type(mlp)) != (cls["DecoderLayer"], cls["Attention"], cls["MLP"]):
            return f"layer {i} is not built from transformers' own {config.model_type} classes"
        linears = [
            attn.q_proj,
            attn.k_proj,
            attn.v_proj,
            attn.o_proj,
            mlp.gate_proj,
            mlp.up_proj,
            mlp.down_proj,
        ]
        if any(type(m) is not nn.Linear for m in linears):
            return f"layer {i} has projections that are not plain nn.Linear (adapters or quantization)"
        norms = [layer.input_layernorm, layer.post_attention_layernorm]
        norms += [m for m in (getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)) if m is not None]
        if any(type(m) is not cls["RMSNorm"] for m in norms):
            return f"layer {i} has a norm that is not {cls['RMSNorm'].__name__}"
        modules += [layer, attn, mlp, *linears, *norms]
    if type(body.norm) is not cls["RMSNorm"]:
        return f"the final norm is not {cls['RMSNorm'].__name__}"
    if _global_hooks() or not all(_plain(m) for m in modules):
        return "forward hooks or replaced forwards (FSDP, offloading, adapters, probes)"
    if any(type(p) is not nn.Parameter and type(p) is not Tensor for p in model.parameters()):
        return "parameters are not plain tensors (sharded or quantized)"
    return None


def _rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Hugging Face's Llama-family RMSNorm over the last dimension: normalized in float32, cast back,
    then scaled by `weight` ((E,), or one row per head for q/k norms)."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        if weight.dim() == 1:
            return F.rms_norm(x, weight.shape, weight, eps)
        return F.rms_norm(x, (x.shape[-1],), None, eps) * weight
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


class LeanDecoder:
    """Decode steps (one new token per row) of a supported model, over a KV cache taken from the prefill.

    Usage: prefill the prompts with the model's forward into a `DynamicCache`, then `begin(cache,
    repeats, capacity)`, then `step(...)` per token, `select(rows)` when rows leave the batch.

    Args:
        model: a supported HF causal LM (see `unsupported`).
        max_position: positions 0..max_position-1 get precomputed rotary tables.
    """

    @classmethod
    def for_model(cls, model, max_position: int) -> LeanDecoder | None:
        """A decoder for `model`, or None when `unsupported(model)` (checked once)."""
        return None if unsupported(model) is not None else cls(model, max_position, checked=True)

    @torch.no_grad()
    def __init__(self, model, max_position: int, *, checked: bool = False):
        why = None if checked else unsupported(model)
        if why is not None:
            raise ValueError(f"LeanDecoder: {why}")
        body, config = model.model, model.config
        self.model = model
        self.layers = list(body.layers)
        attn0 = self.layers[0].self_attn
        self.head_dim = attn0.head_dim
        self.n_q = config.num_attention_heads
        self.n_kv = getattr(config, "num_key_value_heads", None) or self.n_q
        self.group = self.n_q // self.n_kv
        self.qk_norm = getattr(attn0, "q_norm", None) is not None
        w = model.lm_head.weight
        self.vocab, self.dtype = w.shape[0], w.dtype  # the logits' shape and dtype
        self._head_t: Tensor | None = None  # (V * A) buffer of the transposed head's product
        # cos/sin of every position, from the model's own rotary module (attention scaling included).
        pos = torch.arange(max_position, device=w.device)[None]
        cos, sin = body.rotary_emb(w.new_zeros(1, 1, self.head_dim), pos)
        cos, sin = cos[0], sin[0]  # (max_position, D), dtype of the model
        half = self.head_dim // 2
        # rotate_half(x) * sin == roll(x, half) * sin_signed (first half negated).
        sin = torch.cat([-sin[:, :half], sin[:, half:]], dim=-1)
        self.cos, self.sin = cos, sin
        fused_bytes = sum(
            p.numel() * p.element_size()
            for layer in self.layers
            for p in (
                layer.self_attn.q_proj.weight,
                layer.self_attn.k_proj.weight,
                layer.self_attn.v_proj.weight,
                layer.mlp.gate_proj.weight,
                layer.mlp.up_proj.weight,
            )
        )
        self.fused = fused_bytes <= FUSE_MAX_BYTES
        # The attention scale is folded into the queries: into the q-norm weight (Qwen3), else into
        # the fused q rows; only unfused models without q-norm scale the scores.
        scale = attn0.scaling
        self.score_scale = None if (self.qk_norm or self.fused) else scale
        self._qkv: list[tuple[Tensor, Tensor | None]] = []
        self._gate_up: list[tuple[Tensor, Tensor | None]] = []
        # Under torch.autocast (model.compute_dtype) the fused weights are cast once here: autocast
        # caches its casts of parameters only, and would recast these every step.
        cast = torch.get_autocast_dtype(w.device.type) if torch.is_autocast_enabled(w.device.type) else None
        if self.fused:
            for layer in self.layers:
                a, m = layer.self_attn, layer.mlp
                weight, bias = _cat_linear(a.q_proj, a.k_proj, a.v_proj)
                if not self.qk_norm:
                    weight[: self.n_q * self.head_dim] *= scale
                    if bias is not None:
                        bias[: self.n_q * self.head_dim] *= scale
                gate_up = _cat_linear(m.gate_proj, m.up_proj)
                if cast is not None:
                    weight, gate_up = weight.to(cast), (gate_up[0].to(cast), gate_up[1])
                self._qkv.append((weight, bias))
                self._gate_up.append(gate_up)
        if self.qk_norm:
            # One RMSNorm over the q heads and k heads together: one weight row per head.
            self._qk_w = [
                torch.cat(
                    [
                        layer.self_attn.q_norm.weight.expand(self.n_q, -1) * scale,
                        layer.self_attn.k_norm.weight.expand(self.n_kv, -1),
                    ]
                )
                for layer in self.layers
            ]

    def begin(self, cache, repeats: int, capacity: int) -> None:
        """Take over the prefill's KV cache (rows repeated `repeats` times), with room for `capacity` keys.

        Keys are kept transposed, (A, Hkv, D, capacity), so a step's query-key product is a plain
        row-major batched matmul; values as (A, Hkv, capacity, D).
        """
        self.keys_t, self.values, self.n = [], [], 0
        for layer in cache.layers:
            k, v = layer.keys, layer.values  # (B / repeats, Hkv, P, D)
            b, h, p, d = k.shape
            kt = k.new_empty(b * repeats, h, d, capacity)
            vb = v.new_empty(b * repeats, h, capacity, d)
            kt[..., :p] = k.transpose(-1, -2).repeat_interleave(repeats, 0)
            vb[:, :, :p] = v.repeat_interleave(repeats, 0)
            self.keys_t.append(kt)
            self.values.append(vb)
            self.n = p
        if self.n + 1 > capacity:
            raise ValueError(f"LeanDecoder: capacity {capacity} leaves no room past the {self.n} prompt keys")
        self.capacity = capacity

    def select(self, rows: Tensor) -> None:
        """Keep only `rows` of the cache (rows that are still decoding)."""
        self.keys_t = [kt[rows] for kt in self.keys_t]
        self.values = [vb[rows] for vb in self.values]

    @torch.no_grad()
    def step(self, tokens: Tensor, positions: Tensor, key_bias: Tensor, out: Tensor | None = None) -> Tensor:
        """Logits (A, V) of the next token after `tokens` (A,) at `positions` (A,).

        This step's keys and values are appended to the cache taken over by `begin` (rows in the
        same order as `tokens`). `key_bias` (A, S + 1) is 0 on the keys a row attends to and -inf on
        padding, for the S cached keys and the new one. With `out` (a contiguous (A, V) tensor of
        `self.dtype`) the logits are written there, the same values without a fresh (A, V) block.
        """
        A, D, Hq, Hkv, G = tokens.shape[0], self.head_dim, self.n_q, self.n_kv, self.group
        s = self.n
        if s >= self.capacity:
            raise RuntimeError(f"LeanDecoder: the cache is full ({self.capacity} keys)")
        x = F.embedding(tokens, self.model.model.embed_tokens.weight)  # (A, E)
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]  # (A, 1, D)
        bias = key_bias[:, None, None, :]  # (A, 1, 1, S+1)
        half = D // 2
        for i, layer in enumerate(self.layers):
            a, m = layer.self_attn, layer.mlp
            h = _rms_norm(x, layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon)
            if self.fused:
                qkv = F.linear(h, *self._qkv[i])  # (A, (Hq + 2 Hkv) D)
                qk, v = qkv[:, : (Hq + Hkv) * D].view(A, Hq + Hkv, D), qkv[:, (Hq + Hkv) * D :]
            else:
                q = F.linear(h, a.q_proj.weight, a.q_proj.bias)
                qk = torch.cat([q, F.linear(h, a.k_proj.weight, a.k_proj.bias)], -1).view(A, Hq + Hkv, D)
                v = F.linear(h, a.v_proj.weight, a.v_proj.bias)
            if self.qk_norm:
                qk = _rms_norm(qk, self._qk_w[i], a.q_norm.variance_epsilon)
            qk = qk * cos + qk.roll(half, -1) * sin  # rotary embedding of q and k heads together
            kt, vb = self.keys_t[i], self.values[i]
            kt[..., s] = qk[:, Hq:]
            vb[:, :, s] = v.view(A, Hkv, D)
            scores = torch.matmul(qk[:, :Hq].view(A, Hkv, G, D), kt[..., : s + 1])  # (A, Hkv, G, S+1)
            if self.score_scale is not None:
                scores.mul_(self.score_scale)
            probs = (
                scores.add_(bias).softmax(-1, dtype=torch.float32).to(vb.dtype)
            )  # float32 softmax, as sdpa
            o = torch.matmul(probs, vb[:, :, : s + 1]).view(A, Hq * D)
            x = x + F.linear(o, a.o_proj.weight, a.o_proj.bias)
            h = _rms_norm(
                x, layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon
            )
            if self.fused:
                gate, up = F.linear(h, *self._gate_up[i]).chunk(2, dim=-1)
            else:
                gate = F.linear(h, m.gate_proj.weight, m.gate_proj.bias)
                up = F.linear(h, m.up_proj.weight, m.up_proj.bias)
            x = x + F.linear(F.silu(gate) * up, m.down_proj.weight, m.down_proj.bias)
        self.n = s + 1
        norm = self.model.model.norm
        x = _rms_norm(x, norm.weight, norm.variance_epsilon)
        w = self.model.lm_head.weight
        with torch.autocast(w.device.type, enabled=False):  # the head in the weights' dtype, always
            return self._head(x.to(w.dtype), w, A, out)

    def _head(self, x: Tensor, w: Tensor, A: int, out: Tensor | None) -> Tensor:
        if head_transposed(w, A):
            if self._head_t is None or self._head_t.numel() < w.shape[0] * A:
                self._head_t = w.new_empty(w.shape[0] * A)
            logits_t = torch.mm(w, x.t(), out=self._head_t[: w.shape[0] * A].view(w.shape[0], A))  # (V, A)
            return logits_t.t().contiguous() if out is None else out.copy_(logits_t.t())
        if out is None:
            return F.linear(x, w)  # (A, V)
        return torch.mm(x, w.t(), out=out)  # the same kernel as F.linear


def _cat_linear(*linears: nn.Linear) -> tuple[Tensor, Tensor | None]:
    """The weight (and bias) of the linears stacked along the output dimension."""
    weight = torch.cat([lin.weight for lin in linears]).detach()
    if all(lin.bias is None for lin in linears):
        return weight, None
    bias = torch.cat(
        [lin.bias if lin.bias is not None else lin.weight.new_zeros(lin.out_features) for lin in linears]
    ).detach()
    return weight, bias
