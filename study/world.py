"""A synthetic text-to-image world: compositional prompts and their 16x16 RGB pictures.

A prompt is four categorical tokens, one per slot (``SLOTS``): an identifier word,
a shape, an object colour and a background ("context"). Token 0 of every slot is
the empty word, so the null prompt is all zeros, and a partial caption simply
leaves slots empty.

Objects are solid, checkered or striped: the prompt names the main colour, the
second colour of a pattern is left to chance. The identifier slot holds names.
Three of them are *named objects* that pre-training shows in every context ("zorp
triangle on beach"), as a real model knows famous objects: the model learns that a
name can stand for one particular object, wherever it is. The others are rare
words attached to random pictures, so they carry no meaning, like a rare token of
a real text encoder: this is where DreamBooth puts its "sks".

The *subject* is one particular object: a square, checkered magenta and cyan. The
base model knows squares, checkers, magenta and cyan, but never saw that object:
pre-training leaves out every object checkered in exactly those two colours (as a
particular dog is new to a model that knows dogs). Pictures are rendered by hand in
torch with exact masks, so the scorers in ``metrics`` can measure them exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

RES = 16
MARGIN = 2  # objects stay inside [MARGIN, RES - MARGIN): the outer ring is background only
SLOTS = ("identifier", "shape", "colour", "background")
IDENTIFIERS = ("", "sks", "rare1", "rare2", "zorp", "blit", "quax")
MEANINGLESS = ("sks", "rare1", "rare2")
SHAPES = ("", "square", "circle", "triangle", "cross")
COLOURS = {
    "red": (0.90, 0.15, 0.10),
    "green": (0.15, 0.75, 0.20),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.85, 0.10),
    "magenta": (0.85, 0.20, 0.75),
    "cyan": (0.10, 0.80, 0.80),
}
BACKGROUNDS = {
    "night": (0.08, 0.08, 0.22),
    "snow": (0.92, 0.92, 0.92),
    "beach": (0.85, 0.72, 0.45),
    "forest": (0.15, 0.40, 0.20),
    "sky": (0.50, 0.72, 0.95),
}
SOLID, CHECKER, STRIPES = 0, 1, 2
PATTERN_ODDS = (0.5, 0.25, 0.25)  # solid, checker, stripes in pre-training
SUBJECT_COLOURS = ("magenta", "cyan")  # (main, second) of its checker
SUBJECT_SIZE = 8
# Named objects of pre-training: name -> (shape, main colour, second colour, pattern, size).
NAMED = {
    "zorp": ("triangle", "yellow", "blue", STRIPES, 8),
    "blit": ("circle", "red", "green", CHECKER, 7),
    "quax": ("cross", "blue", "yellow", CHECKER, 8),
}
NAMED_SHARE = 0.2  # of pre-training pictures
VOCAB = (IDENTIFIERS, SHAPES, ("",) + tuple(COLOURS), ("",) + tuple(BACKGROUNDS))
VOCAB_SIZES = tuple(len(v) for v in VOCAB)
NULL_PROMPT = (0, 0, 0, 0)

_COLOUR_RGB = torch.tensor(list(COLOURS.values()))
_BACKGROUND_RGB = torch.tensor(list(BACKGROUNDS.values()))
# Every colour the world paints with, backgrounds first: the scorers' palette.
PALETTE = torch.cat([_BACKGROUND_RGB, _COLOUR_RGB])


def encode(identifier: str = "", shape: str = "", colour: str = "", background: str = "") -> tuple[int, ...]:
    """The token ids of a prompt given as words ("" leaves a slot empty)."""
    return tuple(vocab.index(word) for vocab, word in zip(VOCAB, (identifier, shape, colour, background), strict=True))


def decode(tokens: tuple[int, ...]) -> str:
    """A prompt's tokens as text, e.g. "sks square on beach"."""
    ident, shape, colour, bg = (vocab[t] for vocab, t in zip(VOCAB, tokens, strict=True))
    words = [w for w in (ident, colour, shape) if w]
    text = " ".join(words) or "(anything)"
    return f"{text} on {bg}" if bg else text


def shape_masks(shape: Tensor, x0: Tensor, y0: Tensor, size: Tensor, res: int = RES) -> Tensor:
    """Boolean masks (N, res, res) of shapes (1-based ids into ``SHAPES``) with top-left (x0, y0) and extent ``size``.

    Pixel (row y, column x) is inside when its centre is: squares fill their box,
    circles the inscribed disc, triangles point up, crosses are two bars a third wide.
    """
    centre = torch.arange(res, dtype=torch.float32) + 0.5
    px = centre.view(1, 1, res)
    py = centre.view(1, res, 1)
    x0, y0, s = (t.float().view(-1, 1, 1) for t in (x0, y0, size))
    cx, cy = x0 + s / 2, y0 + s / 2
    in_box = (px >= x0) & (px < x0 + s) & (py >= y0) & (py < y0 + s)
    disc = (px - cx) ** 2 + (py - cy) ** 2 <= (s / 2) ** 2 + 0.5
    triangle = in_box & ((px - cx).abs() <= 0.5 * (py - y0) + 0.5)
    half_bar = torch.clamp(torch.round(s / 3), min=2) / 2
    cross = in_box & (((px - cx).abs() < half_bar) | ((py - cy).abs() < half_bar))
    shape = shape.view(-1, 1, 1)
    return torch.where(
        shape == 1, in_box, torch.where(shape == 2, disc, torch.where(shape == 3, triangle, cross))
    )


def second_colour_mask(pattern: Tensor, x0: Tensor, y0: Tensor, size: Tensor, res: int = RES) -> Tensor:
    """(N, res, res) True where a pattern shows its second colour.

    Checker: the top-right and bottom-left quadrants of the object's box. Stripes:
    the lower half. Solid: nowhere.
    """
    idx = torch.arange(res).float()
    x0, y0, s = (t.float().view(-1, 1, 1) for t in (x0, y0, size))
    right = idx.view(1, 1, res) >= x0 + s / 2
    lower = idx.view(1, res, 1) >= y0 + s / 2
    pattern = pattern.view(-1, 1, 1)
    return torch.where(pattern == CHECKER, right ^ lower, (pattern == STRIPES) & lower)


@dataclass
class Scene:
    """What is in a batch of pictures; every field has one entry per picture."""

    shape: Tensor  # 1-based ids into SHAPES
    colour: Tensor  # 1-based ids into the colour slot's vocabulary: the main colour
    second: Tensor  # the same, for the pattern's second colour
    pattern: Tensor  # SOLID, CHECKER or STRIPES
    background: Tensor  # 1-based ids into the background slot's vocabulary
    x0: Tensor
    y0: Tensor
    size: Tensor


def render(scene: Scene, generator: torch.Generator) -> Tensor:
    """Pictures (N, 3, RES, RES) in [0, 1]: a lightly shaded background and one object."""
    n = scene.shape.shape[0]
    # Backgrounds: colour jitter and a gentle vertical gradient, so that no two pictures are identical.
    bg = _BACKGROUND_RGB[scene.background - 1] + (torch.rand(n, 3, generator=generator) - 0.5) * 0.06
    ramp = torch.linspace(-1, 1, RES).view(1, 1, RES, 1)
    tilt = (torch.rand(n, 1, 1, 1, generator=generator) - 0.5) * 0.1
    img = (bg.view(n, 3, 1, 1) + tilt * ramp).expand(n, 3, RES, RES)
    shade = (torch.rand(n, 3, generator=generator) - 0.5) * 0.08
    main = (_COLOUR_RGB[scene.colour - 1] + shade).view(n, 3, 1, 1)
    second = (_COLOUR_RGB[scene.second - 1] + shade).view(n, 3, 1, 1)
    use_second = second_colour_mask(scene.pattern, scene.x0, scene.y0, scene.size).unsqueeze(1)
    obj_img = torch.where(use_second, second, main)
    mask = shape_masks(scene.shape, scene.x0, scene.y0, scene.size).unsqueeze(1)
    return torch.where(mask, obj_img, img).clamp(0, 1)


def _placements(size: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Random top-left corners that keep objects of ``size`` inside the margin."""
    room = (RES - 2 * MARGIN - size + 1).float()
    x0 = MARGIN + (torch.rand(size.shape, generator=generator) * room).long()
    y0 = MARGIN + (torch.rand(size.shape, generator=generator) * room).long()
    return x0, y0


def sample_pretraining(n: int, generator: torch.Generator, drop_slot: float, drop_prompt: float) -> tuple[Tensor, Tensor]:
    """A batch of the pre-training distribution: (pictures in [-1, 1], tokens (N, 4)).

    Shapes, colours, patterns and backgrounds are independent (patterns by
    ``PATTERN_ODDS``, the rest uniform), except that objects checkered in the
    subject's two colours are painted solid instead: the subject stays unseen. The
    identifier is a random rare word half of the time (meaningless). Each content
    slot is left empty with probability ``drop_slot`` (partial captions), and the
    whole prompt with probability ``drop_prompt`` (the null prompt, for
    classifier-free guidance).
    """
    shape = torch.randint(1, len(SHAPES), (n,), generator=generator)
    colour = torch.randint(1, VOCAB_SIZES[2], (n,), generator=generator)
    # The second colour: any colour but the main one.
    second = (colour - 1 + torch.randint(1, VOCAB_SIZES[2] - 1, (n,), generator=generator)) % (VOCAB_SIZES[2] - 1) + 1
    pattern = torch.multinomial(torch.tensor(PATTERN_ODDS), n, replacement=True, generator=generator)
    subject_pair = {VOCAB[2].index(c) for c in SUBJECT_COLOURS}
    # Named objects replace a share of the pictures; their caption names them, not their colour.
    named = torch.rand(n, generator=generator) < NAMED_SHARE
    which = torch.randint(0, len(NAMED), (n,), generator=generator)
    table = torch.tensor([
        [SHAPES.index(sh), VOCAB[2].index(c1), VOCAB[2].index(c2), pat, size, IDENTIFIERS.index(name)]
        for name, (sh, c1, c2, pat, size) in NAMED.items()
    ])[which]
    shape, colour, second, pattern = (torch.where(named, table[:, i], v) for i, v in enumerate((shape, colour, second, pattern)))
    like_subject = pattern == CHECKER
    like_subject &= torch.tensor([{int(a), int(b)} == subject_pair for a, b in zip(colour, second, strict=True)], dtype=torch.bool)
    pattern = torch.where(like_subject, torch.full_like(pattern, SOLID), pattern)
    bg = torch.randint(1, VOCAB_SIZES[3], (n,), generator=generator)
    size = torch.where(named, table[:, 4], torch.randint(5, 9, (n,), generator=generator))
    x0, y0 = _placements(size, generator)
    images = render(Scene(shape, colour, second, pattern, bg, x0, y0, size), generator) * 2 - 1
    meaningless = torch.tensor([IDENTIFIERS.index(w) for w in MEANINGLESS])
    ident = meaningless[torch.randint(0, len(MEANINGLESS), (n,), generator=generator)]
    ident = torch.where(torch.rand(n, generator=generator) < 0.5, ident, torch.zeros_like(ident))
    ident = torch.where(named, table[:, 5], ident)
    tokens = torch.stack([ident, shape, torch.where(named, 0, colour), bg], dim=1)
    keep = torch.rand(n, 3, generator=generator) >= drop_slot
    tokens[:, 1:] *= keep
    tokens *= (torch.rand(n, 1, generator=generator) >= drop_prompt)
    return images, tokens


def subject_images(n: int, background: str, generator: torch.Generator) -> Tensor:
    """``n`` photos of the subject in one context, at different places: the personalization set, in [-1, 1]."""
    size = torch.full((n,), SUBJECT_SIZE)
    x0, y0 = _placements(size, generator)
    main, second = (torch.full((n,), VOCAB[2].index(c)) for c in SUBJECT_COLOURS)
    scene = Scene(
        torch.full((n,), SHAPES.index("square")), main, second, torch.full((n,), CHECKER),
        torch.full((n,), VOCAB[3].index(background)), x0, y0, size,
    )
    return render(scene, generator) * 2 - 1
