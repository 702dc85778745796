"""The token view of the loss mode's tokens: a "colour by" selector for `cov`, an outline for `acted`,
the covariance in each token's data (its tooltip); dumps without the columns open as before."""

import json
import re

from forkrl.analysis.dump import read_dump
from forkrl.analysis.view import cov_color, render_view
from forkrl.training.dump import META_KEY

from .conftest import check_html

_ROW = {
    "step": 1,
    "row": 0,
    "prompt": "p",
    "text": "abc",
    "adv": 0.5,
    "reward": 1.0,
    "token_ids": [1, 2, 3],
    "tokens": ["a", "b", "c"],
    "entropy": [0.5, 1.5, 0.1],
    "logp": [-0.1, -2.0, -0.3],
    "sel": [True, True, False],
    "loss": [True, True, True],
}


def _write(path, rows, meta):
    path.write_text("".join(json.dumps(x) + "\n" for x in ({META_KEY: meta}, *rows)))
    return read_dump(path)


def test_view_colours_by_cov_and_outlines_acted_tokens(tmp_path):
    row = {**_ROW, "cov": [0.25, -0.5, 0.0], "acted": [False, True, False]}
    dump = _write(tmp_path / "d.jsonl", [row], {"loss_mode": "kl_cov", "acted": "the top-k by cov"})
    page = render_view(dump)
    check_html(page)
    assert '<select id="colour">' in page and '<option value="cov">' in page  # the selector
    assert 'id="markact"' in page and 'title="the top-k by cov"' in page and "outline tokens kl_cov" in page
    spans = re.findall(r'<span id="t\d+" class="([^"]*)" style="([^"]*)"[^>]*data-cov="([^"]*)"', page)
    assert [c for c, _, _ in spans] == ["t s", "t s a", "t"]
    assert [float(v) for *_, v in spans] == [0.25, -0.5, 0.0]
    # |cov| scale = its 99th percentile (~0.495): the -0.5 token is full blue, 0 is white
    assert f"--c:{cov_color(-0.5, 0.495)}" in spans[1][1] and "--c:#ffffff" in spans[2][1]
    assert "1 acted on" in page and 'data-mode="kl_cov"' in page


def test_view_of_cov_without_acted_has_the_selector_only(tmp_path):
    dump = _write(tmp_path / "d.jsonl", [{**_ROW, "cov": [0.1, 0.2, 0.0]}], {"loss_mode": "cispo"})
    page = render_view(dump)
    check_html(page)
    assert (
        'id="colour"' in page
        and 'id="markact"' not in page
        and " a" not in re.findall(r'class="(t[^"]*)"', page)
    )


def test_old_dumps_without_the_columns_still_open(tmp_path):
    dump = _write(tmp_path / "old.jsonl", [_ROW, {**_ROW, "row": 1}], {"rule": "entropy", "rho": 0.2})
    page = render_view(dump)
    tags = check_html(page)
    assert tags["script"] == 1 and page.count('class="resp"') == 2
    assert 'id="colour"' not in page and 'id="markact"' not in page and "data-cov" not in page
    assert "--c:" not in page and 'style="--h:#' in page  # coloured by entropy, as before
    # a folder mixing an old and a new dump: the controls need the columns on every row shown
    row = {**_ROW, "cov": [0.1, 0.2, 0.0], "acted": [True, False, False]}
    assert 'id="colour"' not in render_view(type(dump)(rows=[_ROW, row]))
