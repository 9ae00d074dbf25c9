"""Personalization Sweep (PG_Sweep): every combination of omega and lambda values, from the same noise, as a labelled grid.

Each combination is sampled as a Personalization Guider followed by
SamplerCustomAdvanced and VAEDecode would sample it: the noise is generated once
and reused, and the sampler gets the noise's seed.

Combinations are batched, as rows of one latent batch with an omega and a scale per
row, when that cannot change the images: the sampler must draw no noise of its own
during sampling (an ancestral or SDE sampler would draw different noise for each
row than a run of its own draws) and must not adapt its steps to the whole batch,
no CFG function of another node may be on the model (they take one scale), and the
batch must fit in free memory. Batched images equal separate runs up to
floating-point rounding; otherwise combinations run one after another, each
bit-identical to a separate run.

Omega per block: every combination uses the weak model's per_block setting, unless
``block_settings`` lists settings to sweep (one per line); each then samples every
omega and lambda as more rows of the grid, and rows of one batch share a setting.
"""

from __future__ import annotations

import inspect
import logging
from enum import Enum

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
import torch
from comfy_api.latest import io

import nodes as comfy_nodes  # ComfyUI's nodes.py (VAEDecode), not this pack's package

from ...guidance import (
    BlockSpec,
    GuidanceInputError,
    OmegaSchedule,
    check_scale,
    check_unit_interval,
    parse_values,
    sweep_combinations,
)
from ...guidance.sweep import parse_block_settings, value_problems
from ..core.modes import Mode, mode_input
from ..core.schema import node_schema
from ..core.vocabulary import Estimate, RowOmegasUnavailable, RowScales, WeakModel
from ..guider import make_guider
from ..inputs import (
    estimate_input,
    estimate_of,
    guidance_scale_input,
    model_input,
    negative_input,
    personalization_scale_input,
)
from ..sockets import TUNING_CATEGORY, WeakModelSocket
from .image_grid import labelled_grid

log = logging.getLogger(__name__)

# Model options through which other nodes change CFG's combination; they take a single scale.
_CFG_FUNCTIONS = ("sampler_cfg_function", "sampler_pre_cfg_function", "sampler_post_cfg_function")
# Evaluations per latent row at most (three-way), for the memory estimate of a batch.
_EVALUATIONS = 3


class SweptScale(str, Enum):
    """Which of the guider's scales ``lambda_values`` sets (three-way; two-way has the one scale lambda)."""

    GUIDANCE = "guidance_scale (lambda_t)"
    PERSONALIZATION = "personalization_scale (lambda_p)"


LAMBDA_SWEEPS = "lambda_sweeps"


def lambda_name(estimate: Estimate, swept: SweptScale) -> str:
    """The symbol of the swept scale, for the grid's column labels."""
    if swept == SweptScale.PERSONALIZATION:
        return "lambda_p"
    return "lambda_t" if estimate == Estimate.THREE_WAY else "lambda"


def sampler_keeps_rows_apart(sampler, denoise_mask) -> bool:
    """True when sampling rows together gives each row what sampling it alone gives (see the module docstring).

    Only ComfyUI's own KSAMPLERs are known well enough: those whose function takes no
    noise sampler and no churn, other than dpm_adaptive (its step size follows the
    error of the whole batch), and without random inpainting noise.
    """
    if not isinstance(sampler, comfy.samplers.KSAMPLER):
        return False
    function = sampler.sampler_function
    if "noise_sampler" in inspect.signature(function).parameters or function.__name__ == "dpm_adaptive_function":
        return False
    if sampler.extra_options.get("s_churn", 0.0) or sampler.extra_options.get("eta", 0.0):
        return False
    return not (denoise_mask is not None and sampler.inpaint_options.get("random", False))


def combinations_per_batch(model, sampler, latent: torch.Tensor, denoise_mask, count: int, pair=None) -> int:
    """How many combinations to sample together: 1 unless batching keeps every image as it is and fits in memory
    (and the ``pair`` lets each row have its own omega)."""
    if count < 2 or (pair is not None and not pair.takes_row_omegas) or not sampler_keeps_rows_apart(sampler, denoise_mask):
        return 1
    if any(model.model_options.get(key) for key in _CFG_FUNCTIONS):
        return 1
    # ComfyUI's own rule for batching conds (calc_cond_batch), with the model's weights counted as not yet loaded.
    free = comfy.model_management.get_free_memory(model.load_device) - model.model_size()
    for k in range(count, 1, -1):
        shape = [k * latent.shape[0] * _EVALUATIONS, *latent.shape[1:]]
        if model.model.memory_required(shape) * 1.5 < free:
            return k
    return 1


# One combination: omega, lambda, and the per-block setting (None: one omega for every layer).
Combination = tuple[float, float, BlockSpec | None]


def _check_lists(omega_values: str, lambda_values: str, batch_size: int = 1, block_settings: str = "",
                 weak_blocks: BlockSpec | None = None) -> list[Combination]:
    """Every combination, per-block setting by setting (each setting samples every omega and lambda); without
    ``block_settings`` the weak model's own per-block setting for all."""
    omegas = parse_values("omega_values", omega_values, check_unit_interval)
    lambdas = parse_values("lambda_values", lambda_values, check_scale)
    settings = [None if s.is_off else s for s in parse_block_settings(block_settings)] if block_settings.strip() \
        else [weak_blocks]
    pairs = sweep_combinations(omegas, lambdas, batch_size, len(settings))
    return [(omega, lam, blocks) for blocks in settings for omega, lam in pairs]


def list_problems(omega_values: str | None, lambda_values: str | None) -> str | None:
    """Every problem with the two lists, in one message (None when both are good or linked), for validate_inputs."""
    found = []
    for name, text, check in (("omega_values", omega_values, check_unit_interval),
                              ("lambda_values", lambda_values, check_scale)):
        if text is not None:
            found += value_problems(name, text, check)[1]
    if found:
        return "; ".join(found) + "."
    if omega_values is not None and lambda_values is not None:
        try:
            _check_lists(omega_values, lambda_values)
        except GuidanceInputError as error:
            return str(error)
    return None


def lambda_sweeps_input() -> io.DynamicCombo.Input:
    """Three-way: which scale lambda_values sets; the other one keeps a widget of its own."""
    return mode_input(
        LAMBDA_SWEEPS,
        {
            SweptScale.GUIDANCE: [personalization_scale_input(
                "lambda_p for every combination (lambda_values sets lambda_t). 1 turns personalization guidance "
                "off (plain CFG with the negative).")],
            SweptScale.PERSONALIZATION: [guidance_scale_input(
                tooltip="lambda_t for every combination (lambda_values sets lambda_p). 1 samples "
                "the fine-tuned model on the prompt alone.")],
        },
        tooltip="Which scale lambda_values sets: guidance_scale (lambda_t, the text scale) or personalization_scale "
        "(lambda_p). The other is the widget shown below, the same for every combination.",
    )


class Sweep(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return node_schema(
            node_id="PG_Sweep",
            display_name="Personalization Sweep",
            category=TUNING_CATEGORY,
            search_aliases=["sweep", "grid", "XY plot", "omega lambda grid", "compare settings", "tuning"],
            description=(
                "Samples every combination of the omega and lambda values from the same noise, with any sampler and "
                "sigmas, and lays the images out in a grid: rows are omega, columns lambda, labelled. Takes what the "
                "Personalization Guider and SamplerCustomAdvanced take. Combinations are sampled together in one "
                "batch where that cannot change the images (a sampler that draws no noise of its own, such as euler or "
                "dpmpp_2m, and enough memory), else one after the other; each image is what the guider would "
                "sample with those values (to floating-point rounding when batched)."
            ),
            inputs=[
                model_input(),
                WeakModelSocket.Input(
                    "weak_model",
                    tooltip="From the Personalization Weak Model. Its pair and per_block setting are used: each omega "
                    "value replaces its schedule with a constant omega over the whole run.",
                ),
                io.Conditioning.Input("positive", tooltip="The prompt c, encoded with the pair's CLIP."),
                io.Conditioning.Input(
                    "null_conditioning",
                    tooltip="The empty prompt \"\" encoded with the pair's CLIP (a CLIPTextEncode with no text).",
                ),
                io.Noise.Input("noise", tooltip="The noise (e.g. RandomNoise): every combination starts from it."),
                io.Sampler.Input("sampler", tooltip="Any sampler (e.g. KSamplerSelect)."),
                io.Sigmas.Input("sigmas", tooltip="Any sigmas (e.g. BasicScheduler on the fine-tuned model)."),
                io.Latent.Input("latent_image", tooltip="The latent to sample (e.g. EmptyLatentImage); its batch is "
                                "sampled for every combination."),
                io.Vae.Input("vae", tooltip="Decodes every combination's latent, as VAEDecode does."),
                estimate_input(
                    two_way=[],
                    three_way=[negative_input(), lambda_sweeps_input()],
                    shown="Two-way: lambda_values sets lambda. Three-way shows the negative socket and lambda_sweeps, "
                    "which chooses the scale that lambda_values sets.",
                ),
                io.String.Input(
                    "omega_values",
                    default="0.3, 0.5, 0.7",
                    tooltip="The grid's rows: omega values from 0 to 1, separated by commas (at most 8). 1 is plain CFG "
                    "(no personalization guidance): include it as the reference row.",
                ),
                io.String.Input(
                    "lambda_values",
                    default="5, 7.5, 10",
                    tooltip="The grid's columns: values from 0 to 100 of lambda (two-way) or of the scale that "
                    "lambda_sweeps names (three-way), separated by commas (at most 8). 1 turns the guidance off (the "
                    "fine-tuned model alone).",
                ),
                io.String.Input(
                    "block_settings",
                    default="",
                    multiline=True,
                    optional=True,  # API prompts of workflows made before it keep working
                    tooltip="Omega per block to sweep, one setting per line (at most 8): each line samples every "
                    "omega and lambda, as more rows of the grid. 'off'; 'unet: 1, 0.5, 0' (input, middle, output "
                    "blocks); 'stream: 0.5, 1' (double, single stream blocks); 'depth: 1, 1, 0' (early, middle, late "
                    "thirds); or free-form entries separated by ';' ('double_blocks = 0.5; single_blocks = 1'). "
                    "Factors: 1 = the run's omega, 0 = the block keeps the subject. Empty (the default): the weak "
                    "model's own per_block setting for every combination.",
                ),
            ],
            outputs=[
                io.Image.Output("grid", tooltip="The labelled grid: rows omega, columns lambda. One grid per image of "
                                "the latent batch."),
                io.Image.Output("images", tooltip="Every image, row by row (omega-major, then lambda, then batch)."),
                io.String.Output("labels", tooltip="One line per image of 'images': its omega and lambda."),
            ],
        )

    @classmethod
    def validate_inputs(cls, omega_values: str, lambda_values: str, *, estimate=None) -> bool | str:
        # None: linked from another node, checked when the sweep runs (block_settings too: not named here, so that
        # a problem with it is not shown under the lists). See core/modes.py on ``estimate``.
        return list_problems(omega_values, lambda_values) or True

    @classmethod
    def execute(
        cls,
        model,
        weak_model: WeakModel,
        positive,
        null_conditioning,
        noise,
        sampler,
        sigmas: torch.Tensor,
        latent_image: dict,
        vae,
        estimate: dict | str,
        omega_values: str,
        lambda_values: str,
        lambda_sweeps: dict | str = SweptScale.GUIDANCE,
        guidance_scale: float = 7.5,
        personalization_scale: float = 3.0,
        negative=None,
        block_settings: str = "",
    ) -> io.NodeOutput:
        """``estimate`` as ComfyUI passes it; Python callers may pass the estimate's name, and in three-way
        ``lambda_sweeps``, the scale it does not sweep, and ``negative``, as arguments."""
        chosen = estimate_of(estimate, negative=negative, lambda_sweeps=lambda_sweeps)
        estimate, negative = chosen.key, chosen.get("negative")
        swept = SweptScale.GUIDANCE
        if estimate == Estimate.THREE_WAY:
            scale = Mode.of(SweptScale, LAMBDA_SWEEPS, chosen[LAMBDA_SWEEPS], guidance_scale=guidance_scale,
                            personalization_scale=personalization_scale)
            guidance_scale = scale.get("guidance_scale", guidance_scale)
            personalization_scale = scale.get("personalization_scale", personalization_scale)
            swept = scale.key
        combinations = _check_lists(omega_values, lambda_values, latent_image["samples"].shape[0], block_settings or "",
                                    weak_model.blocks)
        run = _SweepRun(model, weak_model, positive, null_conditioning, negative, estimate, swept, guidance_scale,
                        personalization_scale, latent_image)
        images = run.sample_all(combinations, noise, sampler, sigmas, vae)
        return io.NodeOutput(*grid_of(images, combinations, lambda_name(estimate, swept)))


def _per_block(blocks: BlockSpec | None) -> str:
    return f"per-block {'off' if blocks is None else blocks.label()}"


def grid_of(images: list[torch.Tensor], combinations: list[Combination], symbol: str):
    """The labelled grid per latent row (per-block setting and omega down, the swept scale across), the images, and
    their labels. The per-block setting is named only where the sweep sweeps several."""
    swept = len({blocks for _, _, blocks in combinations}) > 1
    rows = dict.fromkeys((omega, blocks) for omega, _, blocks in combinations)
    row_labels = [f"omega {omega:g}" + (f", {_per_block(blocks)}" if swept else "") for omega, blocks in rows]
    col_labels = [f"{symbol} {lam:g}" for lam in dict.fromkeys(lam for _, lam, _ in combinations)]
    batch = images[0].shape[0]
    grids = [labelled_grid([image[b] for image in images], row_labels, col_labels)[0] for b in range(batch)]
    labels = [f"omega {omega:g}, {symbol} {lam:g}" + (f", {_per_block(blocks)}" if swept else "")
              for omega, lam, blocks in combinations for _ in range(batch)]
    return torch.stack(grids), torch.cat(images), "\n".join(labels) + "\n"


class _SweepRun:
    """One sweep: what SamplerCustomAdvanced does with its inputs, once for all combinations, then the combinations
    in groups (rows of one batch where that keeps every image as it is: module docstring)."""

    def __init__(self, model, weak_model: WeakModel, positive, null, negative, estimate: Estimate, swept: SweptScale,
                 guidance_scale: float, personalization_scale: float, latent_image: dict):
        self.model, self.pair = model, weak_model.pair
        self.conds = (positive, null, negative)
        self.estimate, self.swept = estimate, swept
        self.guidance_scale, self.personalization_scale = guidance_scale, personalization_scale
        self.latent = latent_image.copy()
        self.latent["samples"] = comfy.sample.fix_empty_latent_channels(model, latent_image["samples"])

    def guider_for(self, group: list[tuple[float, float]]):
        """The guider of a group of combinations: one omega and scale per latent row when there are several."""
        omega, lam, blocks = group[0]  # a group holds one per-block setting
        rows = None
        if len(group) > 1:
            each = self.latent["samples"].shape[0]
            scale = "lambda_p" if self.swept == SweptScale.PERSONALIZATION else "lambda_t"
            rows = RowScales(omega=tuple(o for o, _, _ in group for _ in range(each)),
                             **{scale: tuple(la for _, la, _ in group for _ in range(each))})
        scales = ((self.guidance_scale, lam) if self.swept == SweptScale.PERSONALIZATION
                  else (lam, self.personalization_scale))
        positive, null, negative = self.conds
        return make_guider(self.model, WeakModel(self.pair, OmegaSchedule.constant(omega), blocks), positive, null,
                           self.estimate.value, *scales, negative=negative, rows=rows)

    def sample_all(self, combinations, noise, sampler, sigmas, vae) -> list[torch.Tensor]:
        """Every combination's decoded images, in order."""
        latent, noise_mask = self.latent, self.latent.get("noise_mask")
        per_batch = combinations_per_batch(self.model, sampler, latent["samples"], noise_mask, len(combinations),
                                           pair=self.pair)
        # Rows of one batch share a per-block setting (each row has its own omega, every layer one factor).
        settings = list(dict.fromkeys(blocks for _, _, blocks in combinations))
        groups = [chunk[i:i + per_batch] for blocks in settings for chunk in [[c for c in combinations if c[2] == blocks]]
                  for i in range(0, len(chunk), per_batch)]
        log.info("Personalization Sweep: %d combinations in %d sampling run(s).", len(combinations), len(groups))
        # Every guider first, so that any bad input stops the sweep before the first step.
        guiders = [self.guider_for(group) for group in groups]
        start = noise.generate_noise(latent)
        steps = max(sigmas.shape[-1] - 1, 1)
        progress = comfy.utils.ProgressBar(len(combinations) * steps)
        previewer = latent_preview.get_previewer(self.model.load_device, self.model.model.latent_format)

        def sample(group, guider, done):
            def callback(step, x0, x, total_steps):
                preview = previewer.decode_latent_to_preview_image("JPEG", x0) if previewer else None
                progress.update_absolute(done + (step + 1) * len(group), preview=preview)

            k = len(group)  # the same latent, noise and mask for every combination of the group
            mask = noise_mask if noise_mask is None else torch.cat([noise_mask] * k)
            samples = guider.sample(torch.cat([start] * k), torch.cat([latent["samples"]] * k), sampler, sigmas,
                                    denoise_mask=mask, callback=callback,
                                    disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=noise.seed)
            return samples.to(comfy.model_management.intermediate_device()).chunk(k)

        images, done = [], 0
        for group, guider in zip(groups, guiders, strict=True):
            try:
                latents = sample(group, guider, done)
            except RowOmegasUnavailable as unavailable:
                # Found only once the model is loaded (the route changed): the combinations one after another.
                log.info("PG Sweep: %s; %d combinations sampled one after another.", unavailable, len(group))
                latents = [chunk for j, single in enumerate(group)
                           for chunk in sample([single], self.guider_for([single]), done + j * steps)]
            images += [comfy_nodes.VAEDecode().decode(vae, {**latent, "samples": chunk})[0] for chunk in latents]
            done += len(group) * steps
            progress.update_absolute(done)
        return images
