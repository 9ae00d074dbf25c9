"""Inputs that only some modes of a node use: ComfyUI's DynamicCombo, and the value it hands to ``execute``.

A DynamicCombo is a combo whose options each bring their own inputs. The frontend
shows the chosen option's widgets and sockets only, and ComfyUI validates only
those when a workflow is queued: a required socket of the chosen option that is
not connected is reported as "Required input is missing" at that socket, and a
socket that the chosen option does not have cannot be connected at all. Rules of
the form "input X is needed (or not allowed) in mode Y" are therefore written as
the options' input lists, not as checks.

``execute`` receives the combo as one dict: the chosen key under the combo's own
id, and the option's inputs by id (None for an unconnected optional socket).
``Mode.of`` reads it; it also takes the key as a string with the option's inputs
as keywords, which is how Python callers (tests, scripts, benchmarks) call the
nodes' ``execute``.

``validate_inputs``: ComfyUI shows the function's message under every input that it
names as a (positional) parameter, and also passes every DynamicCombo of the node
to it, nested as for ``execute``, whether the function names it or not (children
it does not name are None there). A function that checks other inputs takes the
combo as a keyword-only parameter (``def validate_inputs(cls, a, b, *, estimate=None)``):
ComfyUI reads only positional parameters when it decides where to show a message.

A node with a new mode-dependent input list reuses ``mode_input`` and ``Mode.of``:
see ``core/personalization.py`` (the personalization: a LoRA and its strength, or a
fine-tuned file) and ``nodes/inputs.py`` (the estimate and its scales).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, Generic, TypeVar

from comfy_api.latest import io

from ...guidance import GuidanceInputError

E = TypeVar("E", bound=Enum)


def mode_input(id: str, options: Mapping[E, Sequence[io.Input]], tooltip: str) -> io.DynamicCombo.Input:
    """A DynamicCombo whose keys are the Enum's values; the first option is the default (the frontend's choice)."""
    return io.DynamicCombo.Input(
        id,
        options=[io.DynamicCombo.Option(key.value, list(inputs)) for key, inputs in options.items()],
        tooltip=tooltip,
    )


@dataclass(frozen=True)
class Mode(Generic[E]):
    """The chosen option of a DynamicCombo and the values of that option's inputs."""

    key: E
    values: Mapping[str, Any]

    def __getitem__(self, name: str) -> Any:
        return self.values[name]

    def get(self, name: str, default: Any = None) -> Any:
        value = self.values.get(name)
        return default if value is None else value

    @classmethod
    def of(cls, enum: type[E], id: str, value: Mapping[str, Any] | str | E, **flat: Any) -> Mode[E]:
        """The mode in ``value``: ComfyUI's dict ``{id: key, input: value, ...}``, or a key with ``flat`` inputs."""
        if isinstance(value, Mapping):
            key, values = value.get(id), {k: v for k, v in value.items() if k != id}
        else:
            key, values = value, flat
        try:
            return cls(enum(key), values)
        except ValueError:
            choices = ", ".join(repr(member.value) for member in enum)
            raise GuidanceInputError(f"{id}: {key!r} is not one of {choices}.") from None
