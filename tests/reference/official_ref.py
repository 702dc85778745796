"""Slow, obviously-correct pure-torch transcriptions of the official "Beyond the 80/20 Rule" code.

Source read (Wang et al. 2025, arXiv 2506.01939), a fork of verl 0.7.0.dev:
  repo   github.com/Shenzhi-Wang/Beyond-the-80-20-Rule-RLVR
  commit 6f5dda6f70dbee207bea28705e5f96ce12eb98df (HEAD; last code change 137d8d1e253c355d4cf86b8bb2dded5aa0d93580,
         "[fix] fix bug for entropy_top_ratio and flat_mask"; the fork starts from upstream verl commit
         6cf90ceb079bdc0721b51c23e0107410651ccd82, "[BREAKING][misc] feat: Abstract optimizer (#3656)")
  files  verl/trainer/ppo/core_algos.py   get_global_entropy_top_mask, agg_loss, compute_policy_loss_vanilla,
                                          kl_penalty / kl_penalty_forward, compute_grpo_outcome_advantage
         verl/workers/actor/dp_actor.py   DataParallelPPOActor.update_policy / _forward_micro_batch
         verl/utils/seqlen_balancing.py   karmarkar_karp, get_seqlen_balanced_partitions, rearrange_micro_batches
         verl/utils/torch_functional.py   masked_sum, masked_mean, entropy_from_logits
         verl/workers/fsdp_workers.py     ppo_mini_batch_size normalisation
         recipe/rlvr_with_high_entropy_tokens_only/run_only_top20_high_entropy_tokens_dapo_qwen3_14b.sh

The entropy mask is computed per micro-batch, per data-parallel rank, from the current (grad-carrying,
temperature-divided) forward pass, and only enters the policy-gradient term: KL loss, entropy loss and the
pg_clipfrac / ppo_kl metrics all use the full response_mask.
"""

from __future__ import annotations

import heapq

import torch


def official_k(n_valid: int, ratio: float) -> int:
    """`top_k = max(1, int(len(response_entropy) * top_ratio + 0.9999)) # ceil`.

    n_valid == 0 returns 0 here: upstream returns an all-zero mask before computing k
    (`if response_entropy.numel() == 0: return torch.zeros_like(entropy, dtype=torch.long)`).
    Not an exact ceil: a fractional part below 1e-4 rounds down (n*ratio = 3.00005 -> 3).
    """
    if n_valid == 0:
        return 0
    return max(1, int(n_valid * ratio + 0.9999))


def official_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """`logits.div_(temperature)` then `torch.logsumexp(logits, dim=-1) - torch.sum(pd * logits, dim=-1)`."""
    z = logits / temperature
    return torch.logsumexp(z, dim=-1) - torch.sum(torch.softmax(z, dim=-1) * z, dim=-1)


def official_entropy_top_mask(
    entropy: torch.Tensor, response_mask: torch.Tensor, ratio: float
) -> torch.Tensor:
    """get_global_entropy_top_mask on one micro-batch of one rank (upstream returns a long 0/1 mask).

    `flat_mask = response_mask.flatten().bool()`; `response_entropy = flat_entropy[flat_mask]`;
    `_, topk_idx = torch.topk(response_entropy, k=top_k)`; `top_positions = response_positions[topk_idx]`.
    Ties at the k-th value: which tied tokens torch.topk keeps is unspecified (exactly k are kept).
    """
    flat_entropy = entropy.flatten()
    flat_mask = response_mask.flatten().bool()
    response_entropy = flat_entropy[flat_mask]
    out = torch.zeros(flat_entropy.shape, dtype=torch.bool, device=entropy.device)
    k = official_k(response_entropy.numel(), ratio)
    if k == 0:
        return out.view_as(entropy)
    _, topk_idx = torch.topk(response_entropy, k=k)
    out[flat_mask.nonzero(as_tuple=False).squeeze(1)[topk_idx]] = True
    return out.view_as(entropy)


def official_kl(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str) -> torch.Tensor:
    """kl_penalty_forward. "k3": `kl = ref_logprob - logprob; kl = torch.clamp(kl, min=-20, max=20);`
    `ratio = torch.exp(kl); kld = (ratio - kl - 1).contiguous(); return torch.clamp(kld, min=-10, max=10)`.

    The "+" straight-through kinds ("k3+", ...) raise NotImplementedError in this version: kl_penalty passes
    the unstripped name to kl_penalty_forward, which matches none of its branches.
    """
    if kind in ("kl", "k1"):
        return logp - ref_logp
    if kind == "abs":
        return (logp - ref_logp).abs()
    if kind in ("mse", "k2"):
        return 0.5 * (logp - ref_logp).square()
    if kind in ("low_var_kl", "k3"):
        kl = torch.clamp(ref_logp - logp, min=-20, max=20)
        return torch.clamp(torch.exp(kl) - kl - 1, min=-10, max=10)
    raise NotImplementedError(kind)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """verl_F.masked_mean: `(torch.where(mask.bool(), values, 0.0) * mask).sum() / (mask.sum() + 1e-8)`."""
    return (torch.where(mask.bool(), values, 0.0) * mask).sum() / (mask.sum() + 1e-8)


def official_agg_loss(loss_mat: torch.Tensor, loss_mask: torch.Tensor, mode: str) -> torch.Tensor:
    """agg_loss. "token-mean": `verl_F.masked_mean(loss_mat, loss_mask)` over the whole micro-batch.

    "seq-mean-token-mean": `torch.sum(loss_mat * loss_mask, dim=-1) / torch.sum(loss_mask, dim=-1)` has no
    epsilon, so a row with an empty mask (e.g. no top-entropy token) makes the loss NaN.
    "seq-mean-token-sum-norm": `torch.sum(seq_losses) / loss_mask.shape[-1]` (the padded width).
    """
    if mode == "token-mean":
        return _masked_mean(loss_mat, loss_mask)
    seq_sums = torch.sum(loss_mat * loss_mask, dim=-1)
    if mode == "seq-mean-token-sum":
        return torch.mean(seq_sums)
    if mode == "seq-mean-token-mean":
        return torch.mean(seq_sums / torch.sum(loss_mask, dim=-1))
    if mode == "seq-mean-token-sum-norm":
        return torch.sum(seq_sums) / loss_mask.shape[-1]
    raise ValueError(f"Invalid loss_agg_mode: {mode}")


def official_policy_loss(
    old_logp,
    logp,
    adv,
    response_mask,
    clip_low,
    clip_high,
    clip_c,
    agg_mode="token-mean",
    entropy_top_mask=None,
):
    """compute_policy_loss_vanilla -> (pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower).

    `negative_approx_kl = torch.clamp(log_prob - old_log_prob, min=-20.0, max=20.0)`; metrics use the full
    response_mask; only `agg_loss(..., loss_mask=response_mask * entropy_top_mask, ...)` sees the entropy mask.
    """
    assert clip_c > 1.0
    neg_kl = torch.clamp(logp - old_logp, min=-20.0, max=20.0)
    ratio = torch.exp(neg_kl)
    ppo_kl = _masked_mean(-neg_kl, response_mask)
    pg_losses1 = -adv * ratio
    pg_losses2 = -adv * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
    pg_clipfrac = _masked_mean(torch.gt(pg_losses2, pg_losses1).float(), response_mask)
    pg_losses3 = -adv * clip_c
    clip_pg_losses2 = torch.min(pg_losses3, clip_pg_losses1)
    pg_clipfrac_lower = _masked_mean(torch.gt(clip_pg_losses1, pg_losses3) * (adv < 0).float(), response_mask)
    pg_losses = torch.where(adv < 0, clip_pg_losses2, clip_pg_losses1)
    mask = response_mask if entropy_top_mask is None else response_mask * entropy_top_mask
    pg_loss = official_agg_loss(pg_losses, mask, agg_mode)
    return pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower


def official_micro_batch_loss(
    logp,
    old_logp,
    adv,
    response_mask,
    entropy,
    *,
    ratio,
    clip_low,
    clip_high,
    clip_c,
    kl_coef=0.0,
    ref_logp=None,
    kl_kind="low_var_kl",
    scale,
    agg_mode="token-mean",
    entropy_coeff=0.0,
):
    """The tensor update_policy backwards for one micro-batch (`loss = policy_loss * loss_scale_factor`).

    ratio=None means entropy_top_ratio unset (no mask). ref_logp given means use_kl_loss=True.
    scale: `loss_scale_factor = response_mask.shape[0] / self.config.ppo_mini_batch_size` under
    use_dynamic_bsz (ppo_mini_batch_size is per rank, in sequences), else `1 / self.gradient_accumulation`.
    `entropy_loss = agg_loss(loss_mat=entropy, loss_mask=response_mask, ...)`; `policy_loss = pg_loss -
    entropy_loss * entropy_coeff`; `kl_loss = agg_loss(loss_mat=kld, loss_mask=response_mask, ...)`;
    `policy_loss = policy_loss + kl_loss * self.config.kl_loss_coef`. (If there is one mini-batch and
    ppo_epochs == 1, upstream replaces old_logp by logp.detach(); pass that in yourself.)
    """
    top = None if ratio is None else official_entropy_top_mask(entropy, response_mask, ratio).long()
    pg_loss, *_ = official_policy_loss(
        old_logp, logp, adv, response_mask, clip_low, clip_high, clip_c, agg_mode, entropy_top_mask=top
    )
    policy_loss = pg_loss
    if entropy_coeff != 0:
        policy_loss = pg_loss - official_agg_loss(entropy, response_mask, agg_mode) * entropy_coeff
    if ref_logp is not None:
        kl_loss = official_agg_loss(official_kl(logp, ref_logp, kl_kind), response_mask, agg_mode)
        policy_loss = policy_loss + kl_loss * kl_coef
    return policy_loss * scale


def official_mini_batch_size_per_rank(ppo_mini_batch_size: int, n: int, world_size: int, sp: int = 1) -> int:
    """fsdp_workers: `ppo_mini_batch_size *= rollout.n`; `ppo_mini_batch_size //= device_mesh.size() // sp`."""
    return ppo_mini_batch_size * n // (world_size // sp)


def _karmarkar_karp(seqlen_list: list[int], k: int) -> list[list[int]]:
    """seqlen_balancing.karmarkar_karp(equal_size=False), same heap order and tie-breaks."""

    class Set:
        def __init__(self):
            self.sum, self.items = 0, []

        def __lt__(self, other):
            if self.sum != other.sum:
                return self.sum < other.sum
            if len(self.items) != len(other.items):
                return len(self.items) < len(other.items)
            return self.items < other.items

    class State:
        def __init__(self, idx: int, seqlen: int):
            self.sets = [Set() for _ in range(k)]
            self.sets[0].items.append((idx, seqlen))
            self.sets[0].sum += seqlen
            self.sets = sorted(self.sets, reverse=True)

        def merge(self, other):
            for i in range(k):
                for idx, val in other.sets[k - 1 - i].items:
                    self.sets[i].items.append((idx, val))
                    self.sets[i].sum += val
            self.sets = sorted(self.sets, reverse=True)

        def spread(self):
            return self.sets[0].sum - self.sets[-1].sum

        def __lt__(self, other):
            if self.spread() != other.spread():
                return self.spread() > other.spread()
            return self.sets[0] > other.sets[0]

    pq: list[State] = []
    for seqlen, idx in sorted((s, i) for i, s in enumerate(seqlen_list)):
        heapq.heappush(pq, State(idx, seqlen))
    while len(pq) > 1:
        s0, s1 = heapq.heappop(pq), heapq.heappop(pq)
        s0.merge(s1)
        heapq.heappush(pq, s0)
    return [[idx for idx, _ in s.items] for s in pq[0].sets]


def official_dynamic_micro_batches(
    seq_lens: list[int], max_token_len: int, num_micro_batches_other_ranks: int = 0
) -> list[list[int]]:
    """rearrange_micro_batches(use_dynamic_bsz_balance=True) as prepare_dynamic_batch calls it in update_policy.

    seq_lens are `attention_mask.sum(dim=1)` (prompt + response). max_token_len =
    `ppo_max_token_len_per_gpu * ulysses_sequence_parallel_size`. Upstream asserts max_token_len >= the padded
    width `attention_mask.shape[-1]`; here only against max(seq_lens).
    `num_micro_batches = min(len(seq_len_effective), ceildiv(total_seqlen, max_token_len))`, then
    `dist.all_reduce(num_micro_batches, op=dist.ReduceOp.MAX)` over all ranks: pass the other ranks' max as
    num_micro_batches_other_ranks. Partitions are index-sorted, then ordered by
    `(sum(seq_len ** 2), min(partition))`, `reverse=True` -- the order in which micro-batches are run.
    """
    assert max_token_len >= max(seq_lens)
    n = max(min(len(seq_lens), -(sum(seq_lens) // -max_token_len)), num_micro_batches_other_ranks)
    assert n <= len(seq_lens)
    parts = [sorted(p) for p in _karmarkar_karp(seq_lens, n)]
    assert all(parts) and sorted(i for p in parts for i in p) == list(range(len(seq_lens)))
    parts.sort(key=lambda p: (sum(seq_lens[i] ** 2 for i in p), min(p)), reverse=True)
    return parts


def official_grpo_advantage(scores: torch.Tensor, index: list, epsilon: float = 1e-6) -> torch.Tensor:
    """compute_grpo_outcome_advantage (norm_adv_by_std_in_grpo=True), per sequence, before `* response_mask`:
    singleton group -> mean 0, std 1; else `torch.mean`, `torch.std` (unbiased);
    `scores[i] = (scores[i] - id2mean[index[i]]) / (id2std[index[i]] + epsilon)`.
    """
    groups: dict = {}
    for i, key in enumerate(index):
        groups.setdefault(key, []).append(scores[i])
    stats = {}
    for key, vals in groups.items():
        t = torch.stack(vals)
        stats[key] = (torch.tensor(0.0), torch.tensor(1.0)) if len(vals) == 1 else (t.mean(), t.std())
    out = scores.clone()
    for i, key in enumerate(index):
        out[i] = (out[i] - stats[key][0]) / (stats[key][1] + epsilon)
    return out


if __name__ == "__main__":
    assert [official_k(n, 0.2) for n in (0, 1, 4, 5, 6, 10, 11)] == [0, 1, 1, 1, 2, 2, 3]
    assert official_k(7, 0.0) == 1 and official_k(7, 1.0) == 7
    ent = torch.tensor([[0.5, 2.0, 1.0, 9.0], [3.0, 0.1, 4.0, 0.0]])
    rmask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    top = official_entropy_top_mask(ent, rmask, 0.3)  # 7 valid -> k = 3: {4.0, 3.0, 2.0}; 9.0 is masked out
    assert top.tolist() == [[False, True, False, False], [True, False, True, False]]
    assert not official_entropy_top_mask(ent, torch.zeros_like(rmask), 0.2).any()
    a, b = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    assert torch.allclose(official_kl(a, b, "k3"), torch.tensor([0.1065, 0.7183]), atol=1e-4)
    assert torch.allclose(official_kl(a, b, "k2"), torch.tensor([0.125, 0.5]))
    m = rmask.float()
    x = torch.arange(8.0).view(2, 4)
    assert torch.isclose(official_agg_loss(x, m, "token-mean"), torch.tensor(25.0 / 7))
    assert torch.isclose(official_agg_loss(x, m, "seq-mean-token-sum"), torch.tensor(12.5))
    assert torch.isclose(official_agg_loss(x, m, "seq-mean-token-mean"), torch.tensor(3.25))
    assert torch.isclose(official_agg_loss(x, m, "seq-mean-token-sum-norm"), torch.tensor(6.25))
    adv = torch.tensor([[1.0] * 4, [-1.0] * 4])
    lp = torch.zeros(2, 4)
    pg, cf, kl, cfl = official_policy_loss(lp, lp + 0.5, adv, m, 0.2, 0.28, 10.0)
    assert torch.isclose(pg, (3 * -1.28 + 4 * torch.exp(torch.tensor(0.5))) / 7, atol=1e-6)
    assert torch.isclose(cf, torch.tensor(3 / 7)) and torch.isclose(kl, torch.tensor(-0.5)) and cfl == 0
    loss = official_micro_batch_loss(
        lp,
        lp,
        adv,
        m,
        ent,
        ratio=0.3,
        clip_low=0.2,
        clip_high=0.28,
        clip_c=10.0,
        scale=0.5,
        ref_logp=lp,
        kl_coef=0.1,
    )
    assert torch.isclose(loss, torch.tensor(0.5 * (-1 + 1 + 1) / 3))
    parts = official_dynamic_micro_batches([10, 3, 7, 5, 2, 8], max_token_len=12)
    assert len(parts) == 3 and sorted(i for p in parts for i in p) == list(range(6))
    print("partitions", parts, [sum([10, 3, 7, 5, 2, 8][i] for i in p) for p in parts])
    g = official_grpo_advantage(torch.tensor([1.0, 0.0, 1.0, 0.5]), [0, 0, 0, 1])
    assert torch.allclose(g, torch.tensor([0.57735, -1.1547, 0.57735, 0.5]), atol=1e-4)  # singleton: raw
    print("official_ref self-check ok")
