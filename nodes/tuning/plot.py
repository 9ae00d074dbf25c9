"""A small line plot drawn with Pillow (which ComfyUI ships): panels stacked over one x axis.

Enough for the schedule preview: a title, per panel a header with a legend, y
gridlines with labels, one polyline with square markers per series, x tick labels.
``line_plot`` also returns where each value's marker was drawn, so that tests can
read the plotted series back.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

WHITE, BLACK, GRID, FRAME = (255, 255, 255), (0, 0, 0), (225, 225, 225), (120, 120, 120)
MARKER = 3  # half the side of a marker square, in pixels
MAX_X_TICKS = 12


@dataclass(frozen=True)
class Series:
    label: str
    values: tuple[float, ...]
    color: tuple[int, int, int]


@dataclass(frozen=True)
class Panel:
    """One plot area. ``y_range`` None fits the values (with 0 and 1 always in range)."""

    header: str
    series: tuple[Series, ...]
    y_range: tuple[float, float] | None = None


@dataclass(frozen=True)
class Plot:
    image: Image.Image
    # Per series label: the pixel (x, y) at the centre of each value's marker.
    points: dict[str, list[tuple[int, int]]]


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values (steps of 1, 2 or 5 times a power of ten) covering [lo, hi]."""
    raw = (hi - lo) / max(1, count)
    power = 10.0 ** math.floor(math.log10(raw)) if raw > 0 else 1.0
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(lo / step - 1e-9)
    return [round(k * step, 10) for k in range(first, math.floor(hi / step + 1e-9) + 1)]


def _fit(values: Sequence[float]) -> tuple[float, float]:
    lo, hi = min([0.0, *values]), max([1.0, *values])
    pad = 0.06 * (hi - lo)
    return lo - pad, hi + pad


def line_plot(title: str, x_ticks: Sequence[str], x_label: str, panels: Sequence[Panel],
              size: tuple[int, int] = (768, 512)) -> Plot:
    """Panels stacked top to bottom over the points 0..len(x_ticks)-1; ``x_ticks`` label them.

    ``title`` and the tick labels may hold several lines (newlines).
    """
    width, height = size
    small = ImageFont.load_default(size=13)
    image = Image.new("RGB", size, WHITE)
    draw = ImageDraw.Draw(image)
    lines = title.split("\n")
    large = _fitting_font(draw, lines, width - 20, largest=16)
    line_height = large.size + 4
    for i, line in enumerate(lines):
        draw.text((width // 2, 8 + i * line_height), line, fill=BLACK, font=large, anchor="ma")

    left, right = 62, width - 20
    top, header, gap, bottom_space = 14 + len(lines) * line_height, 22, 14, 62
    area = (height - top - bottom_space - len(panels) * header - (len(panels) - 1) * gap) // len(panels)
    count = len(x_ticks)
    inner = 10

    def x_of(i: int) -> int:
        if count == 1:
            return (left + right) // 2
        return round(left + inner + i * (right - left - 2 * inner) / (count - 1))

    points: dict[str, list[tuple[int, int]]] = {}
    y0 = top
    for panel in panels:
        _draw_header(draw, panel, left, right, y0, small)
        area_top, area_bottom = y0 + header, y0 + header + area
        lo, hi = panel.y_range or _fit([v for s in panel.series for v in s.values])

        def y_of(value: float, lo=lo, hi=hi, area_top=area_top, area_bottom=area_bottom) -> int:
            return round(area_bottom - inner - (value - lo) / (hi - lo) * (area_bottom - area_top - 2 * inner))

        for tick in nice_ticks(lo, hi):
            y = y_of(tick)
            if area_top <= y <= area_bottom:
                draw.line([(left, y), (right, y)], fill=GRID, width=1)
                draw.text((left - 6, y), f"{tick:g}", fill=BLACK, font=small, anchor="rm")
        for i in range(count):
            draw.line([(x_of(i), area_top), (x_of(i), area_bottom)], fill=GRID, width=1)
        draw.rectangle([(left, area_top), (right, area_bottom)], outline=FRAME, width=1)
        for series in panel.series:
            xy = [(x_of(i), y_of(v)) for i, v in enumerate(series.values)]
            if len(xy) > 1:
                draw.line(xy, fill=series.color, width=2)
            points[series.label] = xy
        for series in panel.series:  # markers over every line, so that each keeps its colour
            for x, y in points[series.label]:
                draw.rectangle([(x - MARKER, y - MARKER), (x + MARKER, y + MARKER)], fill=series.color)
        y0 = area_bottom + gap

    stride = math.ceil(count / MAX_X_TICKS)
    tick_top = y0 - gap + 6
    for i in range(0, count, stride):
        draw.multiline_text((x_of(i), tick_top), x_ticks[i], fill=BLACK, font=small, anchor="ma", align="center")
    draw.text(((left + right) // 2, height - 6), x_label, fill=BLACK, font=small, anchor="md")
    return Plot(image, points)


def _fitting_font(draw: ImageDraw.ImageDraw, lines: Sequence[str], width: int, largest: int):
    """The default font at the largest size (down to 10 px) at which every line fits in ``width``."""
    for size in range(largest, 9, -1):
        font = ImageFont.load_default(size=size)
        if all(draw.textlength(line, font=font) <= width for line in lines):
            return font
    return font


def _draw_header(draw: ImageDraw.ImageDraw, panel: Panel, left: int, right: int, y: int, font) -> None:
    """The panel's header at the left, its legend (a line sample and the label per series) at the right."""
    draw.text((left, y + 4), panel.header, fill=BLACK, font=font)
    x = right
    for series in reversed(panel.series):
        text_width = round(draw.textlength(series.label, font=font))
        x -= text_width
        draw.text((x, y + 4), series.label, fill=BLACK, font=font)
        draw.line([(x - 24, y + 11), (x - 6, y + 11)], fill=series.color, width=3)
        x -= 40
