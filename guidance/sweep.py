"""The value lists of a sweep over omega and lambda (and per-block settings): parsing, range checks, the cap on its
size.

Lists are typed by people into a text widget, so every problem is reported with
what was typed and how to write it instead.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from .blocks import BlockSpec, parse_block_setting
from .errors import GuidanceInputError

MAX_VALUES = 8  # per list: the grid's rows or columns
MAX_IMAGES = 64  # combinations times the latent batch size

_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_SEPARATORS = re.compile(r"[\s,;]+")
_EXAMPLE = "write numbers separated by commas, e.g. 0.3, 0.5, 0.7"


def value_problems(name: str, text: str, check: Callable[[str, float], float]) -> tuple[tuple[float, ...], list[str]]:
    """The numbers of a list like "0.3, 0.5, 0.7" that pass ``check(name, value)``, and every problem with the list.

    Commas, semicolons or spaces separate the numbers; at most ``MAX_VALUES`` of them, none twice. The problems
    are sentences without the closing full stop, in the order of the list; none when the list is good.
    """
    items = [item for item in _SEPARATORS.split(text.strip()) if item]
    if not items:
        return (), [f"{name} is empty: {_EXAMPLE}"]
    problems = []
    if len(items) > MAX_VALUES:
        problems.append(f"{name} has {len(items)} values; a sweep takes at most {MAX_VALUES} per list")
    values: list[float] = []
    for item in items:
        if not _NUMBER.fullmatch(item):
            problems.append(f"{name}: {item!r} is not a number: {_EXAMPLE}")
            continue
        try:
            value = check(name, float(item))
        except GuidanceInputError as error:
            problems.append(str(error).rstrip("."))
            continue
        if value in values:
            problems.append(f"{name} lists {value:g} twice: each value makes a row or column of the grid once")
            continue
        values.append(value)
    return tuple(values), problems


def parse_block_settings(text: str) -> list[BlockSpec]:
    """The per-block settings of a sweep, one per line (``blocks.parse_block_setting``: 'off', 'unet: 1, 0.5, 0',
    'stream: 0.5, 1', 'depth: 1, 1, 0', or free-form entries separated by ';'); at most ``MAX_VALUES``, none twice."""
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    if len(lines) > MAX_VALUES:
        raise GuidanceInputError(f"block_settings has {len(lines)} lines; a sweep takes at most {MAX_VALUES}.")
    settings: list[BlockSpec] = []
    for number, line in enumerate(lines, start=1):
        try:
            setting = parse_block_setting(line)
        except GuidanceInputError as error:
            raise GuidanceInputError(f"block_settings, setting {number} ({line!r}): {error}") from None
        if setting in settings:
            raise GuidanceInputError(f"block_settings lists {line!r} twice: each setting makes its rows once.")
        settings.append(setting)
    return settings


def parse_values(name: str, text: str, check: Callable[[str, float], float]) -> tuple[float, ...]:
    """The numbers of a list like "0.3, 0.5, 0.7" (see ``value_problems``); every problem at once is an error."""
    values, problems = value_problems(name, text, check)
    if problems:
        raise GuidanceInputError("; ".join(problems) + ".")
    return values


def sweep_combinations(omegas: Sequence[float], lambdas: Sequence[float], batch_size: int = 1,
                       block_settings: int = 1) -> list[tuple[float, float]]:
    """Every (omega, lambda) pair, omega-major: grid row i is ``omegas[i]``, column j is ``lambdas[j]``.

    Refuses sweeps of more than ``MAX_IMAGES`` images (combinations times ``batch_size``, times the number of
    per-block settings swept, each of which samples every combination).
    """
    count = len(omegas) * len(lambdas) * block_settings
    if count * batch_size > MAX_IMAGES:
        per = f" x latent batch {batch_size}" if batch_size > 1 else ""
        blocks = f" x {block_settings} per-block settings" if block_settings > 1 else ""
        raise GuidanceInputError(
            f"The sweep would sample {len(omegas)} omega x {len(lambdas)} lambda values{blocks}{per} = "
            f"{count * batch_size} images; at most {MAX_IMAGES}. Shorten a list{' or the batch' if per else ''}."
        )
    return [(omega, lam) for omega in omegas for lam in lambdas]
