"""Dumps round-trip; entropy statistics equal a direct numpy computation; word clouds never overlap."""

import math
from collections import Counter

import numpy as np
import pytest
import torch

from forkrl.analysis.dump import read_dump
from forkrl.analysis.stats import dump_stats, entropy_percentiles, token_table, write_stats
from forkrl.analysis.wordcloud import layout_words
from forkrl.training.dump import dump_rollout


def _fake_dump(path, seed=0):
    """4 rows of lengths 10, 7, 3, 0 inside (4, 10) tensors; half the entropies are ~0 (paper-like)."""
    g = torch.Generator().manual_seed(seed)
    B, L = 4, 10
    lengths = [10, 7, 3, 0]
    entropy = torch.rand(B, L, generator=g) * 2
    entropy[torch.rand(B, L, generator=g) < 0.5] = 1e-4  # near-deterministic tokens
    loss = torch.arange(L)[None] < torch.tensor(lengths)[:, None]  # (B, L)
    loss[1, 6] = False  # e.g. masked by the overlong filter
    vocab = list("ab c\n") + ["<eos>", "so"]
    tokens = [[vocab[(i * 3 + j) % len(vocab)] for j in range(n)] for i, n in enumerate(lengths)]
    dump_rollout(
        path,
        tokens=tokens,
        entropy=entropy,
        logp=-entropy,
        sel_mask=loss & (entropy > 1.0),
        loss_mask=loss,
        adv=torch.tensor([1.0, -1.0, 0.5, 0.0]),
        step=7,
        meta={"rho": 0.2, "model": "fake"},
    )
    return tokens, entropy, loss


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_dump_round_trip(tmp_path, suffix):
    tokens, entropy, loss = _fake_dump(tmp_path / f"d{suffix}")
    d = read_dump(tmp_path / f"d{suffix}")
    assert d.meta == {"rho": 0.2, "model": "fake"}
    assert [r["tokens"] for r in d.rows] == tokens
    assert [r["step"] for r in d.rows] == [7] * 4 and d.rows[1]["adv"] == -1.0
    for i, r in enumerate(d.rows):
        n = len(tokens[i])
        np.testing.assert_allclose(r["entropy"], entropy[i, :n].numpy(), rtol=1e-6)
        assert r["loss"] == loss[i, :n].tolist()
    assert d.flat("entropy").shape == (20,)


def test_read_dump_folder_and_errors(tmp_path):
    _fake_dump(tmp_path / "run" / "step_000001.jsonl")
    _fake_dump(tmp_path / "run" / "step_000002.parquet", seed=1)
    assert len(read_dump(tmp_path / "run").rows) == 8
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_dump(tmp_path / "nope.parquet")
    with pytest.raises(ValueError, match="must end in .parquet or .jsonl"):
        _fake_dump(tmp_path / "d.csv")


def test_percentiles_equal_numpy():
    rng = np.random.default_rng(0)
    h = np.where(rng.random(10_001) < 0.5, rng.random(10_001) * 0.02, rng.exponential(0.8, 10_001))
    s = entropy_percentiles(h)
    assert s["n"] == 10_001
    assert s["frac_below_0.01"] == np.count_nonzero(h < 0.01) / h.size
    # The 80th percentile by hand: linear interpolation between order statistics at 0.8 (n - 1).
    srt = np.sort(h)
    pos = 0.8 * (h.size - 1)
    lo = int(np.floor(pos))
    assert s["p80"] == pytest.approx(srt[lo] + (pos - lo) * (srt[lo + 1] - srt[lo]), rel=1e-12)
    for q in (1, 50, 99):
        assert s[f"p{q}"] == pytest.approx(np.percentile(h, q), rel=1e-12)
    assert s["mean"] == pytest.approx(h.mean()) and s["max"] == h.max()


def test_dump_stats_use_only_loss_tokens(tmp_path):
    tokens, entropy, loss = _fake_dump(tmp_path / "d.parquet")
    stats = dump_stats(read_dump(tmp_path / "d.parquet"), rho=0.2, top=50)
    h = entropy[loss].double().numpy()  # 19 valid tokens
    assert stats["percentiles"]["n"] == 19
    assert stats["percentiles"]["frac_below_0.01"] == pytest.approx(np.mean(h < 0.01))
    assert stats["percentiles"]["p80"] == pytest.approx(np.percentile(h, 80), rel=1e-6)
    # Top 20% of 19 tokens: k = ceil(3.8) = 4, the 4 largest valid entropies.
    assert sum(r["count"] for r in stats["high_tokens"]) == 4
    assert stats["tau"] == pytest.approx(np.sort(h)[-4], rel=1e-6)
    assert sum(r["count"] for r in stats["low_tokens"]) == 4


def test_token_table_counts_and_means():
    toks = ["a", "b", "a", "c", "a", "b"]
    h = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    mask = np.array([True, True, True, False, False, True])
    rows = token_table(toks, h, mask)
    assert [(r["token"], r["count"]) for r in rows] == [("b", 2), ("a", 2)]  # ties: higher mean H first
    assert rows[0]["mean_entropy"] == 4.0 and rows[1]["mean_entropy"] == 2.0
    assert rows[0]["share"] == 0.5
    assert Counter(t for t, m in zip(toks, mask) if m) == {r["token"]: r["count"] for r in rows}


def test_word_cloud_layout_sizes_and_no_overlap():
    freqs = {f"w{i}": 40 - i for i in range(40)}

    def measure(word, size):  # a monospace font: 0.6 em per character
        return 0.6 * size * len(word), size

    placed = layout_words(freqs, measure, width=600, height=300, max_font=60, min_font=6)
    sizes = {w: s for w, s, _ in placed}
    assert sizes["w0"] == 60 and sizes["w20"] == pytest.approx(60 * 20 / 40)  # font size ∝ frequency
    boxes = [b for _, _, b in placed]
    assert len(boxes) >= 30
    for i, (a0, b0, a1, b1) in enumerate(boxes):
        assert 0 <= a0 < a1 <= 600 and 0 <= b0 < b1 <= 300
        for c0, d0, c1, d1 in boxes[i + 1 :]:
            assert a1 <= c0 or c1 <= a0 or b1 <= d0 or d1 <= b0, "boxes overlap"


def test_write_stats_files(tmp_path):
    _fake_dump(tmp_path / "d.jsonl")
    write_stats(read_dump(tmp_path / "d.jsonl"), tmp_path / "out")
    for name in ("stats.json", "entropy_hist.png", "wordcloud_high.png", "wordcloud_low.png"):
        data = (tmp_path / "out" / name).read_bytes()
        assert len(data) > 100 and (name.endswith("json") or data[:4] == b"\x89PNG")


def test_dump_step_from_a_training_step(tiny_model_dir, tmp_path):
    """The trainer's hook: a scored rollout (rollout, loss_mask, old_logp, entropy), advantages and the
    trained selection -> a dump."""
    from types import SimpleNamespace

    from forkrl.core.selection import select_tokens
    from forkrl.models.loading import load_model_and_tokenizer
    from forkrl.rollout.hf import generate
    from forkrl.training.dump import dump_step

    model, tok = load_model_and_tokenizer(tiny_model_dir)
    ro = generate(model, tok, ["3+?=8 in 4,5:"], n=3, max_new_tokens=9, generator_seed=0)
    loss_mask = ro.response_mask.clone()
    loss_mask[0] = False  # e.g. a truncated row dropped by the overlong filter: its tokens are still dumped
    scored = SimpleNamespace(
        rollout=ro, loss_mask=loss_mask, old_logp=ro.sampler_logp, entropy=ro.sampler_entropy
    )
    sel = select_tokens(ro.sampler_entropy, loss_mask, rho=0.25)
    dump_step(
        tmp_path / "rollouts" / "step_000003.parquet",
        tok,
        scored,
        torch.tensor([0.5, -0.5, 0.0]),
        sel,
        step=3,
        meta={"rho": 0.25},
    )
    d = read_dump(tmp_path / "rollouts")
    assert [r["step"] for r in d.rows] == [3, 3, 3] and d.meta["rho"] == 0.25
    assert ["".join(r["tokens"]).replace("<eos>", "") for r in d.rows] == ro.texts
    assert d.rows[0]["loss"] == [False] * len(d.rows[0]["tokens"]) and not any(d.rows[0]["sel"])
    n_valid = int(loss_mask.sum())
    assert sum(sum(r["sel"]) for r in d.rows) == math.ceil(0.25 * n_valid)
