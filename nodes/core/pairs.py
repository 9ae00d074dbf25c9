"""A base model and its personalization as one object: the fine-tuned MODEL and delta = theta_ft - theta_pre per
module of its diffusion model, with what forming a pair shares.

Two ways to form one: from two separately loaded models (``full_pairs.py``: the delta tensor by
tensor, or its truncated SVD), or from the base with a LoRA or another adapter applied
(``lora_pairs.py``: the adapter's patches are the delta). The nodes reach both through
``full_pairs.pair_from_models`` and ``personalization.py``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import comfy.lora
import comfy.model_management
import comfy.model_patcher
import torch

from ...guidance import (
    ChangedParameter,
    DenseDelta,
    GuidanceInputError,
    LayerDelta,
    LowRankDelta,
    Placement,
    check_layer,
    place_parameter,
)
from . import host

log = logging.getLogger(__name__)

DIFFUSION_PREFIX = "diffusion_model."
GIB = 1024**3
# The low-rank option's default cap on singular values per layer (the nodes' default too).
DEFAULT_RANK = 128


class DeltaWeights(torch.nn.Module):
    """The pair's delta tensors as (frozen) parameters of one module.

    Wrapped in a ModelPatcher and attached to the fine-tuned MODEL as an additional
    model, ComfyUI loads them in the same ``load_models_gpu`` call as the model and
    counts them in its memory budget. The LayerDelta objects hold these very
    Parameter objects, so they follow the module to whatever device it is moved to.
    """

    def __init__(self, deltas: dict[str, list[LayerDelta]]):
        super().__init__()
        index = 0
        for layer_deltas in deltas.values():
            for delta in layer_deltas:
                if isinstance(delta, LazyDelta):
                    continue
                tensors = delta.params if isinstance(delta, DenseDelta) else {"up": delta.up, "down": delta.down}
                for name, tensor in list(tensors.items()):
                    param = torch.nn.Parameter(tensor, requires_grad=False)
                    self.register_parameter(f"delta_{index}", param)
                    if isinstance(delta, DenseDelta):
                        delta.params[name] = param
                    else:
                        setattr(delta, name, param)
                    index += 1


@dataclass(frozen=True)
class LowRankSpec:
    """The low-rank option for full pairs: each Linear/Conv weight delta kept as its truncated SVD.

    ``rank``: at most this many singular values per layer (0: no cap). ``energy``: the
    fewest singular values that hold this fraction of the delta's squared norm.
    """

    rank: int = DEFAULT_RANK
    energy: float = 1.0

    def __post_init__(self):
        if self.rank < 0:
            raise GuidanceInputError(f"rank must be 0 (no cap) or more, got {self.rank}.")
        if not (math.isfinite(self.energy) and 0.0 < self.energy <= 1.0):
            raise GuidanceInputError(f"energy must be above 0 and at most 1, got {self.energy!r}.")


@dataclass(frozen=True)
class Approximation:
    """What the low-rank option kept: the squared norm of the approximated weight deltas, against the whole."""

    layers: int
    kept_energy: float  # fraction of the approximated deltas' squared norm the factors hold
    relative_error: float  # ||delta - factors|| / ||delta|| over the approximated weights
    bytes_saved: int


@dataclass
class LazyDelta:
    """A module's delta that is never kept: read from the two models each time the module runs. theta_ft is what
    the loaded fine-tuned layer computes with, theta_pre what ``base`` computes with for the same parameters
    (``host.original_value``). For pairs with GGUF weights, whose dense delta would be several times the size of the
    quantized files (docs/design.md, "Memory and cost")."""

    base: comfy.model_patcher.ModelPatcher
    finetuned: comfy.model_patcher.ModelPatcher
    path: str
    names: tuple[str, ...]

    def tensors(self) -> list[torch.Tensor]:
        return []

    def base_value(self, name: str, dtype: torch.dtype, device) -> torch.Tensor:
        """theta_pre of parameter ``name``, a new tensor."""
        return host.original_value(self.base, f"{self.path}.{name}", dtype, device)

    def finetuned_value(self, name: str, dtype: torch.dtype, device) -> torch.Tensor:
        """theta_ft of parameter ``name`` as the pair's fine-tuned MODEL has it (without what a MODEL made from it
        adds on top), a new tensor."""
        return host.original_value(self.finetuned, f"{self.path}.{name}", dtype, device)


@dataclass
class FinetunedPair:
    """The fine-tuned MODEL and delta = theta_ft - theta_pre per module of its diffusion model.

    ``deltas`` maps a module's path in the BaseModel (``diffusion_model.…``) to the
    deltas that act on it: low-rank LoRA factors where they can be applied row by
    row, dense tensors otherwise. ``placements`` says, per changed parameter key, how
    ``guidance.layers`` places it (the runtime picks its route from them).
    """

    finetuned: comfy.model_patcher.ModelPatcher
    deltas: dict[str, list[LayerDelta]]
    placements: dict[str, ChangedParameter]
    dense_fallbacks: int = 0
    approximation: Approximation | None = None
    # The base MODEL, where the pair reads it while sampling (lazy deltas of a separately loaded base): ComfyUI loads
    # it with the fine-tuned model. None where nothing is read from it, or where it shares the fine-tuned model's
    # weights (an adapter on the base).
    reads_base: comfy.model_patcher.ModelPatcher | None = None
    delta_patcher: comfy.model_patcher.ModelPatcher = field(init=False, repr=False)
    # Room for weak parameters, made by the runtime on first use where the pair samples with weak weights.
    workspace: comfy.model_patcher.ModelPatcher | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        self.delta_patcher = comfy.model_patcher.ModelPatcher(
            DeltaWeights(self.deltas), load_device=self.finetuned.load_device, offload_device=self.finetuned.offload_device
        )

    @property
    def takes_row_omegas(self) -> bool:
        """True when every change sits on a layer kind, so that rows of one batch can each have their own omega
        (PG Sweep's batched combinations); inline parameters and lazy deltas take one omega per forward."""
        lazy = any(isinstance(d, LazyDelta) for ds in self.deltas.values() for d in ds)
        return not lazy and all(p.kind is not None and not p.reason for p in self.placements.values())

    def delta_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for ds in self.deltas.values() for d in ds for t in d.tensors())

    def check_model(self, model: comfy.model_patcher.ModelPatcher) -> None:
        """Raise unless ``model`` holds the fine-tuned weights this pair's delta was formed against."""
        if not model.is_clone(self.finetuned):
            raise GuidanceInputError(
                "The MODEL given to personalization guidance is not the fine-tuned MODEL of this pair. "
                "Connect the MODEL output of the same pair loader (Personalization Pair Loader, Diffusion Model Pair "
                "Loader or Pair from Models), or a model made from it."
            )
        for key, patches in self.finetuned.patches.items():
            if model.patches.get(key, [])[: len(patches)] != patches:
                raise GuidanceInputError(
                    f"The MODEL given to personalization guidance has lost the fine-tuned patches of {key}: "
                    "connect the MODEL output of the pair, or a model made from it."
                )


def split_key(key: str) -> tuple[str, str]:
    layer, _, param = key.rpartition(".")
    return layer, param


def effective(model: comfy.model_patcher.ModelPatcher, key: str, weight, convert, patches) -> torch.Tensor:
    """One tensor as the model computes with it, in fp32 on the CPU: dequantized, converted, patched. A packed GGUF
    tensor is read through its layer, as that layer computes with it (``host.gguf_weight``)."""
    if host.is_gguf_packed(weight):
        layer = model.model.get_submodule(split_key(key)[0])
        return host.gguf_weight(layer, weight, patches, key, torch.float32, "cpu")
    weight = host.plain(host.float_tensor(weight.detach())).to("cpu", torch.float32, copy=True)
    weight = convert(weight, inplace=True)
    return comfy.lora.calculate_weight(patches, weight, key) if patches else weight


def stored_dtype(model: comfy.model_patcher.ModelPatcher) -> torch.dtype:
    """The dtype deltas are kept in: the model's own when that is fp16 or bf16 (half the memory), else its
    compute dtype when that is (fp8 weights computed in bf16), else fp32 (fp32 models)."""
    for dtype in (model.model_dtype(), getattr(model.model, "manual_cast_dtype", None)):
        if dtype in (torch.float16, torch.bfloat16):
            return dtype
    return torch.float32


def placements_of(model: comfy.model_patcher.ModelPatcher, keys) -> dict[str, ChangedParameter]:
    return {key: place_parameter(model.model, key) for key in keys}


def log_routes(placements: dict[str, ChangedParameter]) -> None:
    """Log how the changed parameters will be guided (the log says which route and why)."""
    own = [p for p in placements.values() if p.placement == Placement.OWN_FORWARD]
    mixing = sorted({p.container for p in placements.values() if p.placement == Placement.IN_ROW_MIXING})
    if mixing:
        log.info("Personalization guidance: %d module(s) route tokens between rows inside (first: %s); they run "
                 "their weak rows in a call of their own.", len(mixing), mixing[0])
    if own:
        log.info("Personalization guidance: %d changed parameter(s) cannot be guided row by row (first: %s); the "
                 "weak evaluation runs as a forward of its own.", len(own), own[0].reason)


def low_rank_candidate(placement: ChangedParameter, model: comfy.model_patcher.ModelPatcher, shape) -> bool:
    return (placement.placement == Placement.LAYER and placement.kind.low_rank and placement.name == "weight"
            and len(shape) >= 2 and getattr(model.model.get_submodule(placement.path), "groups", 1) == 1)


def collect(model: comfy.model_patcher.ModelPatcher, dense: dict[str, torch.Tensor],
            low_rank: dict[str, list[LayerDelta]], lazy: set[str] = frozenset(),
            base: comfy.model_patcher.ModelPatcher | None = None) -> dict[str, list[LayerDelta]]:
    """Group per-tensor deltas by module, and check that each fits its module. ``lazy``: keys whose delta is read
    from ``base`` and the fine-tuned model while sampling (``LazyDelta``)."""
    layers: dict[str, list[LayerDelta]] = {}
    by_path: dict[str, list[str]] = {}
    for key in sorted(lazy):
        path, param = split_key(key)
        by_path.setdefault(path, []).append(param)
    for path, names in by_path.items():
        layers.setdefault(path, []).append(LazyDelta(base, model, path, tuple(names)))
    for key, d in dense.items():
        path, param = split_key(key)
        group = layers.setdefault(path, [])
        dense_delta = next((x for x in group if isinstance(x, DenseDelta)), None)
        if dense_delta is None:
            dense_delta = DenseDelta()
            group.append(dense_delta)
        dense_delta.params[param] = d
    for key, deltas in low_rank.items():
        layers.setdefault(split_key(key)[0], []).extend(deltas)
    for path, deltas in layers.items():
        module = model.model.get_submodule(path)
        for d in deltas:
            if isinstance(d, LazyDelta):
                continue
            if isinstance(d, LowRankDelta) or all(place_parameter(model.model, f"{path}.{p}").placement == Placement.LAYER
                                                  for p in d.params):
                check_layer(path, module, d)
    return layers


def check_memory(kept: int, transient: int, what: str,
                 advice: str = ", load both models in a narrower weight dtype, or use the low-rank option (a smaller "
                 "rank)") -> None:
    """Refuse, with the figures, a pair that would not fit in free system memory (ComfyUI's own reading)."""
    free = comfy.model_management.get_free_memory(torch.device("cpu"))
    if kept + transient > free:
        raise GuidanceInputError(
            f"Forming {what} needs up to {kept / GIB:.2f} GiB of system memory for the delta plus "
            f"{transient / GIB:.2f} GiB while forming, and {free / GIB:.2f} GiB is free. Free memory (close other "
            f"programs, unload other models){advice}."
        )
