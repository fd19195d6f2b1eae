"""Which ComfyUI `execution_error`s are out of memory (retried) and which are the graph's (never)."""

from __future__ import annotations

import pytest

from persona_pipeline.domain.comfy_errors import is_out_of_memory


@pytest.mark.parametrize("exception_type, message", [
    # how ComfyUI names torch's OOM (full_type_name of the class), with its tips appended
    ("torch.OutOfMemoryError", "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of "
                               "23.65 GiB of which 1.19 GiB is free.\nThis error means you ran out of memory on your GPU."),
    ("torch.cuda.OutOfMemoryError", "CUDA out of memory. Tried to allocate 512.00 MiB"),
    ("torch.OutOfMemoryError", "Allocation on device 0 would exceed allowed memory. (out of memory)"),
    ("torch.OutOfMemoryError", ""),                       # the type alone says it
    ("torch.OutOfMemoryError", "HIP out of memory. Tried to allocate 2.25 GiB."),
    ("RuntimeError", "CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported"),
    ("RuntimeError", "MPS backend out of memory (MPS allocated: 17.00 GB)"),
    ("MemoryError", ""),                                  # host memory
    ("", "Allocation on device \nThis error means you ran out of memory on your GPU."),
])
def test_out_of_memory(exception_type, message):
    assert is_out_of_memory(exception_type, message)


@pytest.mark.parametrize("exception_type, message", [
    ("RuntimeError", "mat1 and mat2 shapes cannot be multiplied (154x2048 and 768x320)"),
    ("ValueError", "sampler_name 'euler_a' is not a valid sampler"),
    ("FileNotFoundError", "[Errno 2] No such file or directory: 'input/missing.png'"),
    ("KeyError", "'model.diffusion_model.input_blocks.0.0.weight'"),
    ("comfy_extras.nodes.SomeOutOfMemoryErrorHandler", "unrelated"),  # only the class name counts, exactly
    ("", ""),
    (None, None),
])
def test_graph_faults_are_not_out_of_memory(exception_type, message):
    assert not is_out_of_memory(exception_type, message)
