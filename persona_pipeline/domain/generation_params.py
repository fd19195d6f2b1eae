"""The range every generation parameter is held to, each rule written once: the persona's step
settings, the filled ComfyUI graph (domain/workflows.py), the generation request
(domain/generation_request.py), the diffusers backend and the LoRA library all call these.

Sampler and scheduler names are ComfyUI's spelling whatever the backend, so a manifest means the
same thing wherever its image was made (docs/rules.md, "ComfyUI protocol").
"""

from __future__ import annotations

import difflib


class WorkflowError(ValueError):
    """Base of every workflow problem; the message names the template, node, field or value."""


class ParamError(WorkflowError):
    """A sampling parameter outside its allowed range or set."""


# comfy/samplers.py: KSAMPLER_NAMES + ["ddim", "uni_pc", "uni_pc_bh2"] (SAMPLER_NAMES), current spelling.
COMFY_SAMPLERS: tuple[str, ...] = (
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2",
    "dpm_2", "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive",
    "dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp", "dpmpp_sde", "dpmpp_sde_gpu",
    "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu",
    "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu",
    "ddpm", "lcm", "ipndm", "ipndm_v", "deis",
    "res_multistep", "res_multistep_cfg_pp", "res_multistep_ancestral", "res_multistep_ancestral_cfg_pp",
    "gradient_estimation", "gradient_estimation_cfg_pp", "er_sde", "seeds_2", "seeds_3",
    "sa_solver", "sa_solver_pece",
    "ddim", "uni_pc", "uni_pc_bh2",
)
# comfy/samplers.py SCHEDULER_HANDLERS, in ComfyUI's order.
COMFY_SCHEDULERS: tuple[str, ...] = (
    "simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal",
    "linear_quadratic", "kl_optimal",
)

# Other UIs' sampler spellings (A1111/diffusers) that users paste in; named in the error as a hint only,
# since ComfyUI itself refuses them.
_SAMPLER_ALIASES = {
    "euler_a": "euler_ancestral", "euler a": "euler_ancestral", "k_euler_a": "euler_ancestral",
    "k_euler": "euler", "dpm++ 2m": "dpmpp_2m", "dpm++ 2m sde": "dpmpp_2m_sde", "dpm++ sde": "dpmpp_sde",
    "dpm++ 2s a": "dpmpp_2s_ancestral", "dpm2": "dpm_2", "dpm2 a": "dpm_2_ancestral", "unipc": "uni_pc",
}

MAX_LORAS = 5  # LoRAs chained in one generation (docs/rules.md): the library refuses to chain more too
CONTROL_STRENGTH_DEFAULT = 0.65
CONTROL_STRENGTH_RANGE = (0.4, 0.9)
SIDE_MAX = 2048
STEPS_RANGE = (1, 150)
CFG_RANGE = (1.0, 30.0)
# FLUX.1 [dev]'s distilled guidance (ComfyUI's FluxGuidance node, diffusers' guidance_scale on FluxPipeline).
FLUX_GUIDANCE_RANGE = (1.0, 10.0)
DENOISE_RANGE = (0.0, 1.0)
BATCH_RANGE = (1, 64)
# The one range of a LoRA's weight (ComfyUI's strength_model / strength_clip, diffusers' adapter
# weight): what the library stores, the request carries and a template's LoraLoader may hold.
LORA_WEIGHT_RANGE = (0.0, 2.0)
SEED_MAX = 0xFFFF_FFFF_FFFF_FFFF  # ComfyUI's own upper bound for KSampler seeds


def check_params(*, width: int, height: int, steps: int, cfg: float, denoise: float = 1.0, sampler: str,
                 scheduler: str, control_strength: float | None = None, min_side: int = 256) -> None:
    """The sampling ranges on plain values, for callers that hold no graph."""
    check_side(width, "width", min_side)
    check_side(height, "height", min_side)
    check_int(steps, "steps", *STEPS_RANGE)
    check_number(cfg, "cfg", *CFG_RANGE)
    check_number(denoise, "denoise", *DENOISE_RANGE)
    check_choice(sampler, "sampler", COMFY_SAMPLERS)
    check_choice(scheduler, "scheduler", COMFY_SCHEDULERS)
    if control_strength is not None:
        check_number(control_strength, "control_strength", *CONTROL_STRENGTH_RANGE)


def check_lora_weight(weight: object, where: str = "weight") -> None:
    """The LoRA weight rule, for the library, the request and a graph's LoraLoader alike."""
    check_number(weight, where, *LORA_WEIGHT_RANGE)


def is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_int(value: object, where: str, lo: int, hi: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ParamError(f"{where} = {value!r} must be a whole number from {lo} to {hi}")
    if not lo <= value <= hi:
        raise ParamError(f"{where} = {value} is out of range: allowed {lo} to {hi}")


def check_number(value: object, where: str, lo: float, hi: float) -> None:
    if not is_number(value):
        raise ParamError(f"{where} = {value!r} must be a number from {lo} to {hi}")
    # Written so that NaN fails too.
    if not (lo <= value <= hi):
        raise ParamError(f"{where} = {value} is out of range: allowed {lo} to {hi}")


def check_side(value: object, where: str, min_side: int) -> None:
    check_int(value, where, min_side, SIDE_MAX)
    if value % 8:
        raise ParamError(f"{where} = {value} must be a multiple of 8 (from {min_side} to {SIDE_MAX})")


def check_choice(value: object, where: str, choices: tuple[str, ...]) -> None:
    if value in choices:
        return
    alias = _SAMPLER_ALIASES.get(str(value).lower()) if choices is COMFY_SAMPLERS else None
    close = [alias] if alias else difflib.get_close_matches(str(value), choices, n=3, cutoff=0.5)
    hint = f" (did you mean {' or '.join(close)}?)" if close else ""
    raise ParamError(f"{where} = {value!r} is not a name ComfyUI knows{hint}; allowed: {', '.join(choices)}")
