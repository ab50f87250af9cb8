"""Attention maps as PNG heatmaps (matplotlib, Agg backend: files only, no display).

For each kind of attention the model has (cross, encoder self, decoder self; a decoder-only
model's causal self-attention is its "decoder" kind) two pictures:

- ``{kind}_heads.png``: one panel per layer (rows) and head (columns);
- ``{kind}_mean.png``: one panel per layer, the average over its heads;

and for a model with copy attention (`tformer.model.copy`) ``copy.png``: one panel, the copy
attention over the source (rows: target tokens, each labelled with its P(copy) = 1 − p_gen).

Rows of a panel are queries, columns keys (see :meth:`AttentionMaps.axes`); token labels are on
the left of the first column and below the last row. The colour scale is fixed to [0, 1] in
every panel, so panels compare.

Size: a figure is laid out in pixels at :data:`DPI`, so its PNG has exactly the size
:func:`figure_size_px` gives: every token takes ``cell`` pixels (:data:`CELL_PX` for one
panel, :data:`GRID_CELL_PX` in grids) and fixed margins hold the labels, titles and the colour
bar. One more source token widens each panel by ``cell`` pixels. A figure that would exceed
:data:`MAX_PX` in either direction, or :data:`MAX_AREA_PX` in all, gets a smaller cell (the
PNG stays drawable, in bounded memory).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tformer.visualization.attention import AttentionMaps
from tformer.visualization.fonts import font_families
from tformer.visualization.run import read_metrics

log = logging.getLogger(__name__)

DPI = 100
CELL_PX = 20  # pixels per token, single-panel figures
GRID_CELL_PX = 12  # pixels per token, layer x head grids
LEFT_PX, BOTTOM_PX = 100, 100  # room for token labels (10 characters, then …)
TOP_PX, RIGHT_PX = 36, 70  # figure title; colour bar and its ticks
GAP_PX, PANEL_TITLE_PX = 10, 16  # between panels; "layer 1 · head 2" above a panel
MAX_PX = 30_000  # Agg draws at most 2**16 pixels a side; stay well below
# ... and at most this many pixels in all: 4 bytes each in Agg's buffer, so about 160 MB. A
# 1,024-token source at 12 px per token made a 6 GB, 200 s grid of heads; now 2-3 px per token.
MAX_AREA_PX = 40_000_000
MAX_LABEL_CHARS = 10
TITLES = {
    "cross": "cross-attention: target token predicted (rows) × source token (columns)",
    "encoder": "encoder self-attention: source token (rows) × source token (columns)",
    "decoder": "decoder self-attention: token predicted (rows) × token read (columns)",
    "causal": "causal self-attention: token read (rows; it predicts the next) × token read "
              "(columns)",
    "copy": "copy attention: target token predicted, with P(copy) (rows) × source token (columns)",
}


@dataclass(frozen=True)
class Grid:
    """The pixel layout of a figure of ``rows`` × ``cols`` panels of n_query × n_key tokens."""

    rows: int
    cols: int
    n_query: int
    n_key: int
    cell: int

    @property
    def panel_px(self) -> tuple[int, int]:
        return self.cell * self.n_key, self.cell * self.n_query

    @property
    def size_px(self) -> tuple[int, int]:
        pw, ph = self.panel_px
        width = LEFT_PX + self.cols * pw + (self.cols - 1) * GAP_PX + RIGHT_PX
        height = TOP_PX + self.rows * (PANEL_TITLE_PX + ph) + (self.rows - 1) * GAP_PX + BOTTOM_PX
        return width, height

    def panel_rect(self, row: int, col: int) -> tuple[float, float, float, float]:
        """Matplotlib axes rectangle (left, bottom, width, height as fractions) of a panel."""
        width, height = self.size_px
        pw, ph = self.panel_px
        x = LEFT_PX + col * (pw + GAP_PX)
        y_top = TOP_PX + row * (PANEL_TITLE_PX + ph + GAP_PX) + PANEL_TITLE_PX
        return x / width, 1 - (y_top + ph) / height, pw / width, ph / height


def figure_size_px(n_query: int, n_key: int, rows: int = 1, cols: int = 1,
                   cell: int | None = None) -> tuple[int, int]:
    """(width, height) in pixels of the PNG of a figure of ``rows`` × ``cols`` panels, each
    ``n_query`` × ``n_key`` tokens: margins + ``cell`` pixels per token (``cell`` defaults to
    :data:`CELL_PX` for one panel, :data:`GRID_CELL_PX` for several)."""
    return _grid(rows, cols, n_query, n_key, cell).size_px


def _grid(rows: int, cols: int, n_query: int, n_key: int, cell: int | None) -> Grid:
    if min(rows, cols, n_query, n_key) < 1:
        raise ValueError(f"a figure needs at least one panel and one token per axis, got "
                         f"rows={rows}, cols={cols}, n_query={n_query}, n_key={n_key}")
    cell = cell or (CELL_PX if rows * cols == 1 else GRID_CELL_PX)
    grid = Grid(rows, cols, n_query, n_key, cell)
    while (max(grid.size_px) > MAX_PX or grid.size_px[0] * grid.size_px[1] > MAX_AREA_PX) \
            and grid.cell > 1:
        grid = Grid(rows, cols, n_query, n_key, grid.cell - 1)
    if grid.cell != cell:
        log.info("attention figure too large at %d px per token; drawn at %d", cell, grid.cell)
    return grid


def plot_panels(panels: list[list[np.ndarray]], row_labels: list[str], col_labels: list[str],
                titles: list[list[str]], title: str, path: Path, cell: int | None = None) -> Path:
    """Draw ``panels[r][c]`` (each (Tq, Tk), values in [0, 1]) as heatmaps in one PNG; token
    labels on the first column and last row. Returns ``path``."""
    plt = _pyplot()
    rows, cols = len(panels), len(panels[0])
    n_query, n_key = panels[0][0].shape
    if (len(row_labels), len(col_labels)) != (n_query, n_key):
        raise ValueError(f"labels: {len(row_labels)} row and {len(col_labels)} column labels for "
                         f"maps of shape {(n_query, n_key)}")
    grid = _grid(rows, cols, n_query, n_key, cell)
    width, height = grid.size_px
    font_size = max(4.0, min(8.0, grid.cell * 0.5))  # points; 72 points = DPI pixels
    # every token labelled while a label fits its cell; past that (a cell shrunk by MAX_PX or
    # MAX_AREA_PX) every stride-th, so that labels do not overlap and ticks stay few
    stride = max(1, math.ceil(font_size * DPI / 72 / grid.cell))
    with plt.rc_context({"font.family": font_families(), "font.size": font_size}), \
            _quiet_single_weight_fonts():
        fig = plt.figure(figsize=(width / DPI, height / DPI), dpi=DPI)
        image = None
        for r in range(rows):
            for c in range(cols):
                ax = fig.add_axes(grid.panel_rect(r, c))
                image = ax.imshow(panels[r][c], vmin=0.0, vmax=1.0, cmap="viridis",
                                  aspect="auto", interpolation="nearest")
                ax.set_title(titles[r][c], fontsize=font_size, pad=2)
                # labels on the outer panels only: tick objects are most of the drawing time
                if c == 0:
                    ax.set_yticks(range(0, n_query, stride), _short(row_labels)[::stride])
                else:
                    ax.set_yticks([])
                if r == rows - 1:
                    ax.set_xticks(range(0, n_key, stride), _short(col_labels)[::stride],
                                  rotation=90)
                else:
                    ax.set_xticks([])
                ax.tick_params(length=0, pad=1)
        bar = fig.add_axes(((width - RIGHT_PX + 14) / width, BOTTOM_PX / height, 12 / width,
                            (height - TOP_PX - BOTTOM_PX) / height))
        fig.colorbar(image, cax=bar, ticks=[0, 0.25, 0.5, 0.75, 1])
        fig.text(LEFT_PX / width, 1 - 8 / height, title, va="top", fontsize=9)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=DPI)
        plt.close(fig)
    return path


def write_attention_pngs(maps: AttentionMaps, out_dir: Path | str) -> list[Path]:
    """``{kind}_heads.png`` and ``{kind}_mean.png`` for the kinds the model has (decoder-only:
    ``decoder_*`` alone), in ``out_dir``, and ``copy.png`` for a model with copy attention."""
    out_dir = Path(out_dir)
    written = []
    for kind in maps.kinds():
        layers = maps.kind(kind)
        rows, cols = maps.axes(kind)
        title = TITLES["causal" if maps.family == "causal" else kind]
        heads = [[layer[h] for h in range(layer.shape[0])] for layer in layers]
        titles = [[f"layer {i + 1} · head {h + 1}" for h in range(len(row))]
                  for i, row in enumerate(heads)]
        written.append(plot_panels(heads, rows, cols, titles, title,
                                   out_dir / f"{kind}_heads.png"))
        means = [[layer.mean(axis=0) for layer in layers]]
        mean_titles = [[f"layer {i + 1} · mean of heads" for i in range(len(layers))]]
        written.append(plot_panels(means, rows, cols, mean_titles, title,
                                   out_dir / f"{kind}_mean.png"))
    if maps.copy_attention is not None:
        rows, cols = maps.axes("cross")
        written.append(plot_panels([[maps.copy_attention]], copy_labels(rows, maps.p_gen), cols,
                                   [["copy attention"]], TITLES["copy"], out_dir / "copy.png"))
    return written


def copy_labels(tokens: list[str], p_gen: np.ndarray) -> list[str]:
    """Row labels of ``copy.png``: P(copy) first (labels are cut at MAX_LABEL_CHARS), then the
    token."""
    return [f"{1.0 - float(p):.2f} {token}" for token, p in zip(tokens, p_gen)]


class _SingleWeightFilter(logging.Filter):
    """Drops matplotlib's "Failed to find font weight normal for <family>, now using 500":
    WenQuanYi Zen Hei ships one weight (500), which is the face wanted anyway."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("findfont: Failed to find font weight")


@contextlib.contextmanager
def _quiet_single_weight_fonts() -> Iterator[None]:
    logger, quiet = logging.getLogger("matplotlib.font_manager"), _SingleWeightFilter()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def _short(labels: list[str]) -> list[str]:
    return [s if len(s) <= MAX_LABEL_CHARS else s[: MAX_LABEL_CHARS - 1] + "…" for s in labels]


def _pyplot():
    """``matplotlib.pyplot`` on the Agg backend (files only, no display), imported when a
    figure is drawn: import time, measured: ``import matplotlib.pyplot`` took 1.8 s on the
    2-core test host, which the server (this module is imported by its attention route's
    module) and ``tformer evaluate`` need not pay."""
    import matplotlib  # import time: see the docstring

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # import time: see the docstring

    return plt


def plot_losses(metrics_path: Path, out: Path) -> Path | None:
    """Training and validation loss against the step, as a PNG; None if nothing was logged."""
    plt = _pyplot()
    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if r["split"] == "train"]
    valid = [(r["step"], r["loss"]) for r in records if r["split"] == "validation"]
    if not train and not valid:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for points, label, style in ((train, "training", "-"), (valid, "validation", "o-")):
        if points:
            ax.plot(*zip(*points), style, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("tformer loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
