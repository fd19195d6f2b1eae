"""What the fake ComfyUI knows of ComfyUI's protocol (docs/rules.md): the node catalogue that
`/object_info` lists, how `POST /prompt` validates a graph and orders its nodes, the error bodies a
real server sends, and the deterministic PNGs it "renders"."""

from __future__ import annotations

import hashlib
import io
import struct
import zlib
from typing import Any

SAMPLERS = ["euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "dpm_2",
            "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_sde_gpu",
            "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm",
            "ipndm", "ipndm_v", "deis", "ddim", "uni_pc", "uni_pc_bh2"]
SCHEDULERS = ["normal", "karras", "exponential", "sgm_uniform", "simple", "ddim_uniform", "beta", "linear_quadratic",
              "kl_optimal"]
UPSCALE_METHODS = ["nearest-exact", "bilinear", "area", "bicubic", "bislerp", "lanczos"]
# FLUX.1 Kontext's training resolutions, from which FluxKontextImageScale picks by aspect ratio.
KONTEXT_RESOLUTIONS = [(672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184),
                       (944, 1104), (1024, 1024), (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752),
                       (1456, 720), (1504, 688), (1568, 672)]
_PREVIEW: list[bytes] = []


def preview_jpeg() -> bytes:
    """A tiny JPEG for the binary preview frame (a client must skip binary frames)."""
    if not _PREVIEW:
        from PIL import Image

        buffer = io.BytesIO()
        Image.new("RGB", (8, 8), (128, 64, 32)).save(buffer, format="JPEG")
        _PREVIEW.append(buffer.getvalue())
    return _PREVIEW[0]


def _int(minimum: int, maximum: int, default: int) -> list:
    return ["INT", {"default": default, "min": minimum, "max": maximum}]


def _float(minimum: float, maximum: float, default: float) -> list:
    return ["FLOAT", {"default": default, "min": minimum, "max": maximum}]


CLIP_TYPES = ["stable_diffusion", "stable_cascade", "sd3", "stable_audio", "mochi", "ltxv", "pixart", "cosmos", "lumina2",
              "wan", "hidream", "chroma", "ace", "omnigen2", "qwen_image", "hunyuan_image", "flux2", "ovis"]


def node_definitions(loras: list[str], checkpoints: list[str], controlnets: list[str], images: list[str], *,
                     unets: list[str] = (), text_encoders: list[str] = (), vaes: list[str] = (),
                     clip_visions: list[str] = ()) -> dict:
    """The node catalogue in /object_info's shape, for the classes our workflows use (FLUX.1's loaders
    and FluxGuidance, FLUX.1 Kontext's and Qwen-Image-Edit's nodes, with ComfyUI's own inputs and choices)."""
    def node(required: dict, outputs: list[str], *, output_node: bool = False, category: str = "",
             optional: dict | None = None) -> dict:
        optional = optional or {}
        return {"input": {"required": required, "optional": optional},
                "input_order": {"required": list(required), **({"optional": list(optional)} if optional else {})},
                "output": outputs, "output_is_list": [False] * len(outputs), "output_name": outputs,
                "output_node": output_node, "category": category, "description": "", "python_module": "nodes",
                "deprecated": False, "experimental": False}

    defs = {
        "CheckpointLoaderSimple": node({"ckpt_name": [list(checkpoints), {}]}, ["MODEL", "CLIP", "VAE"], category="loaders"),
        "LoraLoader": node({"model": ["MODEL"], "clip": ["CLIP"], "lora_name": [list(loras), {}],
                            "strength_model": _float(-100, 100, 1.0), "strength_clip": _float(-100, 100, 1.0)},
                           ["MODEL", "CLIP"], category="loaders"),
        "LoraLoaderModelOnly": node({"model": ["MODEL"], "lora_name": [list(loras), {}],
                                     "strength_model": _float(-100, 100, 1.0)}, ["MODEL"], category="loaders"),
        "UNETLoader": node({"unet_name": [list(unets), {}],
                            "weight_dtype": [["default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"], {}]},
                           ["MODEL"], category="advanced/loaders"),
        "DualCLIPLoader": node({"clip_name1": [list(text_encoders), {}], "clip_name2": [list(text_encoders), {}],
                                "type": [["sdxl", "sd3", "flux", "hunyuan_video", "hidream"], {}]},
                               ["CLIP"], category="advanced/loaders"),
        "VAELoader": node({"vae_name": [list(vaes), {}]}, ["VAE"], category="loaders"),
        "FluxGuidance": node({"conditioning": ["CONDITIONING"], "guidance": _float(0.0, 100.0, 3.5)},
                             ["CONDITIONING"], category="advanced/conditioning/flux"),
        "CLIPSetLastLayer": node({"clip": ["CLIP"], "stop_at_clip_layer": _int(-24, -1, -1)}, ["CLIP"]),
        "CLIPTextEncode": node({"text": ["STRING", {"multiline": True}], "clip": ["CLIP"]}, ["CONDITIONING"]),
        "EmptyLatentImage": node({"width": _int(16, 16384, 512), "height": _int(16, 16384, 512),
                                  "batch_size": _int(1, 4096, 1)}, ["LATENT"], category="latent"),
        "KSampler": node({"model": ["MODEL"], "seed": _int(0, 0xFFFFFFFFFFFFFFFF, 0), "steps": _int(1, 10000, 20),
                          "cfg": _float(0.0, 100.0, 8.0), "sampler_name": [SAMPLERS, {}], "scheduler": [SCHEDULERS, {}],
                          "positive": ["CONDITIONING"], "negative": ["CONDITIONING"], "latent_image": ["LATENT"],
                          "denoise": _float(0.0, 1.0, 1.0)}, ["LATENT"], category="sampling"),
        "VAEDecode": node({"samples": ["LATENT"], "vae": ["VAE"]}, ["IMAGE"], category="latent"),
        "VAEEncode": node({"pixels": ["IMAGE"], "vae": ["VAE"]}, ["LATENT"], category="latent"),
        "LatentUpscaleBy": node({"samples": ["LATENT"], "upscale_method": [UPSCALE_METHODS, {}],
                                 "scale_by": _float(0.01, 8.0, 1.5)}, ["LATENT"], category="latent"),
        "ImageScale": node({"image": ["IMAGE"], "upscale_method": [UPSCALE_METHODS, {}], "width": _int(0, 16384, 512),
                            "height": _int(0, 16384, 512), "crop": [["disabled", "center"], {}]}, ["IMAGE"]),
        "ImageScaleBy": node({"image": ["IMAGE"], "upscale_method": [UPSCALE_METHODS, {}],
                              "scale_by": _float(0.01, 8.0, 1.0)}, ["IMAGE"]),
        "LoadImage": node({"image": [list(images), {"image_upload": True}]}, ["IMAGE", "MASK"], category="image"),
        "ControlNetLoader": node({"control_net_name": [list(controlnets), {}]}, ["CONTROL_NET"], category="loaders"),
        "ControlNetApplyAdvanced": node({"positive": ["CONDITIONING"], "negative": ["CONDITIONING"],
                                         "control_net": ["CONTROL_NET"], "image": ["IMAGE"],
                                         "strength": _float(0.0, 10.0, 1.0), "start_percent": _float(0.0, 1.0, 0.0),
                                         "end_percent": _float(0.0, 1.0, 1.0)}, ["CONDITIONING", "CONDITIONING"]),
        # Image-edit models: comfy_extras/nodes_flux.py, nodes_edit_model.py, nodes_qwen.py, nodes_model_advanced.py
        "FluxKontextImageScale": node({"image": ["IMAGE"]}, ["IMAGE"], category="advanced/conditioning/flux"),
        "ReferenceLatent": node({"conditioning": ["CONDITIONING"]}, ["CONDITIONING"], optional={"latent": ["LATENT"]},
                                category="advanced/conditioning/edit_models"),
        "ConditioningZeroOut": node({"conditioning": ["CONDITIONING"]}, ["CONDITIONING"], category="advanced/conditioning"),
        "CLIPLoader": node({"clip_name": [list(text_encoders), {}], "type": [CLIP_TYPES, {}]}, ["CLIP"],
                           optional={"device": [["default", "cpu"], {}]}, category="advanced/loaders"),
        "ModelSamplingAuraFlow": node({"model": ["MODEL"], "shift": _float(0.0, 100.0, 1.73)}, ["MODEL"],
                                      category="advanced/model"),
        "TextEncodeQwenImageEdit": node({"clip": ["CLIP"], "prompt": ["STRING", {"multiline": True}]}, ["CONDITIONING"],
                                        optional={"vae": ["VAE"], "image": ["IMAGE"]}, category="advanced/conditioning"),
        "ImageScaleToTotalPixels": node({"image": ["IMAGE"], "upscale_method": [UPSCALE_METHODS[:4] + ["lanczos"], {}],
                                         "megapixels": _float(0.01, 16.0, 1.0)}, ["IMAGE"], category="image/upscaling"),
        "EmptySD3LatentImage": node({"width": _int(16, 16384, 1024), "height": _int(16, 16384, 1024),
                                     "batch_size": _int(1, 4096, 1)}, ["LATENT"], category="latent/sd3"),
        # Image-to-video (Wan 2.x): comfy_extras/nodes_wan.py, nodes_model_advanced.py, nodes_video.py, nodes.py
        "CLIPVisionLoader": node({"clip_name": [list(clip_visions), {}]}, ["CLIP_VISION"], category="loaders"),
        "CLIPVisionEncode": node({"clip_vision": ["CLIP_VISION"], "image": ["IMAGE"], "crop": [["center", "none"], {}]},
                                 ["CLIP_VISION_OUTPUT"], category="conditioning"),
        "WanImageToVideo": node({"positive": ["CONDITIONING"], "negative": ["CONDITIONING"], "vae": ["VAE"],
                                 "width": _int(16, 16384, 832), "height": _int(16, 16384, 480),
                                 "length": _int(1, 16384, 81), "batch_size": _int(1, 4096, 1)},
                                ["CONDITIONING", "CONDITIONING", "LATENT"],
                                optional={"clip_vision_output": ["CLIP_VISION_OUTPUT"], "start_image": ["IMAGE"]},
                                category="conditioning/video_models"),
        "ModelSamplingSD3": node({"model": ["MODEL"], "shift": _float(0.0, 100.0, 3.0)}, ["MODEL"],
                                 category="advanced/model"),
        "CreateVideo": node({"images": ["IMAGE"], "fps": _float(1.0, 120.0, 30.0)}, ["VIDEO"],
                            optional={"audio": ["AUDIO"]}, category="image/video"),
        "SaveVideo": node({"video": ["VIDEO"], "filename_prefix": ["STRING", {"default": "video/ComfyUI"}],
                           "format": [["auto", "mp4"], {}], "codec": [["auto", "h264"], {}]}, [], output_node=True,
                          category="image/video"),
        "SaveImage": node({"images": ["IMAGE"], "filename_prefix": ["STRING", {"default": "ComfyUI"}]}, [],
                          output_node=True, category="image"),
        "PreviewImage": node({"images": ["IMAGE"]}, [], output_node=True, category="image"),
    }
    for name, definition in defs.items():
        definition.update(name=name, display_name=name)
    return defs


_ROWS: dict[tuple[int, int], tuple[bytes, bytes]] = {}   # (width, height) -> (rows 1.., their raw deflate)


def png_bytes(width: int, height: int, rgb: tuple[int, int, int]) -> bytes:
    """A solid-colour RGB PNG, cheap enough for the fake's CPU not to weigh on the benchmarks
    (~0.5 ms at 512x512, where PIL takes ~3 ms). Row 0 uses the Sub filter (the colour, then zero
    deltas), every other row the Up filter (all zeros), so only row 0 depends on the colour: its
    deflate block is made per image and flushed to a byte boundary, and the cached, independently
    compressed block of the other rows follows it in the same zlib stream."""
    head = b"\x01" + bytes(rgb) + bytes(3 * width - 3)
    if (width, height) not in _ROWS:
        rows = (b"\x02" + bytes(3 * width)) * (height - 1)
        packer = zlib.compressobj(6, zlib.DEFLATED, -15)
        _ROWS[(width, height)] = (rows, packer.compress(rows) + packer.flush())
    rows, packed_rows = _ROWS[(width, height)]
    packer = zlib.compressobj(1, zlib.DEFLATED, -15)
    packed_head = packer.compress(head) + packer.flush(zlib.Z_FULL_FLUSH)
    checksum = zlib.adler32(rows, zlib.adler32(head))
    idat = b"\x78\x01" + packed_head + packed_rows + struct.pack(">I", checksum)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def mp4_bytes(width: int, height: int, frames: int, fps: float, rgb: tuple[int, int, int]) -> bytes:
    """A small H.264 MP4 (PyAV): `frames` frames of the colour with a bar moving across, so consecutive
    frames differ as a clip's do."""
    import os
    import tempfile
    from fractions import Fraction

    import av
    import numpy as np

    handle, name = tempfile.mkstemp(suffix=".mp4")
    os.close(handle)
    try:
        with av.open(name, mode="w", format="mp4") as container:
            rate = Fraction(fps).limit_denominator(1000)
            stream = container.add_stream("libx264", rate=rate)
            stream.width, stream.height, stream.pix_fmt = width - width % 2, height - height % 2, "yuv420p"
            stream.codec_context.options = {"preset": "ultrafast"}
            picture = np.empty((stream.height, stream.width, 3), np.uint8)
            for k in range(frames):
                picture[:] = rgb
                left = (k * stream.width) // max(1, frames)
                picture[:, left:left + max(2, stream.width // 8)] = (255, 255, 255)
                frame = av.VideoFrame.from_ndarray(picture, format="rgb24").reformat(format="yuv420p")
                frame.pts, frame.time_base = k, 1 / rate
                container.mux(stream.encode(frame))
            container.mux(stream.encode(None))
        with open(name, "rb") as handle_:
            return handle_.read()
    finally:
        os.unlink(name)


def seed_colour(seed: int, index: int) -> tuple[int, int, int]:
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return digest[0], digest[1], digest[2]


# (exception_type, exception_message) of the injected execution errors, as a real ComfyUI sends them.
OUT_OF_MEMORY = ("torch.OutOfMemoryError",
                 "CUDA out of memory. Tried to allocate 2.25 GiB. GPU 0 has a total capacity of 23.65 GiB of which "
                 "1.09 GiB is free. Of the allocated memory 20.80 GiB is allocated by PyTorch, and 615.21 MiB is "
                 "reserved by PyTorch but unallocated.\nThis error means you ran out of memory on your GPU.\n\n"
                 "TIPS: If the workflow worked before you might have accidentally set the batch_size to a large number.")
GRAPH_FAULT = ("RuntimeError", "mat1 and mat2 shapes cannot be multiplied (154x2048 and 768x320)\n")



def _is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def topological_order(graph: dict) -> list[str]:
    """Node ids with every node after the nodes it links from (ids sorted for a stable order)."""
    order: list[str] = []
    state: dict[str, int] = {}

    def visit(node_id: str) -> None:
        if state.get(node_id) == 2 or node_id not in graph:
            return
        state[node_id] = 1
        for value in graph[node_id].get("inputs", {}).values():
            if _is_link(value) and state.get(value[0]) != 1:
                visit(value[0])
        state[node_id] = 2
        order.append(node_id)

    for node_id in sorted(graph, key=lambda n: (len(n), n)):
        visit(node_id)
    return order


def validate_prompt(graph: dict, defs: dict) -> tuple[dict | None, list[str]]:
    """(None, output node ids) or (ComfyUI's 400 body, [])."""
    for node_id, node in graph.items():
        class_type = node.get("class_type") if isinstance(node, dict) else None
        if class_type is None:
            return _top_error("invalid_prompt", "Cannot execute because a node is missing the class_type property.",
                              f"Node ID '#{node_id}'"), []
        if class_type not in defs:
            return _top_error("invalid_prompt", f"Cannot execute because node {class_type} does not exist.",
                              f"Node ID '#{node_id}'"), []
    outputs = [n for n, node in graph.items() if defs[node["class_type"]]["output_node"]]
    if not outputs:
        return _top_error("prompt_no_outputs", "Prompt has no outputs", ""), []
    node_errors: dict[str, dict] = {}
    for node_id, node in graph.items():
        errors = _node_errors(graph, node_id, node, defs[node["class_type"]])
        if errors:
            node_errors[node_id] = {"errors": errors, "dependent_outputs": _dependents(graph, node_id, outputs),
                                    "class_type": node["class_type"]}
    if node_errors:
        body = _top_error("prompt_outputs_failed_validation", "Prompt outputs failed validation", "")
        body["node_errors"] = node_errors
        return body, []
    return None, outputs


def _top_error(kind: str, message: str, details: str) -> dict:
    return {"error": {"type": kind, "message": message, "details": details, "extra_info": {}}, "node_errors": {}}


def _node_errors(graph: dict, node_id: str, node: dict, definition: dict) -> list[dict]:
    errors = []
    inputs = node.get("inputs") or {}
    required = definition["input"]["required"]
    for name, config in {**required, **definition["input"].get("optional", {})}.items():
        extra = {"input_name": name, "input_config": config}
        if name not in inputs:
            if name in required:
                errors.append({"type": "required_input_missing", "message": "Required input is missing",
                               "details": name, "extra_info": extra})
            continue
        value = inputs[name]
        kind = config[0]
        if isinstance(value, list):
            if not _is_link(value):
                errors.append({"type": "bad_linked_input",
                               "message": "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                               "details": name, "extra_info": {**extra, "received_value": value}})
            elif value[0] not in graph:
                errors.append({"type": "exception_during_inner_validation", "message": "Exception when validating inner node",
                               "details": f"{name}: linked node '{value[0]}' is not in the prompt",
                               "extra_info": {**extra, "linked_node": value}})
            else:
                source = graph[value[0]]["class_type"]
                source_outputs = _OUTPUTS.get(source)
                if source_outputs is not None and not 0 <= value[1] < len(source_outputs):
                    errors.append({"type": "bad_linked_input", "message": "Bad linked input",
                                   "details": f"{name}: node '{value[0]}' ({source}) has no output {value[1]}",
                                   "extra_info": {**extra, "linked_node": value}})
                elif source_outputs is not None and isinstance(kind, str) and source_outputs[value[1]] != kind:
                    # As execution.validate_inputs: a link must carry the type the input takes.
                    received = source_outputs[value[1]]
                    errors.append({"type": "return_type_mismatch", "message": "Return type mismatch between linked nodes",
                                   "details": f"{name}, received_type({received}) mismatch input_type({kind})",
                                   "extra_info": {**extra, "received_type": received, "linked_node": value}})
            continue
        extra["received_value"] = value
        if isinstance(kind, list):
            if value not in kind:
                shown = kind if len(kind) <= 30 else f"(list of length {len(kind)})"
                errors.append({"type": "value_not_in_list", "message": "Value not in list",
                               "details": f"{name}: '{value}' not in {shown}", "extra_info": extra})
        elif kind in ("INT", "FLOAT"):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                errors.append({"type": "invalid_input_type", "message": f"Failed to convert an input value to a {kind} value",
                               "details": f"{name}, {value}", "extra_info": extra})
                continue
            limits = config[1]
            if value < limits["min"]:
                errors.append({"type": "value_smaller_than_min", "message": f"Value {value} smaller than min of {limits['min']}",
                               "details": name, "extra_info": extra})
            if value > limits["max"]:
                errors.append({"type": "value_bigger_than_max", "message": f"Value {value} bigger than max of {limits['max']}",
                               "details": name, "extra_info": extra})
    return errors


_OUTPUTS = {name: d["output"] for name, d in node_definitions([], [], [], []).items()}


def _dependents(graph: dict, node_id: str, outputs: list[str]) -> list[str]:
    def reaches(start: str, seen: set[str]) -> bool:
        if start == node_id:
            return True
        seen.add(start)
        return any(_is_link(v) and v[0] in graph and v[0] not in seen and reaches(v[0], seen)
                   for v in graph[start].get("inputs", {}).values())

    return [o for o in outputs if reaches(o, set())]


def output_size(graph: dict, input_size) -> tuple[int, int]:
    """The pixel size of what the (first) KSampler draws, followed back through the graph as ComfyUI
    computes it: an empty latent's size, or the encoded image's after its scaling nodes (ImageScale,
    FluxKontextImageScale, ImageScaleToTotalPixels...). `input_size(name)` is an uploaded image's size."""
    sampler = next((n for n in graph.values() if n.get("class_type") == "KSampler"), None)
    source = sampler["inputs"].get("latent_image") if sampler else None
    return _latent_size(graph, source, input_size) if _is_link(source) else (64, 64)


def _latent_size(graph: dict, link: list, input_size) -> tuple[int, int]:
    node = graph.get(link[0], {})
    kind, inputs = node.get("class_type"), node.get("inputs", {})
    if kind in ("EmptyLatentImage", "EmptySD3LatentImage", "WanImageToVideo"):
        return int(inputs["width"]), int(inputs["height"])
    if kind == "VAEEncode" and _is_link(inputs.get("pixels")):
        return _image_size(graph, inputs["pixels"], input_size)
    if kind == "LatentUpscaleBy" and _is_link(inputs.get("samples")):
        width, height = _latent_size(graph, inputs["samples"], input_size)
        return round(width * float(inputs["scale_by"])), round(height * float(inputs["scale_by"]))
    return 64, 64


def _image_size(graph: dict, link: list, input_size) -> tuple[int, int]:
    node = graph.get(link[0], {})
    kind, inputs = node.get("class_type"), node.get("inputs", {})
    if kind == "LoadImage":
        return input_size(str(inputs.get("image")))
    width, height = _image_size(graph, inputs["image"], input_size) if _is_link(inputs.get("image")) else (64, 64)
    if kind == "ImageScale":
        want_w, want_h = int(inputs["width"]), int(inputs["height"])
        return (want_w or round(width * want_h / height)), (want_h or round(height * want_w / width))
    if kind == "ImageScaleBy":
        return round(width * float(inputs["scale_by"])), round(height * float(inputs["scale_by"]))
    if kind == "FluxKontextImageScale":
        return min(KONTEXT_RESOLUTIONS, key=lambda size: abs(width / height - size[0] / size[1]))
    if kind == "ImageScaleToTotalPixels":
        scale = (float(inputs["megapixels"]) * 1024 * 1024 / (width * height)) ** 0.5
        return round(width * scale), round(height * scale)
    return width, height
