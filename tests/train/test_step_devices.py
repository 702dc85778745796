"""Tensors made inside the step take their device from their inputs (the step ran on CPU only before).

`meta` tensors stand in for a GPU: a tensor created on the CPU among them fails to combine, exactly
as a CPU tensor among CUDA tensors does (the `official` and `trl` presets crashed on a GPU when the
normalizer's selected count was a CPU nan).
"""

import torch

from forkrl.training.dist import SINGLE
from forkrl.training.optimize import Aggregate, MiniBatch


def test_mini_batch_counts_stay_on_the_inputs_device():
    mask = torch.ones(4, 6, dtype=torch.bool, device="meta")
    for sel in (None, mask):  # None: the selection happens in the training forward (micro_batch scope)
        agg = Aggregate("batch", SINGLE)
        agg.begin(mask, sel)
        counts = agg.counts(mask, mask)
        assert {t.device.type for t in counts._values()} == {"meta"}
    micro = Aggregate("micro_batch", SINGLE)
    counts = micro.counts(mask, mask)
    assert {t.device.type for t in counts._values()} == {"meta"}
    assert micro.weight(slice(0, 2), MiniBatch(slice(0, 4), [slice(0, 2), slice(2, 4)])) == 0.5
