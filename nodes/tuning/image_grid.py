"""A grid of IMAGE cells with labelled rows and columns, for the sweep.

The cells are pasted as they are (the grid holds exact copies of the images); only
the labels in the margins are drawn, with Pillow's default font (which ComfyUI's
Pillow ships), black on white.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image, ImageDraw, ImageFont

MIN_FONT, MAX_FONT = 10, 48


@dataclass(frozen=True)
class GridLayout:
    """Pixel geometry of a grid: margins left and top, then ``rows`` x ``cols`` cells with ``gap`` between them."""

    rows: int
    cols: int
    cell_height: int
    cell_width: int
    left: int
    top: int
    gap: int

    @property
    def height(self) -> int:
        return self.top + self.rows * self.cell_height + (self.rows - 1) * self.gap

    @property
    def width(self) -> int:
        return self.left + self.cols * self.cell_width + (self.cols - 1) * self.gap

    def cell(self, row: int, col: int) -> tuple[int, int]:
        """(y, x) of the top-left pixel of a cell."""
        return self.top + row * (self.cell_height + self.gap), self.left + col * (self.cell_width + self.gap)


def label_font(cell_height: int, cell_width: int, col_labels: Sequence[str] = ()):
    """Pillow's default font, sized to a tenth of the cells (10 to 48 px), smaller if a column label is wider than its cell."""
    size = max(MIN_FONT, min(MAX_FONT, round(min(cell_height, cell_width) / 10)))
    font = ImageFont.load_default(size=size)
    while size > MIN_FONT and any(_text_size(label, font)[0] > cell_width - 2 for label in col_labels):
        size -= 1
        font = ImageFont.load_default(size=size)
    return font


def grid_layout(rows: int, cols: int, cell_height: int, cell_width: int, row_labels: Sequence[str],
                col_labels: Sequence[str], font) -> GridLayout:
    """Margins just wide enough for the labels, with half a line of padding around them."""
    line = _text_size("Ag0.9", font)[1]
    pad = max(2, line // 2)
    left = max(_text_size(label, font)[0] for label in row_labels) + 2 * pad
    top = max(_text_size(label, font)[1] for label in col_labels) + 2 * pad
    gap = max(2, round(min(cell_height, cell_width) / 64))
    return GridLayout(rows, cols, cell_height, cell_width, left, top, gap)


def labelled_grid(cells: Sequence[torch.Tensor], row_labels: Sequence[str], col_labels: Sequence[str]) -> tuple[torch.Tensor, GridLayout]:
    """Cells ([H, W, C] IMAGE tensors, row-major) in a grid with ``row_labels`` left and ``col_labels`` on top.

    Returns the grid as an [H, W, C] tensor of the cells' dtype, and its layout.
    """
    rows, cols = len(row_labels), len(col_labels)
    if len(cells) != rows * cols:
        raise ValueError(f"{len(cells)} cells for a {rows} x {cols} grid")
    cell_height, cell_width, channels = cells[0].shape
    font = label_font(cell_height, cell_width, col_labels)
    layout = grid_layout(rows, cols, cell_height, cell_width, row_labels, col_labels, font)

    ink = Image.new("L", (layout.width, layout.height), 0)
    draw = ImageDraw.Draw(ink)
    for row, label in enumerate(row_labels):
        y, _ = layout.cell(row, 0)
        draw.text((layout.left // 2, y + cell_height // 2), label, fill=255, font=font, anchor="mm")
    for col, label in enumerate(col_labels):
        _, x = layout.cell(0, col)
        draw.text((x + cell_width // 2, layout.top // 2), label, fill=255, font=font, anchor="mm")
    coverage = torch.frombuffer(bytearray(ink.tobytes()), dtype=torch.uint8).reshape(layout.height, layout.width)
    coverage = coverage.to(cells[0].dtype) / 255.0

    grid = (1.0 - coverage).unsqueeze(-1).expand(-1, -1, channels).clone()
    for index, cell in enumerate(cells):
        y, x = layout.cell(*divmod(index, cols))
        grid[y : y + cell_height, x : x + cell_width] = cell
    return grid, layout


def _text_size(text: str, font) -> tuple[int, int]:
    left, top, right, bottom = font.getbbox(text)
    return right - left, bottom - top
