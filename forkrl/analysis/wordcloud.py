"""A small word cloud with matplotlib only: font size proportional to frequency, no overlaps.

Words are placed largest first. Each word's box is measured with the figure's renderer, then put at
the free cell of a fine grid nearest the centre (cells are checked against an occupancy grid, so no
two boxes overlap). `draw_word_cloud` starts with a largest font of 40% of the canvas height and
scales every size down together until all words fit, so sizes stay proportional to frequency; a word
that still fits nowhere at the smallest scale is shrunk on its own, and dropped as a last resort.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

CELL = 4  # occupancy-grid cell, pixels


def layout_words(
    freqs: dict[str, float],
    measure,
    *,
    width: int,
    height: int,
    max_font: float = 64.0,
    min_font: float = 8.0,
    pad: int = 2,
    top_margin: int = 0,
    shrink: bool = True,
) -> list[tuple[str, float, tuple[int, int, int, int]]]:
    """Place words on a width x height pixel canvas.

    Args:
        freqs: word -> frequency; font size = max_font * f / f_max (at least min_font).
        measure: (word, font_size) -> (w, h) in pixels.
        top_margin: pixels at the top kept free (for a title).
        shrink: shrink a word that does not fit (by 0.8 until min_font) instead of skipping it.
    Returns:
        [(word, font_size, (x0, y0, x1, y1))] with y growing downward; the boxes (padded by `pad`)
        never overlap.
    """
    gw, gh = width // CELL, height // CELL
    taken = np.zeros((gh, gw), dtype=bool)
    taken[: int(np.ceil(top_margin / CELL))] = True
    # Candidate top-left cells ordered by the distance of a box centre from the canvas centre.
    ys, xs = np.mgrid[0:gh, 0:gw]
    order = np.argsort(((xs - gw / 2) / gw) ** 2 + ((ys - gh / 2) / gh) ** 2, axis=None, kind="stable")
    placed = []
    if not freqs:
        return placed
    f_max = max(freqs.values())
    for word, f in sorted(freqs.items(), key=lambda kv: (-kv[1], kv[0])):
        size = max(min_font, max_font * f / f_max)
        while size >= min_font:
            w, h = measure(word, size)
            cw, ch = int(np.ceil((w + 2 * pad) / CELL)), int(np.ceil((h + 2 * pad) / CELL))
            spot = _first_free(taken, order, cw, ch, gw, gh)
            if spot is not None:
                cx, cy = spot
                taken[cy : cy + ch, cx : cx + cw] = True
                x0, y0 = cx * CELL + pad, cy * CELL + pad
                placed.append((word, size, (x0, y0, x0 + int(np.ceil(w)), y0 + int(np.ceil(h)))))
                break
            if not shrink:
                break
            size *= 0.8
    return placed


def _first_free(taken: np.ndarray, order: np.ndarray, cw: int, ch: int, gw: int, gh: int):
    """The first cell in `order` where a cw x ch box centred there is inside the grid and free."""
    if cw > gw or ch > gh:
        return None
    # Summed-area table: the number of taken cells in any box in O(1).
    sat = np.zeros((gh + 1, gw + 1), dtype=np.int32)
    sat[1:, 1:] = taken.cumsum(0).cumsum(1)
    for idx in order:
        y, x = divmod(int(idx), gw)
        x0, y0 = x - cw // 2, y - ch // 2
        if x0 < 0 or y0 < 0 or x0 + cw > gw or y0 + ch > gh:
            continue
        if sat[y0 + ch, x0 + cw] - sat[y0, x0 + cw] - sat[y0 + ch, x0] + sat[y0, x0] == 0:
            return x0, y0
    return None


def draw_word_cloud(
    freqs: dict[str, float],
    path: str | Path,
    *,
    width: int = 800,
    height: int = 450,
    color: str = "#cc3311",
    title: str = "",
) -> list[tuple[str, float, tuple[int, int, int, int]]]:
    """Draw the cloud to a PNG at `path` (Agg backend) and return the layout (see `layout_words`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dpi = 100
    fig = plt.figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.axis("off")
    renderer = fig.canvas.get_renderer()

    def measure(word: str, size: float) -> tuple[float, float]:
        t = ax.text(0, 0, word, fontsize=size * 72 / dpi, family="DejaVu Sans")
        box = t.get_window_extent(renderer=renderer)
        t.remove()
        return box.width, box.height

    margin = 24 if title else 0
    max_font = 0.4 * height
    for _ in range(12):
        placed = layout_words(
            freqs, measure, width=width, height=height, max_font=max_font, top_margin=margin, shrink=False
        )
        if len(placed) == len(freqs) or max_font < 16:
            break
        max_font *= 0.85
    if len(placed) < len(freqs):
        placed = layout_words(
            freqs, measure, width=width, height=height, max_font=max_font, top_margin=margin
        )
    f_max = max(freqs.values(), default=1)
    for word, size, (x0, _, _, y1) in placed:
        alpha = 0.45 + 0.55 * freqs[word] / f_max
        ax.text(
            x0,
            y1,
            word,
            fontsize=size * 72 / dpi,
            family="DejaVu Sans",
            color=color,
            alpha=alpha,
            va="bottom",
        )
    if title:
        ax.text(6, 16, title, fontsize=10, color="#444444")
    if not placed:
        ax.text(width / 2, height / 2, "no tokens", ha="center", color="#999999")
    fig.savefig(Path(path), dpi=dpi)
    plt.close(fig)
    return placed
