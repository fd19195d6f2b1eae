"""What a ComfyUI `execution_error` means for a retry.

ComfyUI reports every exception a node raises the same way (`execution_error` with
`exception_type`, the full class name, and `exception_message`), whether the graph is wrong or the
GPU ran out of memory. The two call for opposite handling:

- out of memory is a resource fault: the same graph may well run on another server, or on the
  same one a little later (ComfyUI unloads its models after an OOM; another client's prompt may
  have held the memory). It is retried, a bounded number of times;
- anything else (a node's ValueError, a bad tensor shape, a missing file) fails the same way on
  every server: never retried.

ComfyUI names torch's OOM `torch.OutOfMemoryError` (torch >= 2.5) or `torch.cuda.OutOfMemoryError`,
with messages such as "CUDA out of memory. Tried to allocate 2.00 GiB..." or "Allocation on device 0
would exceed allowed memory. (out of memory)"; an OOM inside a CUDA kernel arrives as a plain
RuntimeError "CUDA error: out of memory"; host memory as MemoryError.
"""

from __future__ import annotations

OOM_TYPES = frozenset({"OutOfMemoryError", "MemoryError"})  # the class name, any module
OOM_MESSAGES = ("cuda out of memory", "hip out of memory", "xpu out of memory", "mps backend out of memory",
                "cuda error: out of memory", "allocation on device")


def is_out_of_memory(exception_type: str | None, exception_message: str | None) -> bool:
    """True for an out-of-memory `execution_error` (a resource fault, worth another try)."""
    name = (exception_type or "").strip().rsplit(".", 1)[-1]
    if name in OOM_TYPES:
        return True
    message = (exception_message or "").lower()
    return any(marker in message for marker in OOM_MESSAGES)
