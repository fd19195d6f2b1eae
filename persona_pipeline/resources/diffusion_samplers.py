"""ComfyUI sampler and scheduler names -> diffusers scheduler classes and options, so a manifest
means the same thing whichever backend made the image (ComfyUI's names: docs/rules.md, "ComfyUI
protocol"), and the parameter check the diffusers backend runs before any model loads."""

from __future__ import annotations

from persona_pipeline.domain.generation_params import (COMFY_SAMPLERS, COMFY_SCHEDULERS, FLUX_GUIDANCE_RANGE, ParamError,
                                                       check_params)


class GenerationParamError(ParamError):
    """A generation parameter out of range or without a diffusers equivalent."""


# ComfyUI sampler name -> diffusers scheduler class; extra constructor options in _SAMPLER_OPTIONS.
SAMPLERS = {
    "euler": "EulerDiscreteScheduler",
    "euler_ancestral": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "dpm_2": "KDPM2DiscreteScheduler",
    "dpm_2_ancestral": "KDPM2AncestralDiscreteScheduler",
    "lms": "LMSDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "dpmpp_2m_sde": "DPMSolverMultistepScheduler",
    "dpmpp_3m_sde": "DPMSolverMultistepScheduler",
    "ddpm": "DDPMScheduler",
    "ddim": "DDIMScheduler",
    "uni_pc": "UniPCMultistepScheduler",
    "uni_pc_bh2": "UniPCMultistepScheduler",
    "deis": "DEISMultistepScheduler",
    "lcm": "LCMScheduler",
}
_SAMPLER_OPTIONS = {
    "dpmpp_2m": {"algorithm_type": "dpmsolver++", "solver_order": 2},
    "dpmpp_2m_sde": {"algorithm_type": "sde-dpmsolver++", "solver_order": 2},
    "dpmpp_3m_sde": {"algorithm_type": "sde-dpmsolver++", "solver_order": 3},
    "uni_pc": {"solver_type": "bh1"},  # ComfyUI's uni_pc is UniPC-bh1; uni_pc_bh2 is diffusers' default
    "uni_pc_bh2": {"solver_type": "bh2"},
}
# ComfyUI scheduler (sigma schedule) names → diffusers scheduler options.
SCHEDULERS = {
    "normal": {},
    "karras": {"use_karras_sigmas": True},
    "exponential": {"use_exponential_sigmas": True},
    "beta": {"use_beta_sigmas": True},
    "sgm_uniform": {"timestep_spacing": "trailing"},
}


def check_generation_params(*, steps: int, cfg: float, sampler: str, scheduler: str, width: int, height: int,
                            minimum_side: int = 256, denoise: float = 1.0, control_strength: float | None = None,
                            flow_matching: bool = False) -> None:
    """Refuse out-of-range parameters before any model is loaded, naming the field and bound: the
    ranges the workflow templates are held to, plus what diffusers itself cannot run."""
    try:
        check_params(width=width, height=height, steps=steps, cfg=cfg, denoise=denoise, sampler=sampler,
                     scheduler=scheduler, control_strength=control_strength, min_side=minimum_side)
    except ParamError as exc:
        raise GenerationParamError(str(exc)) from None
    if denoise == 0:
        raise GenerationParamError("denoise = 0 would return the parent unchanged; use a value in (0, 1]")
    if flow_matching:
        flow_scheduler_check(sampler, scheduler)
        low, high = FLUX_GUIDANCE_RANGE
        if not low <= cfg <= high:
            raise GenerationParamError(f"cfg={cfg} is out of range for FLUX.1: it is the distilled guidance "
                                       f"(ComfyUI's FluxGuidance), {low:g} to {high:g}")
        return
    scheduler_options(sampler, scheduler)


def scheduler_options(sampler: str, scheduler: str) -> tuple[str, dict]:
    """The diffusers scheduler class name and constructor options for a ComfyUI sampler and
    scheduler; refuses, naming them and listing what is supported, what has no equivalent."""
    import inspect

    import diffusers

    supported = ", ".join(SAMPLERS)
    if sampler not in SAMPLERS:
        if sampler in COMFY_SAMPLERS:
            raise GenerationParamError(f"sampler={sampler!r} has no diffusers equivalent; the diffusers backend supports "
                                       f"{supported}")
        raise GenerationParamError(f"sampler={sampler!r} is not a ComfyUI sampler name; use one of {supported}")
    if scheduler not in SCHEDULERS:
        if scheduler in COMFY_SCHEDULERS:
            raise GenerationParamError(f"scheduler={scheduler!r} has no diffusers equivalent; the diffusers backend "
                                       f"supports {', '.join(SCHEDULERS)}")
        raise GenerationParamError(f"scheduler={scheduler!r} must be one of {', '.join(SCHEDULERS)}")
    class_name = SAMPLERS[sampler]
    accepted = inspect.signature(getattr(diffusers, class_name).__init__).parameters
    if not set(SCHEDULERS[scheduler]) <= set(accepted):
        usable = [name for name, options in SCHEDULERS.items() if set(options) <= set(accepted)]
        raise GenerationParamError(f"scheduler={scheduler!r} has no diffusers equivalent for sampler={sampler!r} "
                                   f"({class_name}); with this sampler use one of {', '.join(usable)}")
    return class_name, {**_SAMPLER_OPTIONS.get(sampler, {}), **SCHEDULERS[scheduler]}


# FLUX.1 draws with Euler on its flow-matching schedule, as ComfyUI's FLUX workflows do (euler + simple).
FLOW_SAMPLERS, FLOW_SCHEDULERS = ("euler",), ("simple", "normal")


def flow_scheduler_check(sampler: str, scheduler: str) -> None:
    if sampler not in FLOW_SAMPLERS or scheduler not in FLOW_SCHEDULERS:
        raise GenerationParamError(f"sampler={sampler!r} scheduler={scheduler!r}: a FLUX.1 base model draws with "
                                   f"sampler {' or '.join(FLOW_SAMPLERS)} and scheduler {' or '.join(FLOW_SCHEDULERS)} "
                                   "(its flow-matching Euler schedule)")


def make_scheduler(sampler: str, scheduler: str, base_config):
    """A fresh diffusers scheduler for the ComfyUI names, on the base model's noise schedule."""
    import diffusers

    if str(dict(base_config).get("_class_name", "")).startswith("FlowMatch"):
        flow_scheduler_check(sampler, scheduler)
        return diffusers.FlowMatchEulerDiscreteScheduler.from_config(base_config)
    class_name, options = scheduler_options(sampler, scheduler)
    return getattr(diffusers, class_name).from_config(base_config, **options)
