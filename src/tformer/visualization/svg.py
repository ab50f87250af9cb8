"""Line charts and histograms as inline SVG strings, for the run report.

Written by hand rather than with matplotlib: a report is written at the end of every training
run, and these charts cost microseconds and no import; the browser draws the text (any script,
Chinese included) and the curves stay sharp at any zoom. Every point has a ``<title>``, which
browsers show on hover.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass

WIDTH, HEIGHT = 560, 300
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 34, 44  # plot margins, pixels
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e")


@dataclass(frozen=True)
class Series:
    label: str
    xs: Sequence[float]
    ys: Sequence[float]
    markers: bool = False  # a dot per point (sparse series such as validation)


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values (1, 2 or 5 × 10^k apart) covering [low, high]."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return [0.0]
    if high <= low:
        high = low + (abs(low) or 1.0)
    raw = (high - low) / max(count, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.floor(low / step) * step
    ticks, value = [], first
    while value <= high + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    if ticks[-1] < high:
        ticks.append(round(value, 12))
    return ticks


def line_chart(series: Sequence[Series], title: str, xlabel: str, ylabel: str) -> str:
    """An SVG line chart of ``series`` (finite points only) sharing one pair of axes."""
    points = [(x, y) for s in series for x, y in zip(s.xs, s.ys) if _finite(x, y)]
    if not points:
        return _empty(title)
    xt = nice_ticks(min(p[0] for p in points), max(p[0] for p in points))
    yt = nice_ticks(min(p[1] for p in points), max(p[1] for p in points))
    sx, sy = _scale(xt[0], xt[-1], LEFT, WIDTH - RIGHT), _scale(yt[0], yt[-1], HEIGHT - BOTTOM, TOP)
    parts = [_frame(title, xlabel, ylabel, xt, yt, sx, sy)]
    for i, s in enumerate(series):
        colour = COLOURS[i % len(COLOURS)]
        pts = [(x, y) for x, y in zip(s.xs, s.ys) if _finite(x, y)]
        if not pts:
            continue
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.6" '
                     f'points="{path}"/>')
        if s.markers or len(pts) == 1:
            parts.extend(
                f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{colour}">'
                f"<title>{_text(s.label)}: {y:.4g} at {x:g}</title></circle>" for x, y in pts
            )
        parts.append(f'<text x="{WIDTH - RIGHT - 4}" y="{TOP + 14 + 15 * i}" text-anchor="end" '
                     f'fill="{colour}" font-size="12">{_text(s.label)}</text>')
    return _svg(parts)


def histogram(values: Sequence[float], title: str, xlabel: str, bins: int = 30) -> str:
    """An SVG histogram of ``values`` in at most ``bins`` equal-width integer-aligned bins."""
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return _empty(title)
    low, high = min(values), max(values)
    width = max(1, math.ceil((high - low + 1) / bins))
    edges = [low + width * k for k in range(math.ceil((high - low + 1) / width) + 1)]
    counts = [0] * (len(edges) - 1)
    for v in values:
        counts[min(int((v - low) // width), len(counts) - 1)] += 1
    xt = nice_ticks(edges[0], edges[-1])
    yt = nice_ticks(0, max(counts))
    sx, sy = _scale(xt[0], xt[-1], LEFT, WIDTH - RIGHT), _scale(0, yt[-1], HEIGHT - BOTTOM, TOP)
    parts = [_frame(title, xlabel, "examples", xt, yt, sx, sy)]
    for k, count in enumerate(counts):
        x0, x1 = sx(edges[k]), sx(edges[k + 1])
        span = f"{edges[k]:g}" if width == 1 else f"{edges[k]:g}–{edges[k + 1] - 1:g}"
        parts.append(
            f'<rect x="{x0:.1f}" y="{sy(count):.1f}" width="{max(x1 - x0 - 1, 1):.1f}" '
            f'height="{sy(0) - sy(count):.1f}" fill="{COLOURS[0]}">'
            f"<title>{span}: {count}</title></rect>"
        )
    return _svg(parts)


def _frame(title, xlabel, ylabel, xt, yt, sx, sy) -> str:
    lines = [f'<text x="{WIDTH / 2}" y="18" text-anchor="middle" font-size="14">'
             f"{_text(title)}</text>"]
    for y in yt:
        lines.append(f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" '
                     'stroke="#e3e3e3"/>')
        lines.append(f'<text x="{LEFT - 6}" y="{sy(y) + 4:.1f}" text-anchor="end" '
                     f'font-size="11">{_number(y)}</text>')
    for x in xt:
        lines.append(f'<text x="{sx(x):.1f}" y="{HEIGHT - BOTTOM + 16}" text-anchor="middle" '
                     f'font-size="11">{_number(x)}</text>')
    lines.append(f'<rect x="{LEFT}" y="{TOP}" width="{WIDTH - LEFT - RIGHT}" '
                 f'height="{HEIGHT - TOP - BOTTOM}" fill="none" stroke="#888"/>')
    lines.append(f'<text x="{(LEFT + WIDTH - RIGHT) / 2}" y="{HEIGHT - 8}" text-anchor="middle" '
                 f'font-size="12">{_text(xlabel)}</text>')
    lines.append(f'<text transform="translate(14 {(TOP + HEIGHT - BOTTOM) / 2}) rotate(-90)" '
                 f'text-anchor="middle" font-size="12">{_text(ylabel)}</text>')
    return "".join(lines)


def _scale(low: float, high: float, out_low: float, out_high: float):
    span = (high - low) or 1.0
    return lambda v: out_low + (v - low) / span * (out_high - out_low)


def _svg(parts: list[str]) -> str:
    return (f'<svg width="{WIDTH}" height="{HEIGHT}" '
            f'viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" role="img">'
            + "".join(parts) + "</svg>")


def _empty(title: str) -> str:
    return _svg([f'<text x="{WIDTH / 2}" y="{HEIGHT / 2}" text-anchor="middle" font-size="14" '
                 f'fill="#777">{_text(title)}: no data</text>'])


def _finite(x, y) -> bool:
    return isinstance(x, (int, float)) and isinstance(y, (int, float)) and math.isfinite(x) \
        and math.isfinite(y)


def _number(v: float) -> str:
    """A short tick label: 0.0025, 12, 40k, 1.2M."""
    for size, suffix in ((1e6, "M"), (1e3, "k")):
        if abs(v) >= 10 * size:
            return f"{v / size:.3g}{suffix}"
    return f"{v:.3g}"


def _text(s: str) -> str:
    return html.escape(str(s))
