"""Where each dataset image came from, as a dataset's metadata.json records it and `persona-pipeline
trace` shows it (docs/dataset.md#provenance): an uploaded photo, an edit of photo X with instruction
Y by model Z and seed S, a winner candidate #N, or a post #M."""

from __future__ import annotations


def origin_of(row, photo_names: dict[str, str]) -> dict:
    """A dataset candidate's provenance as a dataset manifest records it (docs/dataset.md#provenance)."""
    origin = {"kind": row.origin, "dataset_candidate": row.id, "sha256": row.sha256, "image": row.image_path,
              "identity": row.identity_score, "accepted_by": row.decided_by}
    if row.origin == "edit":
        origin.update(photo=photo_names.get(row.source_photo_sha256), photo_sha256=row.source_photo_sha256,
                      instruction=row.instruction, edit_model=row.edit_model, seed=row.seed)
    else:
        origin.update(candidate=row.candidate_id, post=row.post_id)
    return origin


def describe_origin(origin: dict | None) -> str:
    """One line for people: `uploaded photo a.jpg`, `edit of photo a.jpg ...`, `winner candidate #3`, `post #7`."""
    if not origin or origin.get("kind") == "photo":
        return f"uploaded photo {(origin or {}).get('photo', '?')}"
    if origin["kind"] == "edit":
        return (f"edit of photo {origin.get('photo') or (origin.get('photo_sha256') or '?')[:12]} with instruction "
                f"{origin.get('instruction')!r} by model {origin.get('edit_model')} seed {origin.get('seed')} "
                f"(dataset candidate #{origin.get('dataset_candidate')})")
    if origin["kind"] == "winner":
        return f"winner candidate #{origin.get('candidate')} (dataset candidate #{origin.get('dataset_candidate')})"
    return f"post #{origin.get('post')} (dataset candidate #{origin.get('dataset_candidate')})"
