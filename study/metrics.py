"""Exact scorers for pictures of the world, measured from pixels.

Every picture is taken in [0, 1] (``to_unit``). Each pixel is read as the nearest
colour of the world's palette (``world.PALETTE``) when it lies within
``COLOUR_TOLERANCE`` of it, and as "unreadable" otherwise.

- ``context_alignment``: the fraction of the outer ring of pixels (where objects
  never are) that shows the prompt's background. This is the text alignment of a
  personalized prompt such as "sks square on beach".
- ``subject_fidelity``: how well the best-fitting square, over every place and
  size, shows the subject: the pixels that show the subject's colour where the
  subject has it (magenta and cyan quadrants), divided by the square's pixels plus
  every magenta or cyan pixel outside it. 1 is the subject and nothing else; a
  plain object scores at most 0.5, a larger checkered blob less than 1.
- ``pattern_fidelity``: the same without the outside term: whether the subject's
  pattern is there at all, however much else is painted in its colours.
- ``prompt_accuracy``: whether a picture shows the shape, colour and background
  of a prompt without the subject (how well the base model follows text, and what
  fine-tuning did to that).
- ``diversity``: mean pairwise RMS pixel distance among pictures of one prompt.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

from . import world

COLOUR_TOLERANCE = 0.3
N_BACKGROUNDS = len(world.BACKGROUNDS)
N_COLOURS = len(world.COLOURS)
SUBJECT_MAIN, SUBJECT_SECOND = (N_BACKGROUNDS + list(world.COLOURS).index(c) for c in world.SUBJECT_COLOURS)
UNREADABLE = -1
COLOUR_SHARE = 0.25  # a prompt's colour is shown when it covers at least this share of the object


def to_unit(images: Tensor) -> Tensor:
    """Model output in [-1, 1] as pictures in [0, 1]."""
    return ((images + 1) / 2).clamp(0, 1)


def palette_index(images: Tensor) -> Tensor:
    """(N, H, W) index into ``world.PALETTE`` of each pixel, or ``UNREADABLE``."""
    dist = torch.cdist(images.permute(0, 2, 3, 1).reshape(-1, 3), world.PALETTE)
    best, idx = dist.min(dim=1)
    idx = torch.where(best < COLOUR_TOLERANCE, idx, torch.full_like(idx, UNREADABLE))
    return idx.view(images.shape[0], *images.shape[2:])


def _ring() -> Tensor:
    ring = torch.ones(world.RES, world.RES, dtype=torch.bool)
    ring[world.MARGIN:-world.MARGIN, world.MARGIN:-world.MARGIN] = False
    return ring


RING = _ring()


def context_alignment(images: Tensor, background: Tensor) -> Tensor:
    """(N,) fraction of ring pixels that show ``background`` (1-based background token ids)."""
    idx = palette_index(images)[:, RING]
    return (idx == (background.view(-1, 1) - 1)).float().mean(dim=1)


def _placements(sizes: range) -> tuple[Tensor, Tensor, Tensor]:
    x0, y0, s = zip(*[(x, y, s) for s in sizes for x, y in itertools.product(range(world.RES - s + 1), repeat=2)], strict=True)
    return torch.tensor(x0), torch.tensor(y0), torch.tensor(s)


def _subject_templates() -> tuple[Tensor, Tensor]:
    """For every placement of the subject (sizes 6 to 10): (pixels expecting its main colour, its second), (K, H*W)."""
    x0, y0, s = _placements(range(6, 11))
    square = world.shape_masks(torch.full_like(x0, world.SHAPES.index("square")), x0, y0, s)
    second = world.second_colour_mask(torch.full_like(x0, world.CHECKER), x0, y0, s)
    return (square & ~second).flatten(1).float(), (square & second).flatten(1).float()


_MAIN, _SECOND = _subject_templates()


def pattern_fidelity(images: Tensor) -> Tensor:
    """(N,) best over placements of the fraction of the square's pixels that show the subject's colour there."""
    idx = palette_index(images).flatten(1)
    hits = (idx == SUBJECT_MAIN).float() @ _MAIN.T + (idx == SUBJECT_SECOND).float() @ _SECOND.T
    return (hits / (_MAIN + _SECOND).sum(dim=1)).max(dim=1).values


def subject_fidelity(images: Tensor) -> Tensor:
    """(N,) best over placements of: pixels right / (square's pixels + subject-coloured pixels outside it)."""
    idx = palette_index(images).flatten(1)
    main, second = (idx == SUBJECT_MAIN).float(), (idx == SUBJECT_SECOND).float()
    hits = main @ _MAIN.T + second @ _SECOND.T
    square = _MAIN + _SECOND
    outside = (main + second).sum(dim=1, keepdim=True) - (main + second) @ square.T
    return (hits / (square.sum(dim=1) + outside)).max(dim=1).values


def _shape_templates() -> tuple[Tensor, Tensor]:
    """Masks (K, H*W) of every shape at every place and size 4 to 10, and each one's 1-based shape id (K,)."""
    x0, y0, s = _placements(range(4, 11))
    masks, ids = [], []
    for shape in range(1, len(world.SHAPES)):
        masks.append(world.shape_masks(torch.full_like(x0, shape), x0, y0, s).flatten(1))
        ids.append(torch.full_like(x0, shape))
    return torch.cat(masks).float(), torch.cat(ids)


_SHAPE_MASKS, _SHAPE_IDS = _shape_templates()


def prompt_accuracy(images: Tensor, tokens: Tensor) -> Tensor:
    """(N, 3) whether each picture shows its prompt's shape, colour and background (``tokens`` (N, 4)).

    An empty slot asks for nothing and counts as shown.

    Background: the majority palette colour of the ring. The object: the pixels
    inside the ring that show an object colour. Colour: the prompted one covers at
    least ``COLOUR_SHARE`` of the object (patterns have two colours). Shape: the
    shape template with the best intersection over union with the object.
    """
    idx = palette_index(images)
    ring = idx[:, RING]
    bg_votes = torch.stack([(ring == b).sum(dim=1) for b in range(N_BACKGROUNDS)], dim=1)
    background_ok = (bg_votes.argmax(dim=1) + 1 == tokens[:, 3]) & (bg_votes.max(dim=1).values > 0)
    obj = ((idx >= N_BACKGROUNDS) & ~RING).flatten(1)
    size = obj.sum(dim=1)
    wanted = (idx.flatten(1) == (N_BACKGROUNDS + tokens[:, 2:3] - 1)) & obj
    colour_ok = (wanted.sum(dim=1) >= COLOUR_SHARE * size) & (size > 0)
    flat = obj.float()
    inter = flat @ _SHAPE_MASKS.T
    union = flat.sum(dim=1, keepdim=True) + _SHAPE_MASKS.sum(dim=1) - inter
    best = _SHAPE_IDS[(inter / union.clamp(min=1)).argmax(dim=1)]
    shape_ok = (best == tokens[:, 1]) & (size > 0)
    asked = tokens[:, 1:] > 0
    return torch.stack([shape_ok, colour_ok, background_ok], dim=1) | ~asked


def diversity(images: Tensor) -> float:
    """Mean pairwise RMS distance between pictures (N >= 2) of one prompt, in [0, 1]."""
    flat = images.flatten(1)
    dist = torch.cdist(flat, flat) / flat.shape[1] ** 0.5
    n = flat.shape[0]
    return float(dist.sum() / (n * (n - 1)))
