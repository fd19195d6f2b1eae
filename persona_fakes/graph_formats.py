"""The fake Graph API with every post format: `FakeFormatsGraphAPI` is a FakeGraphAPI
(persona_fakes/graph.py) whose POST /{user}/media also takes, as the content-publishing API does:

- a carousel item: `is_carousel_item=true` + image_url (a feed JPEG, 4:5..1.91:1), no caption;
- a carousel: `media_type=CAROUSEL` + `children` (2..10 comma-separated item containers of this
  account, each FINISHED) + caption: one container, one publish, one unit of the 24 h quota;
- a reel: `media_type=REELS` + video_url (fetched: an MP4 whose first box is `ftyp`, at most
  300 MiB) + caption, `share_to_feed`, `cover_url` (fetched: a JPEG) or `thumb_offset`;
- a story: `media_type=STORIES` + image_url (a JPEG of 9:16) or video_url (at most 100 MiB).

A video container is IN_PROGRESS for `video_ready_after_s` on the fake clock, then FINISHED.
GET /{container}?fields=status_code,status answers `status` too ("Finished: ..." or the error).

Faults, each for the next containers of its kind (`times`):
- `fail_items(times, reason)`: carousel item containers end in ERROR (a child container that errors);
- `stick_videos(times)`: video containers stay IN_PROGRESS for ever;
- `fail_videos(times, reason)`: video containers end in ERROR during processing, with `reason`;
- an image of the wrong aspect for its format: code 36003 subcode 2207009, as Meta answers.

Resumable upload (a video with no public URL): `upload_type=resumable` on a REELS or STORIES container
(no video_url) answers {"id", "uri"}; POST uri with `Authorization: OAuth <token>`, `offset` (the bytes
received so far, else 400) and `file_size` headers and the bytes from the offset appends them; the
container is IN_PROGRESS, not processed, until all `file_size` bytes are in, then checked as a fetched
video and processed for `video_ready_after_s`. GET /{container}?fields=video_status answers
{"uploading_phase": {"status": not_started|in_progress|complete, "bytes_transferred": N}}.
Fault `interrupt_uploads(times, after_bytes)`: the next upload POSTs keep only their first `after_bytes`
bytes and drop the connection without an answer (an interrupted upload, resumed at its offset).

Records: `kinds[container] = {"media_type", "children", "fields"}`, `item_creates(user)`, `uploads[container]`.
"""

from __future__ import annotations

import io
from collections import deque
from typing import Any

from persona_fakes.graph import MAX_MEDIA_BYTES, Container, FakeGraphAPI, RecordedRequest, _graph_error

CAROUSEL_MAX = 10
REEL_MAX_BYTES = 300 * 1024 * 1024
STORY_VIDEO_MAX_BYTES = 100 * 1024 * 1024
VERTICAL = 9 / 16
VERTICAL_TOLERANCE = 0.01


class FakeFormatsGraphAPI(FakeGraphAPI):
    def __init__(self, *args, video_ready_after_s: float = 30.0, **kwargs) -> None:
        self.video_ready_after_s = video_ready_after_s
        self.kinds: dict[str, dict[str, Any]] = {}
        self._item_faults: deque[str] = deque()
        self._video_faults: deque[str] = deque()
        self.errors: dict[str, str] = {}  # container -> the ERROR reason its status gives
        self.uploads: dict[str, dict[str, Any]] = {}  # resumable container -> {"data", "size", "posts", "media_type"}
        self._upload_faults: deque[int] = deque()
        super().__init__(*args, **kwargs)

    # --- faults ---------------------------------------------------------------------------------

    def fail_items(self, times: int = 1, reason: str = "The media could not be processed (item)") -> None:
        with self._lock:
            self._item_faults.extend([f"error:{reason}"] * times)

    def stick_videos(self, times: int = 1) -> None:
        with self._lock:
            self._video_faults.extend(["stuck"] * times)

    def fail_videos(self, times: int = 1, reason: str = "ERROR: Video processing failed: unsupported audio") -> None:
        with self._lock:
            self._video_faults.extend([f"error:{reason}"] * times)

    def interrupt_uploads(self, times: int = 1, after_bytes: int = 4096) -> None:
        with self._lock:
            self._upload_faults.extend([after_bytes] * times)

    # --- records --------------------------------------------------------------------------------

    def item_creates(self, user_id: str | None = None) -> list[str]:
        """Item containers made (for `user_id`), in order: none may be made twice for one post's item."""
        with self._lock:
            return [cid for cid, kind in self.kinds.items() if kind["media_type"] == "CAROUSEL_ITEM"
                    and (user_id is None or self.containers[cid].user_id == str(user_id))]

    # --- handlers -------------------------------------------------------------------------------

    def _create(self, user_id: str, params: dict[str, str]) -> dict[str, Any]:
        media_type = params.get("media_type", "").upper()
        is_item = params.get("is_carousel_item", "").lower() == "true"
        if not media_type and not is_item:
            answer = super()._create(user_id, params)  # a feed image, as before
            self.kinds[answer["id"]] = {"media_type": "IMAGE", "fields": _public(params)}
            return answer
        self._authorize(user_id, params)
        if is_item:
            return self._item(user_id, params)
        if media_type == "CAROUSEL":
            return self._carousel(user_id, params)
        if media_type in ("REELS", "STORIES"):
            return self._single(user_id, media_type, params)
        raise _graph_error(100, None, f"The parameter media_type has an invalid value {media_type!r}")

    def _new(self, user_id: str, url: str, caption: str, media_type: str, params: dict[str, str],
             ready_after: float = 0.0, children: list[str] | None = None) -> Container:
        with self._lock:
            now = self.now()
            container = Container(self._new_id(179), user_id, url, caption, now, now + ready_after)
            self._container_state(container)
            self.containers[container.id] = container
            self.kinds[container.id] = {"media_type": media_type, "children": children or [], "fields": _public(params)}
            return container

    def _item(self, user_id: str, params: dict[str, str]) -> dict[str, Any]:
        url = params.get("image_url", "")
        if not url:
            raise _graph_error(100, None, "The parameter image_url is required for a carousel item")
        if self.fetch_media:
            self._check_media(url)  # a feed JPEG: 4:5..1.91:1, at most 8 MiB
        container = self._new(user_id, url, "", "CAROUSEL_ITEM", params)
        with self._lock:
            fault = self._item_faults.popleft() if self._item_faults else None
            if fault:
                container.state = "ERROR"
                self.errors[container.id] = fault.split(":", 1)[1]
        return {"id": container.id}

    def _carousel(self, user_id: str, params: dict[str, str]) -> dict[str, Any]:
        children = [c for c in params.get("children", "").split(",") if c]
        if not 2 <= len(children) <= CAROUSEL_MAX:
            raise _graph_error(100, 2207050 if children else None,
                               f"The carousel must have 2 to {CAROUSEL_MAX} children, got {len(children)}")
        with self._lock:
            for child in children:
                container = self.containers.get(child)
                kind = self.kinds.get(child, {})
                if container is None or container.user_id != user_id or kind.get("media_type") != "CAROUSEL_ITEM":
                    raise _graph_error(100, 33, f"Invalid children: {child} is not a carousel item container "
                                                "of this account", kind="GraphMethodException")
                state = self._container_state(container)
                if state != "FINISHED":
                    raise _graph_error(9007 if state == "IN_PROGRESS" else 100, 2207027 if state == "IN_PROGRESS"
                                       else None, f"Child container {child} is {state}")
        caption = params.get("caption", "")
        self._check_caption(caption)
        return {"id": self._new(user_id, "", caption, "CAROUSEL", params, children=children).id}

    def _single(self, user_id: str, media_type: str, params: dict[str, str]) -> dict[str, Any]:
        video, image = params.get("video_url", ""), params.get("image_url", "")
        caption = params.get("caption", "")
        if params.get("upload_type") == "resumable":
            if video or image:
                raise _graph_error(100, None, "A resumable upload takes no video_url or image_url")
            self._check_caption(caption)
            container = self._new(user_id, "", caption, media_type, params, ready_after=float("inf"))
            with self._lock:
                self.uploads[container.id] = {"data": bytearray(), "size": None, "posts": 0, "media_type": media_type}
            return {"id": container.id, "uri": f"{self.origin}/ig-api-upload/v23.0/{container.id}"}
        if media_type == "REELS" and not video:
            raise _graph_error(100, None, "The parameter video_url is required for REELS")
        if not video and not image:
            raise _graph_error(100, None, "The parameter image_url or video_url is required for STORIES")
        self._check_caption(caption)
        if video:
            if self.fetch_media:
                self._check_video(video, REEL_MAX_BYTES if media_type == "REELS" else STORY_VIDEO_MAX_BYTES)
                if params.get("cover_url"):
                    self._check_jpeg(self._fetch(params["cover_url"], MAX_MEDIA_BYTES), vertical=None)
            container = self._new(user_id, video, caption, media_type, params, ready_after=self.video_ready_after_s)
            with self._lock:
                fault = self._video_faults.popleft() if self._video_faults else None
                if fault == "stuck":
                    container.ready_at = float("inf")
                elif fault:
                    self.errors[container.id] = fault.split(":", 1)[1]
            return {"id": container.id}
        if self.fetch_media:
            self._check_jpeg(self._fetch(image, MAX_MEDIA_BYTES), vertical=True)
        return {"id": self._new(user_id, image, caption, media_type, params).id}

    def _container_state(self, container: Container) -> str:
        if container.id in self.errors and container.state == "IN_PROGRESS" and self.now() >= container.ready_at:
            container.state = "ERROR"  # processing ended in ERROR
        return super()._container_state(container)

    def _status(self, container_id: str, params: dict[str, str]) -> dict[str, Any]:
        answer = super()._status(container_id, params)
        if "video_status" in params.get("fields", "") and container_id in self.uploads:
            with self._lock:
                upload = self.uploads[container_id]
                done = upload["size"] is not None and len(upload["data"]) >= upload["size"]
                phase = "complete" if done else "in_progress" if upload["data"] else "not_started"
                answer["video_status"] = {"uploading_phase": {"status": phase, "bytes_transferred": len(upload["data"])}}
        if "status" in params.get("fields", ""):
            with self._lock:
                reason = self.errors.get(container_id) if answer["status_code"] == "ERROR" else None
            answer["status"] = reason or f"{answer['status_code'].title()}: {answer['status_code']}"
        return answer

    def _publish(self, user_id: str, params: dict[str, str]) -> dict[str, Any]:
        container_id = params.get("creation_id", "")
        with self._lock:
            kind = self.kinds.get(container_id, {})
            if kind.get("media_type") == "CAROUSEL_ITEM":
                raise _graph_error(100, None, f"Carousel item container {container_id} cannot be published by itself")
            for child in kind.get("children", []):
                state = self._container_state(self.containers[child])
                if state not in ("FINISHED", "PUBLISHED"):
                    raise _graph_error(-2 if state == "EXPIRED" else -1, 2207020 if state == "EXPIRED" else 2207001,
                                       f"Child container {child} is {state}")
        answer = super()._publish(user_id, params)
        with self._lock:
            for child in kind.get("children", []):
                self.containers[child].state = "PUBLISHED"
        return answer

    # --- the resumable upload -------------------------------------------------------------------

    def _raw_post(self, handler, path: str) -> bool:
        parts = [p for p in path.split("/") if p]
        if len(parts) != 3 or parts[0] != "ig-api-upload":
            return False
        cid = parts[2]
        length = int(handler.headers.get("Content-Length") or 0)
        with self._lock:
            upload, container = self.uploads.get(cid), self.containers.get(cid)
            fault = self._upload_faults.popleft() if upload is not None and self._upload_faults else None
        token = (handler.headers.get("Authorization") or "").removeprefix("OAuth ").strip()
        account = self.accounts.get(container.user_id) if container else None
        error = None
        if upload is None:
            error = (404, "ProcessingFailedError", f"no resumable upload for container {cid}")
        elif account is None or token != account.token:
            error = (401, "AuthError", "Invalid OAuth access token")
        else:
            try:
                offset, size = int(handler.headers["offset"]), int(handler.headers["file_size"])
            except (KeyError, ValueError):
                offset = size = None
                error = (400, "BadRequest", "the offset and file_size headers are required")
        if error is None and (offset != len(upload["data"]) or (upload["size"] not in (None, size))):
            error = (400, "OffsetMismatch", f"offset {offset} is not the {len(upload['data'])} bytes received "
                                            f"(file_size {upload['size']})")
        body = handler.rfile.read(length)
        with self._lock:  # the token came in the Authorization header; its value is never recorded
            self.requests.append(RecordedRequest("POST", path, {"offset": handler.headers.get("offset", ""),
                                                                "file_size": handler.headers.get("file_size", "")},
                                                 "upload", "header"))
        if error is not None:
            handler._send(error[0], {"debug_info": {"retriable": False, "type": error[1], "message": error[2]}})
            return True
        with self._lock:
            upload["size"], upload["posts"] = size, upload["posts"] + 1
            upload["data"].extend(body[:fault] if fault is not None else body)
            complete = len(upload["data"]) >= size
        if fault is not None:
            handler._drop()  # the connection breaks mid-upload: no answer
            return True
        if complete:
            self._uploaded(cid, upload)
        handler._send(200, {"success": True, "message": "Upload successful."})
        return True

    def _uploaded(self, cid: str, upload: dict[str, Any]) -> None:
        """All bytes in: checked as a fetched video would be, then processed for video_ready_after_s."""
        data = bytes(upload["data"])
        limit = REEL_MAX_BYTES if upload["media_type"] == "REELS" else STORY_VIDEO_MAX_BYTES
        with self._lock:
            container = self.containers[cid]
            if len(data) < 12 or data[4:8] != b"ftyp" or len(data) > limit:
                container.state = "ERROR"
                self.errors[cid] = "ERROR: the uploaded video is not an MP4/MOV within the size limit"
                return
            container.ready_at = self.now() + self.video_ready_after_s
            fault = self._video_faults.popleft() if self._video_faults else None
            if fault == "stuck":
                container.ready_at = float("inf")
            elif fault:
                self.errors[cid] = fault.split(":", 1)[1]

    # --- media checks ---------------------------------------------------------------------------

    def _check_caption(self, caption: str) -> None:
        if len(caption) > 2200:
            raise _graph_error(36004, 2207010, f"The caption is too long ({len(caption)} > 2200 characters)")

    def _check_jpeg(self, data: bytes, vertical: bool | None) -> None:
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as image:
                fmt, (width, height) = image.format, image.size
        except Exception:  # noqa: BLE001
            fmt, width, height = None, 0, 1
        if fmt != "JPEG":
            raise _graph_error(36001, 2207005, f"The image format is not supported ({fmt or 'undecodable'}); only JPEG")
        if vertical and abs(width / height - VERTICAL) > VERTICAL * VERTICAL_TOLERANCE:
            raise _graph_error(36003, 2207009, f"The submitted image with aspect ratio ({width}/{height}) cannot be "
                                               "published as a story. Please submit a 9:16 image.")

    def _check_video(self, url: str, limit: int) -> None:
        data = self._fetch(url, limit)
        if len(data) < 12 or data[4:8] != b"ftyp":
            raise _graph_error(2207026, 2207026, "The video format is not supported. Please check spec for "
                                                 "supported video formats (MP4/MOV).")


def _public(params: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in params.items() if k not in ("access_token", "input_token")}

