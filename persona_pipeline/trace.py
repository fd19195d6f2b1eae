"""Provenance: from a post back through its candidate and manifest to the LoRA, the dataset, and
each dataset image's origin (an uploaded photo, an edit of photo X with instruction Y by model Z and
seed S, a winner candidate #N, a post #M: docs/dataset.md#provenance)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from sqlalchemy.orm import Session

from persona_pipeline.db import models
from persona_pipeline.domain.provenance import describe_origin


class TraceError(ValueError):
    pass


def trace_post(session: Session, post_id: int) -> dict:
    """Every link checked: the manifest's image hash matches the file, the manifest's LoRA is the
    candidate's LoRA, and the LoRA's dataset version is the dataset folder's. Raises on a broken link."""
    post = session.get(models.Post, post_id)
    if post is None:
        raise TraceError(f"post {post_id} does not exist")
    item = session.get(models.LibraryItem, post.library_item_id) if post.library_item_id else None
    publishing = {"id": post.id, "status": post.status, "external_id": post.external_id, "media": post.media_path,
                  "media_sha256": post.media_sha256, "permalink": post.permalink, "container_id": post.container_id,
                  "caption_source": post.caption_source, "strategy": post.strategy_note}
    library_entry = None if item is None else {
        "id": item.id, "kind": item.kind, "status": item.status, "theme": item.theme,
        "cluster": item.cluster.label if item.cluster else None}
    candidate = post.candidate
    if candidate is None:
        photo = session.get(models.SourcePhoto, item.source_photo_id) if item and item.source_photo_id else None
        if photo is None or not photo.path:
            raise TraceError(f"post {post.id} has neither a candidate nor a source photo behind it")
        sha = hashlib.sha256(Path(photo.path).read_bytes()).hexdigest()
        return {"post": publishing, "library_item": library_entry,
                "source_photo": {"id": photo.id, "original_name": photo.original_name, "path": photo.path, "sha256": sha}}
    manifest_path = Path(candidate.manifest_path)
    manifest = json.loads(manifest_path.read_text())
    image_sha = hashlib.sha256(Path(candidate.image_path).read_bytes()).hexdigest()
    if image_sha != manifest["sha256"] or image_sha != candidate.image_sha256:
        raise TraceError(f"candidate {candidate.id}: image {candidate.image_path} does not match its manifest's sha256")
    lora = candidate.lora
    chain = manifest.get("loras", [])
    if lora is None or not chain or chain[0]["id"] != lora.id or chain[0]["sha256"] != lora.sha256:
        raise TraceError(f"candidate {candidate.id}: manifest LoRA {chain[0]['id'] if chain else None} is not the recorded LoRA")
    for entry in chain:
        row = session.get(models.LoraModel, entry["id"])
        if row is None or hashlib.sha256(Path(row.path).read_bytes()).hexdigest() != entry["sha256"]:
            raise TraceError(f"LoRA {entry['id']}: file {row.path if row else '?'} does not match the manifest's sha256")
    graph_path = manifest_path.with_name(manifest["workflow"])
    if not graph_path.is_file():
        raise TraceError(f"candidate {candidate.id}: the submitted graph {graph_path} is missing")
    lineage = []
    parent = candidate.parent
    while parent is not None:  # img2img refinements back to the root
        lineage.append({"id": parent.id, "image": parent.image_path, "sha256": parent.image_sha256})
        parent = parent.parent
    dataset = lora.dataset
    if dataset is None:
        raise TraceError(f"LoRA {lora.id} has no dataset (imported, not trained here)")
    dataset_meta = json.loads((Path(dataset.path) / "metadata.json").read_text())
    if dataset_meta["version"] != dataset.version:
        raise TraceError(f"dataset {dataset.id}: version on disk {dataset_meta['version'][:16]} differs from the database")
    return {
        "post": publishing,
        "library_item": library_entry,
        "candidate": {"id": candidate.id, "run_id": candidate.run_id, "elo": candidate.elo, "image": candidate.image_path,
                      "sha256": image_sha},
        "manifest": {"path": str(manifest_path), "workflow": str(graph_path),
                     **{k: manifest[k] for k in ("prompt", "seed", "steps", "cfg", "sampler", "scheduler", "width", "height",
                                                 "denoise", "template", "backend", "server", "base_model")}},
        "loras": [{"id": e["id"], "sha256": e["sha256"], "weight": e["weight"]} for e in chain],
        "parents": lineage,
        "lora": {"id": lora.id, "path": lora.path, "sha256": lora.sha256, "base_model": lora.base_model},
        "dataset": {"id": dataset.id, "version": dataset.version, "path": dataset.path, "images": dataset.image_count},
        "dataset_images": dataset_images(dataset_meta),
    }


def dataset_images(meta: dict) -> list[dict]:
    """Each image of a dataset's metadata.json with its origin (a version built before origins were
    recorded holds uploaded photos only, named by `source`)."""
    out = []
    for image in meta.get("images", []):
        origin = image.get("origin") or {"kind": "photo", "photo": image.get("source"), "sha256": image.get("sha256")}
        out.append({"file": image["file"], "sha256": image.get("sha256"), "caption": image.get("caption"),
                    "origin": describe_origin(origin), "provenance": origin})
    return out
