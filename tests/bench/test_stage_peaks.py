"""bench/vs_trl.py's StagePeaks: the peak resident set per stage that bench/real_shapes.py reports."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from vs_trl import StagePeaks, rss_mib  # noqa: E402


def test_a_stage_holding_memory_at_its_end_records_it_and_other_stages_do_not():
    peaks = StagePeaks(interval=60.0)  # the sampling thread never fires: only the start/end notes count
    before = rss_mib()

    def hold():
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        return x

    def small():
        return 1

    kept = peaks.stage("big", hold)()
    peaks.stage("small", small)()
    out = peaks.close()
    assert out["big"] >= before + 60  # the end note saw the 64 MiB tensor
    assert set(out) == {"big", "small"}
    del kept


def test_nested_stages_count_toward_the_inner_one_and_the_outer_resumes():
    peaks = StagePeaks(interval=60.0)
    seen = []

    def inner():
        seen.append(peaks._label)

    def outer():
        peaks.stage("inner", inner)()
        seen.append(peaks._label)

    peaks.stage("outer", outer)()
    peaks.close()
    assert seen == ["inner", "outer"]
    assert peaks._label is None
