"""Fresh responses for analysis: sample, record per-token entropy, log-prob, top-k alternatives, select.

`generate_dump` samples with forkrl's decode loop (`forkrl.rollout.hf.generate`); the entropy and
log-prob of each token are the sampler's, H = -Σ p ln p with p = softmax(z / T) as in the paper. The
top-k alternatives are recorded during sampling by `TopKRecorder`, a logits processor that returns
exactly the scores plain temperature sampling uses, so the samples are unchanged and no second forward
is needed. The top-rho flag is `select_tokens` over every valid token of the whole dump (the paper's
batch scope, exact count).
"""

from __future__ import annotations

import torch
from torch import Tensor

from forkrl.analysis.dump import Dump, read_dump
from forkrl.core.selection import select_tokens
from forkrl.rollout.hf import generate
from forkrl.training.dump import dump_rollout, token_strings


class TopKRecorder:
    """Logits processor for forkrl's `generate` that records the k most likely tokens at each step.

    It returns z / T, the very scores `generate` samples from without a processor, so a seeded run
    draws the same tokens with and without it.
    """

    def __init__(self, temperature: float, k: int):
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 to record alternatives; got {temperature}")
        self.temperature, self.k = temperature, k
        self.ids: list[Tensor] = []
        self.probs: list[Tensor] = []

    def __call__(self, input_ids: Tensor, logits: Tensor) -> Tensor:
        z = logits.float() / self.temperature  # (B, V)
        top = torch.softmax(z, dim=-1).topk(min(self.k, z.shape[-1]), dim=-1)
        self.ids.append(top.indices.cpu())
        self.probs.append(top.values.cpu())
        return z

    def stacked(self, L: int) -> tuple[Tensor, Tensor]:
        """(B, L, k) ids and probabilities of the first L recorded steps."""
        return torch.stack(self.ids[:L], dim=1), torch.stack(self.probs[:L], dim=1)


def _pad_rows(rows: list[Tensor], value) -> Tensor:
    L = max((r.shape[1] for r in rows), default=0)
    out = []
    for r in rows:
        pad_shape = (r.shape[0], L - r.shape[1], *r.shape[2:])
        out.append(torch.cat([r, torch.full(pad_shape, value, dtype=r.dtype)], dim=1))
    return torch.cat(out, dim=0)


@torch.no_grad()
def generate_dump(
    model,
    tokenizer,
    examples: list,
    out_path,
    *,
    n: int = 4,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 64,
    rho: float = 0.2,
    top_k: int = 5,
    seed: int = 0,
    batch_size: int = 64,
    grade=None,
    meta: dict | None = None,
) -> Dump:
    """Sample `n` responses per example, write them to `out_path` with per-token H, log p, top-k and the
    top-rho flag, and return the `Dump` as read back. `grade(text, example) -> float` fills `reward`."""
    ids_parts, mask_parts, ent_parts, logp_parts, alt_ids, alt_probs = [], [], [], [], [], []
    texts, prompts, rewards = [], [], []
    per_call = max(1, batch_size // n)
    for start in range(0, len(examples), per_call):
        chunk = examples[start : start + per_call]
        rec = TopKRecorder(temperature, top_k) if top_k > 0 else None
        ro = generate(
            model,
            tokenizer,
            [e.prompt for e in chunk],
            n=n,
            temperature=temperature,
            top_p=top_p,
            max_new_tokens=max_new_tokens,
            generator_seed=seed + start,
            logits_processor=rec,
        )
        L = ro.response_ids.shape[1]
        ids_parts.append(ro.response_ids.cpu())
        mask_parts.append(ro.response_mask.cpu())
        ent_parts.append(ro.sampler_entropy.cpu())
        logp_parts.append(ro.sampler_logp.cpu())
        if rec is not None:
            a_ids, a_probs = rec.stacked(L) if L else (torch.zeros(ro.response_ids.shape[0], 0, top_k),) * 2
            alt_ids.append(a_ids.long())
            alt_probs.append(a_probs.float())
        texts += ro.texts
        rows = [e for e in chunk for _ in range(n)]
        prompts += [e.prompt for e in rows]
        if grade is not None:
            rewards += [float(grade(t, e)) for t, e in zip(ro.texts, rows)]
    response_ids = _pad_rows(ids_parts, tokenizer.pad_token_id)  # (B, L)
    loss_mask = _pad_rows(mask_parts, False)  # (B, L)
    entropy = _pad_rows(ent_parts, 0.0)  # (B, L)
    logp = _pad_rows(logp_parts, 0.0)  # (B, L)
    sel_mask = select_tokens(entropy, loss_mask, rho=rho)  # (B, L) batch scope over the whole dump
    top_tokens = top_probs = None
    if alt_ids:
        a_ids = _pad_rows(alt_ids, tokenizer.pad_token_id)  # (B, L, k)
        top_probs = _pad_rows(alt_probs, 0.0)  # (B, L, k)
        top_tokens = [
            [tokenizer.batch_decode([[i] for i in pos]) for pos, m in zip(row, mrow) if m]
            for row, mrow in zip(a_ids.tolist(), loss_mask.tolist())
        ]
    info = {"temperature": temperature, "top_p": top_p, "rho": rho, "n": n, "seed": seed, "top_k": top_k}
    info.update(meta or {})
    dump_rollout(
        out_path,
        tokens=token_strings(tokenizer, response_ids, loss_mask),
        token_ids=response_ids,
        entropy=entropy,
        logp=logp,
        sel_mask=sel_mask,
        loss_mask=loss_mask,
        rewards=torch.tensor(rewards) if grade is not None else None,
        prompts=prompts,
        texts=texts,
        top_tokens=top_tokens,
        top_probs=top_probs,
        meta=info,
    )
    return read_dump(out_path)
