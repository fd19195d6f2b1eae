"""A fake ComfyUI: its protocol (protocol.py), the server (server.py) and the server in a
subprocess (process.py; `python -m persona_fakes.comfyui`)."""

from persona_fakes.comfyui.process import FakeComfyUIProcess
from persona_fakes.comfyui.protocol import GRAPH_FAULT, OUT_OF_MEMORY
from persona_fakes.comfyui.server import FakeComfyUI

__all__ = ["GRAPH_FAULT", "OUT_OF_MEMORY", "FakeComfyUI", "FakeComfyUIProcess"]
