"""A line chart with confidence bands as an inline SVG string (no dependencies, no script).

`line_chart` draws, per series, the band between each point's `lo` and `hi`, the line through
its values, and a dot with an error bar for every point (so a single day still shows its
interval). A point with value None breaks the line and the band (the page puts one in every
run of missing days), and so does a `small` point (too few users to trust): it is drawn
hollow, without band or error bar, and does not set the y scale, so one noisy day cannot squash
the others into the bottom of the chart; a small point above the scale sits on the top edge as
a hollow triangle. Shaded spans mark stretches of the x axis without data; vertical markers
(deployments) are dashed lines labelled at the top. The y axis starts at 0; bounds below it are
drawn at 0. Every point carries `data-series`, `data-x` and `data-value`, and a `<title>`
tooltip; every line `data-keys`, the keys of the points it joins; the chart `data-y-max`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from html import escape

PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000")
WIDTH, HEIGHT = 880, 280
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 44, 36
LABEL_ROOM = 130  # px: a marker closer than this to the right edge is labelled on its left


@dataclass(frozen=True)
class Point:
    x: float
    value: float | None
    lo: float | None = None
    hi: float | None = None
    key: str = ""  # for data-x: the day, for instance
    tooltip: str = ""
    small: bool = False  # below the minimum sample: hollow, no band, not in the y scale


@dataclass(frozen=True)
class Series:
    name: str
    points: list[Point]
    color: str = PALETTE[0]


@dataclass(frozen=True)
class Marker:
    x: float
    label: str
    tooltip: str = ""


@dataclass(frozen=True)
class Shade:
    """A span [x0, x1] of the x axis drawn grey, for instance days without data."""

    x0: float
    x1: float
    label: str  # lines separated by "\n"
    tooltip: str = ""


@dataclass(frozen=True)
class Scale:
    """Data coordinates to pixels: x over [x0, x1], y over [0, y1]."""

    x0: float
    x1: float
    y1: float

    def px(self, x: float) -> float:
        return LEFT + (x - self.x0) / (self.x1 - self.x0) * (WIDTH - LEFT - RIGHT)

    def py(self, y: float) -> float:
        y = min(max(y, 0.0), self.y1)
        return HEIGHT - BOTTOM - y / self.y1 * (HEIGHT - TOP - BOTTOM)


def nice_ticks(top: float, count: int = 4) -> list[float]:
    """0, step, 2·step, ... up to the first tick >= top; step is 1, 2 or 5 times 10^k."""
    if not top > 0 or not math.isfinite(top):
        top = 1.0
    raw = top / count
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    n = math.ceil(top / step - 1e-9)
    return [round(i * step, 12) for i in range(n + 1)]


def line_chart(title: str, series: list[Series], x_range: tuple[float, float],
               x_ticks: list[tuple[float, str]], y_format: Callable[[float], str],
               markers: list[Marker] | None = None, chart_id: str = "",
               shades: list[Shade] | None = None) -> str:
    """The chart as one `<svg>` element."""
    ticks = nice_ticks(y_top(series))
    scale = Scale(x_range[0], x_range[1], ticks[-1])
    parts = [*_shades(scale, shades or []), _frame(scale, ticks, x_ticks, y_format),
             *_markers(scale, markers or [])]
    for s in series:
        parts += [*_bands(scale, s), *_lines(scale, s), *_dots(scale, s)]
    parts.append(_legend(series))
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" '
            f'width="{WIDTH}" height="{HEIGHT}" role="img" aria-label="{escape(title)}" '
            f'class="chart" data-chart="{escape(chart_id)}" data-y-max="{ticks[-1]!r}">'
            f'<title>{escape(title)}</title>'
            f'<text x="{LEFT}" y="16" class="chart-title">{escape(title)}</text>'
            + "".join(parts) + "</svg>")


def y_top(series: list[Series]) -> float:
    """5% above the highest value or upper bound of the points that are not small (of all
    points when every one is small: then there is nothing better to scale by)."""
    points = [p for s in series for p in s.points]
    full = [p for p in points if not p.small]
    values = [v for p in (full or points) for v in (p.value, p.hi)
              if v is not None and math.isfinite(v)]
    return max(values, default=0.0) * 1.05


def _shades(scale: Scale, shades: list[Shade]) -> list[str]:
    out = []
    for s in shades:
        x0, x1 = scale.px(s.x0), scale.px(s.x1)
        mid = (x0 + x1) / 2
        lines = "".join(f'<tspan x="{mid:.1f}" dy="{12 * (i > 0)}">{escape(t)}</tspan>'
                        for i, t in enumerate(s.label.split("\n")))
        out.append(f'<g class="gap" data-x0="{s.x0!r}" data-x1="{s.x1!r}">'
                   f'<title>{escape(s.tooltip)}</title>'
                   f'<rect x="{x0:.1f}" y="{TOP}" width="{x1 - x0:.1f}" '
                   f'height="{HEIGHT - TOP - BOTTOM}" fill="#ececec"/>'
                   f'<text y="{TOP + 24}" text-anchor="middle" class="tick gap-label">'
                   f'{lines}</text></g>')
    return out


def _frame(scale: Scale, ticks: list[float], x_ticks: list[tuple[float, str]],
           y_format: Callable[[float], str]) -> str:
    out = []
    x_left, x_right = LEFT, WIDTH - RIGHT
    for t in ticks:
        y = scale.py(t)
        out.append(f'<line x1="{x_left}" y1="{y:.1f}" x2="{x_right}" y2="{y:.1f}" '
                   'class="grid"/>'
                   f'<text x="{x_left - 6}" y="{y + 4:.1f}" text-anchor="end" class="tick">'
                   f'{escape(y_format(t))}</text>')
    base = HEIGHT - BOTTOM
    for x, label in x_ticks:
        out.append(f'<text x="{scale.px(x):.1f}" y="{base + 16}" text-anchor="middle" '
                   f'class="tick">{escape(label)}</text>')
    out.append(f'<line x1="{x_left}" y1="{base}" x2="{x_right}" y2="{base}" class="axis"/>')
    return "".join(out)


def _runs(points: list[Point], ok: Callable[[Point], bool]) -> Iterator[list[Point]]:
    """Maximal runs of consecutive points for which `ok` holds."""
    run: list[Point] = []
    for p in points:
        if ok(p):
            run.append(p)
            continue
        if run:
            yield run
        run = []
    if run:
        yield run


def _banded(p: Point) -> bool:
    return not p.small and p.lo is not None and p.hi is not None


def _bands(scale: Scale, s: Series) -> list[str]:
    out = []
    for run in _runs(s.points, _banded):
        if len(run) < 2:
            continue
        upper = [f"{scale.px(p.x):.1f},{scale.py(p.hi):.1f}" for p in run]
        lower = [f"{scale.px(p.x):.1f},{scale.py(p.lo):.1f}" for p in reversed(run)]
        out.append(f'<polygon points="{" ".join(upper + lower)}" fill="{s.color}" '
                   f'fill-opacity="0.15" stroke="none" class="band" '
                   f'data-series="{escape(s.name)}"/>')
    return out


def _lines(scale: Scale, s: Series) -> list[str]:
    out = []
    for run in _runs(s.points, lambda p: p.value is not None and not p.small):
        if len(run) < 2:
            continue
        coords = " ".join(f"{scale.px(p.x):.1f},{scale.py(p.value):.1f}" for p in run)
        keys = " ".join(p.key for p in run)
        out.append(f'<polyline points="{coords}" fill="none" stroke="{s.color}" '
                   f'stroke-width="2" class="line" data-series="{escape(s.name)}" '
                   f'data-keys="{escape(keys)}"/>')
    return out


def _dots(scale: Scale, s: Series) -> list[str]:
    return [_dot(scale, s, p) for p in s.points if p.value is not None]


def _dot(scale: Scale, s: Series, p: Point) -> str:
    x, y = scale.px(p.x), scale.py(p.value)
    attrs = (f'class="point{" small" * p.small}" data-series="{escape(s.name)}" '
             f'data-x="{escape(p.key)}" data-value="{p.value!r}"')
    title = f"<title>{escape(p.tooltip)}</title>"
    if p.small and p.value > scale.y1:
        return (f'<path d="M{x:.1f},{y:.1f} l-5,9 h10 z" fill="#fff" stroke="{s.color}" '
                f'stroke-width="1.5" {attrs} data-offscale="true">{title}</path>')
    if p.small:
        return (f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3.5" fill="#fff" stroke="{s.color}" '
                f'stroke-width="1.5" {attrs}>{title}</circle>')
    bar = ""
    if p.lo is not None and p.hi is not None:
        bar = (f'<line x1="{x:.1f}" y1="{scale.py(p.lo):.1f}" x2="{x:.1f}" '
               f'y2="{scale.py(p.hi):.1f}" stroke="{s.color}" class="errorbar"/>')
    return (f'{bar}<circle cx="{x:.1f}" cy="{y:.1f}" r="3.5" fill="{s.color}" {attrs}>'
            f"{title}</circle>")


def _markers(scale: Scale, markers: list[Marker]) -> list[str]:
    out = []
    for i, m in enumerate(markers):
        if not scale.x0 <= m.x <= scale.x1:
            continue
        x = scale.px(m.x)
        label_y = TOP - 4 + 10 * (i % 2)
        left = x > WIDTH - RIGHT - LABEL_ROOM
        text_x, anchor = (x - 3, "end") if left else (x + 3, "start")
        out.append(f'<g class="marker" data-label="{escape(m.label)}" data-x="{m.x!r}">'
                   f'<title>{escape(m.tooltip)}</title>'
                   f'<line x1="{x:.1f}" y1="{TOP}" x2="{x:.1f}" y2="{HEIGHT - BOTTOM}" '
                   'stroke="#555" stroke-dasharray="4 3"/>'
                   f'<text x="{text_x:.1f}" y="{label_y}" text-anchor="{anchor}" '
                   f'class="marker-label">{escape(m.label)}</text></g>')
    return out


def _legend(series: list[Series]) -> str:
    out, x = [], WIDTH - RIGHT
    for s in reversed(series):
        x -= 7 * len(s.name) + 26
        out.append(f'<rect x="{x}" y="7" width="12" height="12" fill="{s.color}"/>'
                   f'<text x="{x + 16}" y="17" class="legend">{escape(s.name)}</text>')
    return "".join(out)
