"""Checkpoint overlap: a model with itself overlaps exactly; the fast path equals a direct set computation."""

import math

import pytest
import torch

from forkrl.analysis.overlap import checkpoint_overlap, entropy_change, plot_overlap, topk_overlap
from forkrl.models.loading import load_model_and_tokenizer

PROMPTS = ["3+?=8 in 4,5:", "12+?=20 in 8,3,9:"]


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory):
    """A second random tiny model (another seed), same tokenizer."""
    from forkrl.models.tiny import build_char_tokenizer, build_tiny_model

    path = tmp_path_factory.mktemp("tiny_b")
    tok = build_char_tokenizer()
    build_tiny_model(
        len(tok), hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64, seed=1
    ).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_model_with_itself_overlaps_exactly(tiny_model_dir, tmp_path):
    res = checkpoint_overlap(
        load_model_and_tokenizer, [tiny_model_dir, tiny_model_dir], PROMPTS, n=2, max_new_tokens=10, rho=0.2
    )
    second = res["checkpoints"][1]
    assert second["overlap_vs_first"] == 1.0 and second["overlap_vs_previous"] == 1.0
    assert (
        second["change_vs_first"]["high"]["change"] == 0.0
        and second["change_vs_first"]["low"]["abs_change"] == 0.0
    )
    assert res["tokens"] > 0 and res["responses"] == 4
    plot_overlap(res, tmp_path / "o.png")
    assert (tmp_path / "o.png").read_bytes()[:4] == b"\x89PNG"


def test_different_checkpoints_match_a_direct_set_computation(tiny_model_dir, other_model_dir):
    res = checkpoint_overlap(
        load_model_and_tokenizer,
        [tiny_model_dir, other_model_dir, tiny_model_dir],
        PROMPTS,
        n=2,
        max_new_tokens=10,
    )
    a, b, c = res["checkpoints"]
    assert a["overlap_vs_first"] == 1.0 and c["overlap_vs_first"] == 1.0
    assert 0.0 <= b["overlap_vs_first"] < 1.0
    assert c["overlap_vs_previous"] == pytest.approx(b["overlap_vs_first"])  # symmetric with exact counts


def test_topk_overlap_equals_sets():
    g = torch.Generator().manual_seed(0)
    ea, eb = torch.rand(5, 13, generator=g), torch.rand(5, 13, generator=g)
    mask = torch.rand(5, 13, generator=g) < 0.8
    ha = ea.masked_fill(~mask, -1).flatten()
    hb = eb.masked_fill(~mask, -1).flatten()
    k = math.ceil(0.3 * int(mask.sum()))
    sa = set(ha.topk(k).indices.tolist())
    sb = set(hb.topk(k).indices.tolist())
    assert topk_overlap(ea, eb, mask, rho=0.3) == pytest.approx(len(sa & sb) / len(sa))
    assert topk_overlap(ea, ea, mask, rho=0.3) == 1.0


def test_entropy_change_splits_high_and_low():
    ea = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    eb = torch.tensor([[2.0, 3.0, 2.0, 1.5, 0.5]])
    mask = torch.ones(1, 5, dtype=torch.bool)
    ch = entropy_change(ea, eb, mask, rho=0.4)  # high = the first two under A
    assert ch["high"]["n"] == 2 and ch["high"]["entropy_a"] == 3.5 and ch["high"]["change"] == -1.0
    assert ch["low"]["n"] == 3 and ch["low"]["change"] == pytest.approx(1.0 / 3)
    assert len(ch["change_by_decile"]) == 10
