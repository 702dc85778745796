"""`train.dump_every` dumps the loss mode's tokens: `cov`, Cui et al.'s covariance, equals a slow
recomputation from the dump's own `adv`/`logp`/`sel`/`loss` columns, and `acted` is the top-k of it
(kl_cov) or the covariance band (clip_cov); modes that mark no token write no `acted`."""

import numpy as np
import pytest
import torch

from forkrl.analysis.dump import as_tensors, read_dump
from forkrl.analysis.view import render_view
from forkrl.core.archer import high_entropy_mask
from forkrl.core.loss_modes import ACTED, POLICY_LOSSES, LossMode
from forkrl.core.mode_tokens import mode_tokens
from tests.train.test_distributed import _overrides, _torchrun
from tests.train.test_smoke import _run


def _slow_cov(dump) -> list[list[float]]:
    """(A - mean A)(logp - mean logp) per selected valid token, the means over those tokens; 0 elsewhere."""
    toks = [
        (i, j)
        for i, r in enumerate(dump.rows)
        for j, (s, m) in enumerate(zip(r["sel"], r["loss"]))
        if s and m
    ]
    n = len(toks)
    mean_a = sum(dump.rows[i]["adv"] for i, _ in toks) / n
    mean_l = sum(dump.rows[i]["logp"][j] for i, j in toks) / n
    out = [[0.0] * len(r["tokens"]) for r in dump.rows]
    for i, j in toks:
        out[i][j] = (dump.rows[i]["adv"] - mean_a) * (dump.rows[i]["logp"][j] - mean_l)
    return out


def _flat(dump, key):
    return np.concatenate([np.asarray(r[key]) for r in dump.rows])


@pytest.mark.parametrize(
    "mode, extra",
    [("kl_cov", ["loss.cov_ratio=0.2"]), ("clip_cov", ["loss.clip_cov_lb=0.02", "loss.clip_cov_ub=5.0"])],
)
@pytest.mark.slow  # end to end, > 5 s
def test_dump_holds_the_modes_covariance_and_acted_tokens(tiny_model_dir, tmp_path, mode, extra):
    run_dir, _ = _run(
        tiny_model_dir,
        tmp_path,
        "train.steps=1",
        "train.dump_every=1",
        f"loss.mode={mode}",
        "selection.rho=0.5",
        *extra,
    )
    dump = read_dump(run_dir / "rollouts" / "step_000001.jsonl")
    assert dump.meta["loss_mode"] == mode and dump.meta["acted"] == ACTED[mode] and "cov" in dump.meta
    sel = _flat(dump, "sel").astype(bool) & _flat(dump, "loss").astype(bool)
    cov, acted = _flat(dump, "cov"), _flat(dump, "acted").astype(bool)
    want = np.concatenate([np.asarray(r) for r in _slow_cov(dump)])
    np.testing.assert_allclose(cov, want, rtol=1e-4, atol=1e-6)
    assert sel.sum() > 10 and np.abs(cov[sel]).max() > 0 and not acted[~sel].any()
    if mode == "kl_cov":  # the top-k of cov among the selected tokens, k = max(1, floor(0.2 N))
        k = max(1, int(0.2 * sel.sum()))
        assert acted.sum() == k
        assert cov[acted].min() >= cov[sel & ~acted].max()
    else:  # the band candidates: nothing is clipped at ratio 1
        assert np.array_equal(acted, sel & (cov > 0.02) & (cov < 5.0))
        assert 0 < acted.sum() < sel.sum()
    page = render_view(dump)  # the token view offers both
    assert '<select id="colour">' in page and 'id="markact"' in page


@pytest.mark.slow  # end to end, > 5 s
def test_archers_acted_tokens_are_its_high_entropy_tokens(tiny_model_dir, tmp_path):
    # a mode the dump code does not name: its parts["acted"], each row's selected tokens above the
    # row's 0.8 entropy quantile over them (forkrl.core.archer), from the dump's own entropy column
    overrides = ["train.steps=1", "train.dump_every=1", "loss.mode=archer", "selection.rho=0.5"]
    run_dir, _ = _run(tiny_model_dir, tmp_path, *overrides)
    dump = read_dump(run_dir / "rollouts" / "step_000001.jsonl")
    assert dump.meta["loss_mode"] == "archer" and dump.meta["acted"] == ACTED["archer"]
    ent, valid = as_tensors(dump, "entropy")
    sel, loss, acted = (as_tensors(dump, k)[0].bool() for k in ("sel", "loss", "acted"))
    want = high_entropy_mask(ent, sel & loss & valid, 0.8)
    assert want.any() and torch.equal(acted & valid, want)


@pytest.mark.slow  # end to end, > 5 s
def test_a_mode_without_acted_tokens_writes_cov_only(tiny_model_dir, tmp_path):
    run_dir, _ = _run(tiny_model_dir, tmp_path, "train.steps=1", "train.dump_every=1", "loss.mode=cispo")
    dump = read_dump(run_dir / "rollouts" / "step_000001.jsonl")
    assert "cov" in dump.rows[0] and "acted" not in dump.rows[0]
    assert dump.meta["loss_mode"] == "cispo" and dump.meta["acted"].startswith("none")


def test_mode_tokens_leaves_the_global_rng_alone_and_takes_a_modes_acted_mask():
    # 2 rows x 3 tokens; sel = the first two of each row; A = (+1, -1) per row
    old_logp = torch.tensor([[-0.5, -2.0, -1.0], [-0.1, -3.0, -1.0]])
    adv = torch.tensor([1.0, -1.0])
    loss = torch.ones(2, 3, dtype=torch.bool)
    sel = torch.tensor([[True, True, False], [True, True, False]])
    # means over sel: A 0, logp (-0.5 - 2 - 0.1 - 3) / 4 = -1.4; cov = A (logp + 1.4)
    want = torch.tensor([[0.9, -0.6, 0.0], [-1.3, 1.6, 0.0]])
    state = torch.get_rng_state()
    for name in ("kl_cov", "clip_cov", "clip"):
        cov, acted = mode_tokens(
            old_logp, adv, loss, sel, LossMode(name, cov_ratio=0.5), eps_low=0.2, eps_high=0.2
        )
        torch.testing.assert_close(cov, want)
        if name == "kl_cov":  # top-2 by cov
            assert acted.tolist() == [[True, False, False], [False, True, False]]
        elif name == "clip_cov":  # band (1, 5)
            assert acted.tolist() == [[False, False, False], [False, True, False]]
        else:
            assert acted is None
    assert torch.equal(torch.get_rng_state(), state)


def test_mode_tokens_takes_any_modes_acted_mask(monkeypatch):
    # a mode registered under a name mode_tokens does not know: its parts["acted"] is the column
    def marks_the_first_token(x, m):
        acted = torch.zeros_like(x.sel)
        acted[:, 0] = True
        return torch.zeros_like(x.logp), {"adv": x.adv, "acted": acted}, {}

    monkeypatch.setitem(POLICY_LOSSES, "first_token", marks_the_first_token)
    sel = torch.tensor([[True, True], [False, True]])
    cov, acted = mode_tokens(
        torch.zeros(2, 2),
        torch.ones(2),
        torch.ones(2, 2, dtype=torch.bool),
        sel,
        LossMode("first_token"),
        eps_low=0.2,
        eps_high=0.2,
    )
    assert acted.tolist() == [[True, False], [False, False]]  # cut to the selected tokens


@pytest.mark.slow  # torchrun: 2 processes
@pytest.mark.parametrize("prompts", [2, 1], ids=["a-group-each", "rank-1-idle"])
def test_two_ranks_dump_the_covariance_over_both(tmp_path, prompts):
    # loss.cov_across_ranks (the default): the means and the top-k span the ranks, so the two rank
    # files together are one batch; with one prompt rank 1 has no rows, joins the collectives, writes none
    out = tmp_path / "ranks"
    args = ["train.dump_every=1", "loss.mode=kl_cov", "loss.cov_ratio=0.2", "sampling.dynamic=false"]
    _torchrun(_overrides(out, 1, f"rollout.prompts_per_step={prompts}", *args), timeout=240)
    files = sorted(p.name for p in (out / "rollouts").iterdir())
    assert files == [f"step_000001.rank{r}.jsonl" for r in range(prompts)]
    dump = read_dump(out / "rollouts")  # both ranks' rows, rank 0 first
    assert len(dump.rows) == 4 * prompts and dump.meta["loss_mode"] == "kl_cov"
    sel = _flat(dump, "sel").astype(bool) & _flat(dump, "loss").astype(bool)
    cov, acted = _flat(dump, "cov"), _flat(dump, "acted").astype(bool)
    np.testing.assert_allclose(
        cov, np.concatenate([np.asarray(r) for r in _slow_cov(dump)]), rtol=1e-4, atol=1e-6
    )
    assert acted.sum() == max(1, int(0.2 * sel.sum())) and (prompts == 1 or np.abs(cov[sel]).max() > 0)
    assert cov[acted].min() >= cov[sel & ~acted].max()
