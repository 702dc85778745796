"""One actor update per preset, by forkrl and by the preset's own implementation, on identical data.

Run in one process (``run_cases(SINGLE)``) or under torchrun (``python -m torch.distributed.run
--nproc_per_node 2 tests/train/preset_parity_worker.py OUT``: each rank trains on its contiguous block
of whole groups). For each case it records the averaged gradient that forkrl's ``update`` hands to the
optimizer and the gradient of the reference loss, computed from a plain HF forward:

* ``official``: ``tests/reference/official_ref.py`` (the verl fork's ``official_micro_batch_loss`` per
  micro-batch of each rank, ``scale = 1 / gradient_accumulation``, gradients averaged over ranks, as
  FSDP does);
* ``trl``: TRL's own ``GRPOTrainer.get_high_entropy_mask`` and ``GRPOTrainer._compute_loss`` on a
  stand-in trainer (``loss_type="dapo"``, ``steps_per_generation = gradient_accumulation``), whose
  accelerator gathers over the ranks with torch.distributed, gradients averaged over ranks (DDP);
* ``paper`` / ``ppo`` (actor): the equation, brute force: one sort of every rank's valid entropies,
  exact top-ceil(rho N), the clipped surrogate summed over the selected tokens and divided by every
  valid token of the batch.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from forkrl.config import load_config  # noqa: E402
from forkrl.models.loading import DEFAULT_MODEL, load_model_and_tokenizer  # noqa: E402
from forkrl.rollout.hf import generate  # noqa: E402
from forkrl.tasks.pick import get_task  # noqa: E402
from forkrl.training.components import settings_from  # noqa: E402
from forkrl.training.dist import DistEnv, Parallel, shard  # noqa: E402
from forkrl.training.rollouts import select_rows  # noqa: E402
from forkrl.training.step import select_and_train  # noqa: E402
from forkrl.training.update import group_advantages, score_rollout, update_layout  # noqa: E402
from tests.reference.official_ref import official_dynamic_micro_batches, official_micro_batch_loss  # noqa: E402
from tests.reference.trl_harness import FakeAccelerator, trl_loss, trl_trainer  # noqa: E402

G, PROMPTS, MAX_NEW, MICRO = 4, 4, 12, 2  # 16 rows; 2 ranks: 8 rows each, 4 micro-batches of 2
# (preset, KL coefficient, micro-batch token budget: 0 = MICRO rows; > 0 = the fork's use_dynamic_bsz)
CASES = [
    ("paper", 0.0, 0),
    ("official", 0.0, 0),
    ("official", 0.1, 0),
    ("official", 0.1, 40),
    ("trl", 0.0, 0),
    ("trl", 0.1, 0),
    ("ppo", 0.0, 0),
]


class GradRecorder(torch.optim.Optimizer):
    """Keeps the gradient of each step (after the loop averaged it over ranks) and changes nothing."""

    def __init__(self, params):
        super().__init__(params, {"lr": 0.0})
        self.grads: list[list[torch.Tensor]] = []

    def step(self, closure=None):
        self.grads.append([p.grad.detach().clone() for g in self.param_groups for p in g["params"]])


def _data(env: DistEnv):
    """The same rollout, rewards and perturbed old/ref log-probs on every rank; this rank's rows."""
    model, tok = load_model_and_tokenizer(DEFAULT_MODEL)
    prompts = [e.prompt for e in get_task("pick").examples("train", PROMPTS)]
    # hot sampling: distinct responses, so no two tokens tie in entropy (the fork's topk tie order is
    # unspecified and cannot be reproduced; forkrl keeps the earlier position)
    ro = generate(model, tok, prompts, n=G, temperature=2.0, max_new_tokens=MAX_NEW, generator_seed=0)
    g = torch.Generator().manual_seed(1)
    B, L = ro.response_ids.shape
    rewards = torch.rand(B, generator=g).round()
    old_noise = 0.3 * torch.randn(B, L, generator=g)  # ratios away from 1: the clips act
    ref_noise = 0.5 * torch.randn(B, L, generator=g)
    tok_adv = torch.randn(B, L, generator=g)  # ppo: token-level advantages (from a critic)
    groups = shard(PROMPTS, env)
    rows = torch.arange(groups.start * G, groups.stop * G)
    return model, select_rows(ro, rows), rewards[rows], old_noise[rows], ref_noise[rows], tok_adv[rows], B


def _hf_logp_entropy(model, ro, rows, temperature):
    """Log-probs and entropies of the response tokens from the model's plain forward (with grad)."""
    ids, attn = ro.input_ids[rows], ro.attention_mask[rows]
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits.float()
    P, L = ro.prompt_len, ro.response_ids.shape[1]
    z = logits[:, P - 1 : P - 1 + L] / temperature  # (b, L, V)
    logp_all = z.log_softmax(-1)
    logp = logp_all.gather(-1, ro.response_ids[rows][..., None]).squeeze(-1)
    entropy = torch.logsumexp(z, -1) - (z.softmax(-1) * z).sum(-1)
    return logp, entropy


def _average(grads: list[torch.Tensor], env: DistEnv) -> list[torch.Tensor]:
    if env.enabled:
        for t in grads:
            dist.all_reduce(t)
            t /= env.world
    return grads


def _trl_reference(model, ro, mask, adv, old_logp, ref_logp, beta, s, n_micro):
    fake = trl_trainer(
        top_entropy_quantile=s.selection.rho,
        beta=beta,
        epsilon_low=s.loss.eps_low,
        epsilon_high=s.loss.eps_high,
        model=model,
        current_gradient_accumulation_steps=n_micro,
        args=SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=n_micro),
    )
    n_items = fake.accelerator.reduce(mask.sum().float())  # every process's completion tokens
    P = ro.prompt_len
    for i in range(n_micro):
        rows = slice(i * MICRO, (i + 1) * MICRO)
        logp, entropy = _hf_logp_entropy(model, ro, rows, s.rollout.temperature)
        inputs = {
            "prompt_ids": ro.input_ids[rows, :P],
            "prompt_mask": ro.attention_mask[rows, :P],
            "completion_ids": ro.response_ids[rows],
            "completion_mask": mask[rows].long(),
            "advantages": adv[rows],
            "old_per_token_logps": old_logp[rows],
            "ref_per_token_logps": ref_logp[rows],
            "num_items_in_batch": n_items,
        }
        trl_loss(fake, logp, entropy, inputs).backward()


def _official_reference(model, ro, mask, adv, old_logp, ref_logp, kl_coef, s, n_micro, budget, env):
    """The fork's update_policy: fixed micro-batches with loss / gradient_accumulation, or with
    use_dynamic_bsz its rearrange_micro_batches (count all-reduced MAX) with loss * rows / mini rows."""
    B = ro.response_ids.shape[0]
    micros = [slice(i * MICRO, (i + 1) * MICRO) for i in range(n_micro)]
    scale = [1 / n_micro] * n_micro
    if budget:
        lengths = ro.attention_mask.sum(-1).tolist()
        count = -(-sum(lengths) // budget)
        others = int(FakeAccelerator().gather(torch.tensor([min(len(lengths), count)])).max())
        micros = [torch.tensor(p) for p in official_dynamic_micro_batches(lengths, budget, others)]
        scale = [len(p) / B for p in micros]
    for rows, sc in zip(micros, scale):
        logp, entropy = _hf_logp_entropy(model, ro, rows, s.rollout.temperature)
        loss = official_micro_batch_loss(
            logp,
            old_logp[rows],
            adv[rows][:, None].expand_as(logp),
            mask[rows].float(),
            entropy.detach(),
            ratio=s.selection.rho,
            clip_low=s.loss.eps_low,
            clip_high=s.loss.eps_high,
            clip_c=s.loss.dual_clip,
            kl_coef=kl_coef,
            ref_logp=ref_logp[rows] if kl_coef else None,
            kl_kind=s.loss.kl_estimator,
            scale=sc,
        )
        loss.backward()


def _paper_reference(model, ro, mask, adv, old_logp, s, env):
    """The equation on every rank's tokens: exact top-k of one sort, sum over selected / all valid."""
    logp, _ = _hf_logp_entropy(model, ro, slice(None), s.rollout.temperature)
    with torch.no_grad():
        _, entropy = _hf_logp_entropy(model, ro, slice(None), s.rollout.temperature)  # scoring-pass entropies
    gather = FakeAccelerator().gather
    ent_all = gather(torch.where(mask, entropy, -1.0).flatten())  # rank-major order, as forkrl's ties
    valid_all = gather(mask.flatten())
    n = int(valid_all.sum())
    k = math.ceil(s.selection.rho * n - 1e-9)
    order = sorted(range(len(ent_all)), key=lambda i: (-float(ent_all[i]), i))
    keep = [i for i in order if valid_all[i]][:k]
    sel_all = torch.zeros(len(ent_all), dtype=torch.bool)
    sel_all[keep] = True
    mine = sel_all.view(env.world, -1)[env.rank].view_as(mask)
    adv = adv if adv.dim() == 2 else adv[:, None].expand_as(logp)
    ratio = torch.exp((logp - old_logp).clamp(-20, 20))
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - s.loss.eps_low, 1 + s.loss.eps_high))
    if s.loss.dual_clip is not None:
        pg = torch.where(adv < 0, torch.minimum(pg, -adv * s.loss.dual_clip), pg)
    loss = torch.where(mine, pg, 0.0).sum() / n
    (loss * env.world).backward()  # averaged over ranks below: the gradient of the whole-batch loss


def run_case(preset: str, kl_coef: float, budget: int, env: DistEnv) -> dict:
    model, ro, rewards, old_noise, ref_noise, tok_adv, B = _data(env)
    n_micro = ro.response_ids.shape[0] // MICRO
    overrides = [
        f"preset={preset}",
        f"optim.micro_batch_size={MICRO}",
        "optim.grad_clip=0",
        "rollout.reuse_logprobs=false",
    ]
    if kl_coef:
        overrides.append(f"loss.kl_coef={kl_coef}")
    if budget:
        overrides.append(f"optim.micro_batch_tokens={budget}")
    s = settings_from(load_config(None, overrides), max_len=MAX_NEW)
    scored = score_rollout(model, None, ro, s, overlong_filter=False)
    scored.old_logp = scored.old_logp + old_noise
    scored.ref_logp = scored.old_logp + ref_noise if kl_coef else None
    mask = scored.loss_mask
    adv = tok_adv * mask if preset == "ppo" else group_advantages(rewards, G, s)
    params = [p for p in model.parameters() if p.requires_grad]

    opt = GradRecorder(params)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
    metrics, _, _ = select_and_train(
        model, opt, sched, scored, adv, s, generator=torch.Generator().manual_seed(0), par=Parallel(env)
    )
    ours = opt.grads[0]

    model.zero_grad(set_to_none=True)
    model.train()
    ref_logp = scored.ref_logp if kl_coef else torch.zeros_like(scored.old_logp)
    if preset == "official":
        _official_reference(model, ro, mask, adv, scored.old_logp, ref_logp, kl_coef, s, n_micro, budget, env)
    elif preset == "trl":
        _trl_reference(model, ro, mask, adv, scored.old_logp, ref_logp, kl_coef, s, n_micro)
    else:
        _paper_reference(model, ro, mask, adv, scored.old_logp, s, env)
    theirs = _average(
        [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params], env
    )
    return {
        "ours": ours,
        "theirs": theirs,
        "loss": metrics["loss"],
        "selected": metrics["selected_tokens"],
        "rows": B,
        "micro_batches": len(update_layout(scored, s, env)[0].micros),
    }


def run_cases(env: DistEnv) -> dict:
    torch.manual_seed(0)
    return {case: run_case(*case, env) for case in CASES}


if __name__ == "__main__":
    from forkrl.training.dist import init_distributed

    env = init_distributed(torch.device("cpu"))
    out = run_cases(env)
    if env.main:
        torch.save(out, sys.argv[1])
    dist.destroy_process_group()
