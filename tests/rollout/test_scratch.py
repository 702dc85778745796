"""The decode loop's reused buffers (issue 20): `_pick` and `LeanDecoder.step(out=...)` give the plain
ops' values bit for bit, and the transposed LM head the model's logits."""

import pytest
import torch

import forkrl.rollout.lean as lean
from forkrl.rollout.hf import Scratch, _pick, _top_p_filter
from forkrl.rollout.lean import LeanDecoder, head_transposed
from tests.rollout.test_lean import _decode_both, _qwen3


def _pick_plain(logits, *, temperature, top_p, greedy, logits_processor, ids_so_far, u):
    """`_pick` as it was before the buffers: every (A, V) intermediate a fresh tensor."""
    z = logits.float() / temperature
    logp_all = torch.log_softmax(z, dim=-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    if greedy:
        tok = z.argmax(-1)
    else:
        scores = z
        if logits_processor is not None:
            scores = logits_processor(ids_so_far, logits.float()) / 1.0
        if top_p < 1.0:
            scores = _top_p_filter(scores, top_p)
        cdf = torch.softmax(scores, dim=-1).cumsum(-1)
        tok = (
            torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)
            .squeeze(-1)
            .clamp_(max=cdf.shape[-1] - 1)
        )
    return tok, logp_all.gather(-1, tok[:, None]).squeeze(-1), entropy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "mode",
    [
        dict(greedy=False, top_p=1.0, temperature=1.0),
        dict(greedy=False, top_p=1.0, temperature=0.7),
        dict(greedy=True, top_p=1.0, temperature=1.3),
        dict(greedy=False, top_p=0.9, temperature=1.0),
        dict(greedy=False, top_p=1.0, temperature=1.0, processor=True),
    ],
    ids=["T1", "T0.7", "greedy", "top_p", "processor"],
)
def test_pick_with_reused_buffers_is_bit_equal_to_the_plain_ops(dtype, mode):
    g = torch.Generator().manual_seed(0)
    V = 5003
    scratch = Scratch()
    mode = dict(mode)
    processor = (lambda ids, z: z * 0.5) if mode.pop("processor", False) else None
    for rows in (9, 9, 6, 2):  # rows leave the batch: views of the first rows of the same buffers
        logits = (torch.randn(rows, V, generator=g) * 4).to(dtype)
        u = torch.rand(rows, generator=g)
        kw = dict(mode, logits_processor=processor, ids_so_far=None, u=u)
        got = _pick(logits, scratch=scratch, **kw)
        want = _pick_plain(logits, **kw)
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a, b)
    assert (
        scratch.get("z", 9, V, torch.float32, "cpu").data_ptr()
        == scratch.get("z", 2, V, torch.float32, "cpu").data_ptr()
    )


def test_scratch_grows_and_changes_shape_when_asked():
    s = Scratch()
    a = s.get("x", 4, 10, torch.float32, "cpu")
    assert a.shape == (4, 10) and a.is_contiguous()
    assert s.get("x", 3, 10, torch.float32, "cpu").data_ptr() == a.data_ptr()
    assert s.get("x", 8, 10, torch.float32, "cpu").shape == (8, 10)  # more rows: a new buffer
    assert s.get("x", 8, 12, torch.float32, "cpu").shape == (8, 12)
    assert s.get("x", 8, 12, torch.bfloat16, "cpu").dtype == torch.bfloat16


def _step_pair(model, A, transposed, monkeypatch):
    if transposed:  # the tiny model is far below the shapes where the transposed head is used
        monkeypatch.setattr(lean, "HEAD_T_MIN_HIDDEN", 0)
        monkeypatch.setattr(lean, "HEAD_T_MIN_VOCAB", 0)
    assert head_transposed(model.lm_head.weight, A) is transposed
    from transformers import DynamicCache

    from forkrl.rollout.hf import cache_kwarg

    ids = torch.randint(2, 40, (A, 5), generator=torch.Generator().manual_seed(1))
    outs = []
    for use_out in (False, True):
        cache = DynamicCache()
        with torch.no_grad():
            model(input_ids=ids, use_cache=True, **{cache_kwarg(model): cache})
        dec = LeanDecoder(model, 12)
        dec.begin(cache, 1, capacity=12)
        bias = torch.zeros(A, 12)
        tok, pos = ids[:, -1], torch.full((A,), 5)
        buf = torch.full((A, dec.vocab), float("nan")) if use_out else None
        got = [dec.step(tok, pos + t, bias[:, : dec.n + 1], out=buf).clone() for t in range(3)]
        outs.append(torch.stack(got))
    return outs


@pytest.mark.parametrize("transposed", [False, True])
def test_step_into_a_buffer_is_bit_equal(transposed, monkeypatch):
    model = _qwen3().eval()
    plain, into = _step_pair(model, 4, transposed, monkeypatch)
    assert torch.equal(plain, into)


def test_transposed_head_gives_the_models_logits(monkeypatch):
    monkeypatch.setattr(lean, "HEAD_T_MIN_HIDDEN", 0)
    monkeypatch.setattr(lean, "HEAD_T_MIN_VOCAB", 0)
    _decode_both(_qwen3())  # the lean steps (now through the transposed head) vs the model's forward


def test_transposed_head_only_at_the_measured_shapes():
    big = torch.empty(151_936, 512)
    assert head_transposed(big, 16) and head_transposed(big, 2) and head_transposed(big, 64)
    assert not head_transposed(big, 1) and not head_transposed(big, 65)
    assert not head_transposed(big.bfloat16(), 16)
    assert not head_transposed(torch.empty(151_936, 256), 16)
    assert not head_transposed(torch.empty(8192, 512), 16)
