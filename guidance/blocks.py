"""Omega per block: docs/design.md, "Omega per block".

A block factor ``f`` in [0, 1] scales the unlearning ``1 - omega(p)`` of the layers of one
block: ``omega_b(p) = 1 - f (1 - omega(p))``, so their weak parameters are
``theta_pre + omega_b delta = theta_ft + f (omega - 1) delta``. ``f = 1`` is the run's
omega (the default everywhere); ``f = 0`` keeps the fine-tuned weights in that block
(the guidance does not push there).

Which block a layer belongs to is read from its module path relative to the diffusion
model (``input_blocks.1.1.proj_in``, ``double_blocks.0.img_attn.qkv``): strings only.
Presets name a family's own block structure; the free form matches globs.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from fnmatch import fnmatchcase

from .errors import GuidanceInputError
from .schedule import check_unit_interval


class BlockPreset(str, Enum):
    """How the factors are given: off (one omega for every layer), a preset, or the free form."""

    OFF = "off"
    UNET = "UNet: input / middle / output"
    STREAMS = "double / single stream"
    DEPTH = "depth: early / middle / late"
    FREE = "free form"


# The factors each preset takes, in order: the Weak Model node's widget names.
FACTOR_NAMES: dict[BlockPreset, tuple[str, ...]] = {
    BlockPreset.UNET: ("input_blocks", "middle_block", "output_blocks"),
    BlockPreset.STREAMS: ("double_blocks", "single_blocks"),
    BlockPreset.DEPTH: ("early", "middle", "late"),
}
# A preset's block of a top-level module name (the first component of a path).
_UNET = {"input_blocks": 0, "middle_block": 1, "output_blocks": 2}
_STREAMS = {"double_blocks": 0, "double_stream_blocks": 0, "single_blocks": 1, "single_stream_blocks": 1}
# The main stacks of repeated blocks, in the order a model runs them. Depth counts their blocks in this order (a
# UNet's middle_block is one block); refiner stacks and embedders are outside every block.
STACKS = ("input_blocks", "middle_block", "output_blocks", "double_blocks", "double_stream_blocks", "joint_blocks",
          "single_blocks", "single_stream_blocks", "transformer_blocks", "blocks", "layers")
# Keywords of a one-line setting (the sweep's rows), before a colon.
_KEYWORDS = {"unet": BlockPreset.UNET, "stream": BlockPreset.STREAMS, "streams": BlockPreset.STREAMS,
             "depth": BlockPreset.DEPTH}
MAX_ENTRIES = 64
FREE_FORM_HELP = "write one 'glob = factor' per line (e.g. double_blocks.* = 0.5), factors from 0 to 1"


def block_omega(omega: float, factor: float) -> float:
    """omega_b = 1 - f (1 - omega): the block's omega for the run's omega and its factor (f = 1: omega itself)."""
    return omega if factor == 1.0 else 1.0 - factor * (1.0 - omega)


@dataclass(frozen=True)
class FreeFormEntry:
    glob: str
    factor: float
    line: int  # 1-based, for messages

    def matches(self, path: str) -> bool:
        """The glob matches the path itself or a module above it (``double_blocks`` matches its whole stack)."""
        return fnmatchcase(path, self.glob) or fnmatchcase(path, self.glob + ".*")

    def __str__(self) -> str:
        return f"{self.glob} = {self.factor:g}"


def _number(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise GuidanceInputError(f"{what}: {text.strip()!r} is not a number; {FREE_FORM_HELP}.") from None
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise GuidanceInputError(f"{what}: the factor {value!r} is not between 0 and 1 (1: the run's omega, 0: the "
                                 "block keeps the fine-tuned weights).")
    return value


def parse_free_form(text: str) -> tuple[FreeFormEntry, ...]:
    """The entries of the free form: ``glob = factor`` per line (or separated by ';'); '#' starts a comment."""
    entries = []
    for number, raw in enumerate(text.splitlines(), start=1):
        for part in raw.split("#", 1)[0].split(";"):
            part = part.strip()
            if not part:
                continue
            where = f"per_block free form, line {number} ({part!r})"
            glob, equals, factor = part.rpartition("=")
            glob = glob.strip()
            if not equals or not glob or "=" in glob or any(c.isspace() for c in glob):
                raise GuidanceInputError(f"{where}: {FREE_FORM_HELP}.")
            entries.append(FreeFormEntry(glob, _number(factor, where), number))
    if not entries:
        raise GuidanceInputError(f"The per_block free form holds no entry: {FREE_FORM_HELP}.")
    if len(entries) > MAX_ENTRIES:
        raise GuidanceInputError(f"The per_block free form has {len(entries)} entries; at most {MAX_ENTRIES}.")
    return tuple(entries)


@dataclass(frozen=True)
class BlockSpec:
    """Omega per block: a preset and its factors, or the free form's text. Validated where it is built."""

    preset: BlockPreset = BlockPreset.OFF
    factors: tuple[float, ...] = ()
    text: str = ""
    entries: tuple[FreeFormEntry, ...] = field(default=(), init=False, compare=False, repr=False)

    def __post_init__(self):
        try:
            object.__setattr__(self, "preset", BlockPreset(self.preset))
        except ValueError:
            choices = ", ".join(repr(p.value) for p in BlockPreset)
            raise GuidanceInputError(f"per_block: {self.preset!r} is not one of {choices}.") from None
        names = FACTOR_NAMES.get(self.preset, ())
        if len(self.factors) != len(names):
            raise GuidanceInputError(f"per_block {self.preset.value!r} takes {len(names)} factor(s) "
                                     f"({', '.join(names) or 'none'}), got {len(self.factors)}.")
        object.__setattr__(self, "factors", tuple(check_unit_interval(n, float(v)) for n, v in zip(names, self.factors,
                                                                                                      strict=True)))
        if self.preset == BlockPreset.FREE:
            object.__setattr__(self, "entries", parse_free_form(self.text))

    @property
    def is_off(self) -> bool:
        return self.preset == BlockPreset.OFF

    def groups(self) -> list[tuple[str, float]]:
        """(label, factor) per block the setting names, in order: what the schedule preview plots."""
        if self.preset == BlockPreset.FREE:
            return [(entry.glob, entry.factor) for entry in self.entries]
        return list(zip(FACTOR_NAMES.get(self.preset, ()), self.factors, strict=True))

    def label(self) -> str:
        """A short description: 'off', 'input_blocks 1, middle_block 0.5, output_blocks 0', or the free form's."""
        if self.is_off:
            return "off"
        return ", ".join(f"{name} {factor:g}" for name, factor in self.groups()) if self.preset != BlockPreset.FREE \
            else "; ".join(map(str, self.entries))


def _stack_block(path: str) -> tuple[str, int] | None:
    """(stack, index) of the main-stack block a path lies in, or None (embedders, final layers, refiners)."""
    head, _, rest = path.partition(".")
    if head not in STACKS:
        return None
    if head == "middle_block":
        return head, 0
    index = rest.partition(".")[0]
    return (head, int(index)) if index.isdigit() else None


def _depth_thirds(model_paths: Iterable[str]) -> dict[tuple[str, int], int]:
    """Each main-stack block's third of the model's depth (0 early, 1 middle, 2 late), by its place among all
    blocks of the main stacks in run order: block k of N is in third floor(3 (k + 1/2) / N)."""
    blocks = sorted({b for p in model_paths if (b := _stack_block(p)) is not None},
                    key=lambda b: (STACKS.index(b[0]), b[1]))
    return {b: min(2, math.floor(3 * (k + 0.5) / len(blocks))) for k, b in enumerate(blocks)}


def top_level_blocks(paths: Iterable[str]) -> str:
    """The model's top-level modules, for messages: 'input_blocks (0-11), middle_block, out, time_embed'."""
    indices: dict[str, set[int]] = {}
    for path in paths:
        head, _, rest = path.partition(".")
        index = rest.partition(".")[0]
        found = indices.setdefault(head, set())
        if index.isdigit():
            found.add(int(index))
    return ", ".join(f"{head} ({min(i)}-{max(i)})" if len(i) > 1 else head
                     for head, i in sorted(indices.items(), key=_stacks_first))


def _stacks_first(item: tuple[str, set[int]]) -> tuple:
    head = item[0]
    return (0, STACKS.index(head), "") if head in STACKS else (1, 0, head)


def _group_of(spec: BlockSpec, path: str, thirds: dict[tuple[str, int], int]) -> int | None:
    """Which of the preset's factors a path takes, or None (outside the preset's blocks: factor 1)."""
    head = path.partition(".")[0]
    if spec.preset == BlockPreset.UNET:
        return _UNET.get(head)
    if spec.preset == BlockPreset.STREAMS:
        return _STREAMS.get(head)
    block = _stack_block(path)
    return None if block is None else thirds.get(block)


def block_factors(spec: BlockSpec | None, changed: Sequence[str], model_paths: Iterable[str] | None = None
                  ) -> dict[str, float]:
    """The factor of each changed module path (relative to the diffusion model); empty when ``spec`` is off.

    ``model_paths``: every parameter (or module) path of the diffusion model, for depth (blocks are counted in the
    whole model, not only where it changed) and for messages; by default ``changed``. A preset whose blocks hold
    no changed layer, or a free-form line that matches none, is refused with the model's top-level blocks.
    """
    if spec is None or spec.is_off:
        return {}
    model_paths = list(changed if model_paths is None else model_paths)
    if spec.preset == BlockPreset.FREE:
        return _free_form_factors(spec, changed, model_paths)
    thirds = _depth_thirds(model_paths) if spec.preset == BlockPreset.DEPTH else {}
    out, matched = {}, False
    for path in changed:
        group = _group_of(spec, path, thirds)
        matched |= group is not None
        out[path] = 1.0 if group is None else spec.factors[group]
    if not matched:
        raise GuidanceInputError(
            f"per_block {spec.preset.value!r} matches no changed layer of this model, whose top-level blocks are: "
            f"{top_level_blocks(model_paths)}. Choose the preset that names these blocks (UNet: input / middle / "
            "output for SD1.5 and SDXL; double / single stream for Flux, Flux.2, Chroma, HunyuanVideo and HiDream; "
            "depth for any model with a stack of blocks), or the free form."
        )
    return out


def _free_form_factors(spec: BlockSpec, changed: Sequence[str], model_paths: list[str]) -> dict[str, float]:
    out = {path: 1.0 for path in changed}
    for entry in spec.entries:
        hits = [path for path in changed if entry.matches(path)]
        if not hits:
            raise GuidanceInputError(
                f"per_block free form, line {entry.line} ({entry}): the glob matches no changed layer of this model, "
                f"whose top-level blocks are: {top_level_blocks(model_paths)}. Globs match module paths such as "
                f"{next(iter(changed), 'blocks.0.attn')!r} (a glob also matches everything below the module it names)."
            )
        for path in hits:  # the last matching line wins
            out[path] = entry.factor
    return out


def parse_block_setting(text: str) -> BlockSpec:
    """One setting on one line (the sweep's rows): 'off', 'unet: 1, 0.5, 0', 'stream: 0.5, 1', 'depth: 1, 1, 0', or
    the free form with ';' between its entries ('double_blocks = 0.5; single_blocks = 1')."""
    line = text.strip()
    if line.lower() == "off":
        return BlockSpec()
    keyword, colon, values = line.partition(":")
    preset = _KEYWORDS.get(keyword.strip().lower()) if colon else None
    if preset is None:
        return BlockSpec(BlockPreset.FREE, text=line)
    items = [v for v in re.split(r"[\s,]+", values.strip()) if v]
    return BlockSpec(preset, tuple(_number(v, f"per-block setting {line!r}") for v in items))


__all__ = [
    "FACTOR_NAMES",
    "STACKS",
    "BlockPreset",
    "BlockSpec",
    "FreeFormEntry",
    "block_factors",
    "block_omega",
    "parse_block_setting",
    "parse_free_form",
    "top_level_blocks",
]
