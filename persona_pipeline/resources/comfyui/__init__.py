"""ComfyUI client over HTTP and WebSocket, with a pool of servers (the ComfyUI protocol facts it
relies on are restated in docs/rules.md).

One job = one API-format graph; `ComfyUIPool.run_jobs` runs a batch of them over the healthy
servers and never raises for a job's failure: each job ends as a `ComfyResult` or a `ComfyFailure`,
handed to `on_done` (from a worker thread) as soon as it ends, and returned in job order.

The package, one concern a module:
- `resource.py`: `ComfyUIPool`, the Dagster resource (configuration, `health`, `run_jobs`);
- `scheduler.py`: one run_jobs call, jobs over servers: dispatch, retries, down servers revived;
- `routing.py`: server setup at the start of a call, and which servers each job may go to;
- `attempt.py`: one job on one server: upload, submit, wait, download, write;
- `waits.py`: waiting for a prompt on its WebSocket inbox, the `/history` fallback, saved files;
- `channel.py`: the WebSocket per server and the reader thread that routes its messages;
- `http.py`: every HTTP endpoint the pool uses, and the health probe;
- `catalogue.py`: the model files a graph names and a server lists;
- `jobs.py`, `errors.py`: what callers pass and get back, and the errors.
"""

from persona_pipeline.resources.comfyui.catalogue import MODEL_INPUTS, combo_values, normalise_name, required_models
from persona_pipeline.resources.comfyui.errors import (ComfyUIError, ComfyUIInterrupted, ComfyUIOutOfMemory,
                                                       ComfyUITimeout, ComfyUITransientError, ComfyUIUnavailable,
                                                       ComfyUIWorkflowError, NodeError)
from persona_pipeline.resources.comfyui.http import ServerHealth
from persona_pipeline.resources.comfyui.jobs import ComfyFailure, ComfyJob, ComfyResult
from persona_pipeline.resources.comfyui.resource import ComfyUIPool

__all__ = [
    "MODEL_INPUTS", "ComfyFailure", "ComfyJob", "ComfyResult", "ComfyUIError", "ComfyUIInterrupted",
    "ComfyUIOutOfMemory", "ComfyUIPool", "ComfyUITimeout", "ComfyUITransientError", "ComfyUIUnavailable",
    "ComfyUIWorkflowError", "NodeError", "ServerHealth", "combo_values", "normalise_name", "required_models",
]
