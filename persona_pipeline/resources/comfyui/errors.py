"""The client's errors, and how ComfyUI's error payloads (a 400 from `/prompt`, an `execution_error`,
an `execution_interrupted`) become them.

Which of them are retried, and where, is the scheduler's business (`scheduler.py`); the ComfyUI
protocol facts behind them are restated in docs/rules.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from persona_pipeline.domain.comfy_errors import is_out_of_memory


@dataclass(frozen=True)
class NodeError:
    """One node's complaint, as ComfyUI reports it."""

    node_id: str
    class_type: str
    message: str

    def __str__(self) -> str:
        return f"node {self.node_id} ({self.class_type}): {self.message}"


class ComfyUIError(RuntimeError):
    """Base of the client's errors; `server` is the base URL involved, when there is one."""

    kind = "error"

    def __init__(self, message: str, *, server: str | None = None) -> None:
        super().__init__(message)
        self.server = server


class ComfyUINodeFailure(ComfyUIError):
    """ComfyUI's report against nodes of the graph: the message lists each node's error."""

    def __init__(self, message: str, node_errors: list[NodeError] | tuple = (), *, server: str | None = None,
                 error_type: str = "", details: dict | None = None) -> None:
        self.node_errors = list(node_errors)
        self.error_type = error_type
        self.details = details or {}
        lines = [message] + [f"  {error}" for error in self.node_errors]
        super().__init__("\n".join(lines), server=server)


class ComfyUIWorkflowError(ComfyUINodeFailure):
    """The graph itself is wrong (or needs a file no server has): permanent, never retried."""

    kind = "workflow"


class ComfyUIOutOfMemory(ComfyUINodeFailure):
    """The server ran out of (GPU) memory running the job: the graph may well run elsewhere or later."""

    kind = "resource"

    def __init__(self, message: str, node_errors: list[NodeError] | tuple = (), *, server: str | None = None,
                 details: dict | None = None) -> None:
        super().__init__(message, node_errors, server=server, error_type="out_of_memory", details=details)


class ComfyUITransientError(ComfyUIError):
    """The server failed, not the graph: worth another server."""

    kind = "transient"


class ComfyUITimeout(ComfyUIError):
    """The job ran past its timeout; the server was told to drop and interrupt it."""

    kind = "timeout"


class ComfyUIUnavailable(ComfyUIError):
    """No healthy server could take the job."""

    kind = "unavailable"


class ComfyUIInterrupted(ComfyUIError):
    """Someone else interrupted the prompt on the server (the UI's cancel button, another client)."""

    kind = "interrupted"


def refused_prompt_error(body: object, server: str, key: str) -> ComfyUIWorkflowError:
    """The error of a 400 from `POST /prompt`: its type, top-level message and every node error."""
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        kind = str(error.get("type", ""))
        message = str(error.get("message", "")) or kind
        if error.get("details"):
            message += f" ({error['details']})"
    else:
        kind, message = "", str(error or body)
    node_errors = []
    for node_id, entry in ((body.get("node_errors") or {}) if isinstance(body, dict) else {}).items():
        class_type = str(entry.get("class_type", "?")) if isinstance(entry, dict) else "?"
        for item in (entry.get("errors") or []) if isinstance(entry, dict) else []:
            if isinstance(item, dict):
                text = str(item.get("message", ""))
                if item.get("details"):
                    text += f": {item['details']}"
            else:
                text = str(item)
            node_errors.append(NodeError(str(node_id), class_type, text))
    return ComfyUIWorkflowError(f"ComfyUI at {server} refused job {key}: {message}", node_errors, server=server,
                                error_type=kind, details=body if isinstance(body, dict) else {})


def execution_error(data: dict, server: str, key: str) -> ComfyUIWorkflowError | ComfyUIOutOfMemory:
    """An `execution_error` (WebSocket message or /history entry): out of memory, or the graph's fault."""
    message = str(data.get("exception_message", "")).strip()
    node = NodeError(str(data.get("node_id", "?")), str(data.get("node_type", "?")), message or "(no message)")
    kind = str(data.get("exception_type", "")) or "execution_error"
    details = {"traceback": data.get("traceback"), "exception_type": kind}
    if is_out_of_memory(kind, message):
        return ComfyUIOutOfMemory(f"ComfyUI at {server} ran out of GPU memory on job {key} ({kind})", [node],
                                  server=server, details=details)
    return ComfyUIWorkflowError(f"ComfyUI at {server} failed job {key} while executing ({kind})", [node],
                                server=server, error_type="execution_error", details=details)


def interrupted_error(data: dict, server: str, key: str, by: str = "") -> ComfyUIInterrupted:
    """An `execution_interrupted` (WebSocket message or /history entry); `by` says who, when known."""
    return ComfyUIInterrupted(f"job {key} was interrupted on {server} at node {data.get('node_id')} "
                              f"({data.get('node_type')}){by}", server=server)
