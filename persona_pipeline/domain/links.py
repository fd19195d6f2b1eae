"""Where metadata, reports and alerts link to: the Dagster UI (DAGSTER_UI_BASE_URL) and the review
form (REVIEW_BASE_URL). One place builds these URLs, so a page never links to a local file path,
which a reader on another machine cannot open."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import quote, urlencode


@dataclass(frozen=True)
class Links:
    dagster_ui: str  # DAGSTER_UI_BASE_URL
    review: str  # REVIEW_BASE_URL

    def run_url(self, run_id: str) -> str:
        return f"{self.dagster_ui.rstrip('/')}/runs/{quote(run_id)}"

    def asset_url(self, asset: str, partition: str | None = None) -> str:
        path = "/".join(quote(part) for part in asset.split("/"))
        query = f"?{urlencode({'partition': partition})}" if partition else ""
        return f"{self.dagster_ui.rstrip('/')}/assets/{path}{query}"

    def review_posts_url(self, slug: str, post_id: int | None = None) -> str:
        """The review form's posts page of the persona, at the post's card when given."""
        anchor = f"#post-{post_id}" if post_id is not None else ""
        return f"{self.review.rstrip('/')}/posts?{urlencode({'persona': slug})}{anchor}"

    def review_step_url(self, step_id: int) -> str:
        """The gallery of a run step in the review form (its ranking, approval and winner pick)."""
        return f"{self.review.rstrip('/')}/steps/{step_id}"

    def review_vote_url(self, step_id: int) -> str:
        """The vote page of a run step in the review form."""
        return f"{self.review_step_url(step_id)}/vote"

    def media_url(self, home: Path, path: Path) -> str | None:
        """The review form's /media URL of a file under PERSONA_HOME, or None for a file elsewhere
        (the form serves nothing outside it)."""
        relative = media_path(home, path)
        return f"{self.review.rstrip('/')}{relative}" if relative else None


def media_path(home: Path, path: str | Path | None) -> str | None:
    """The form-relative /media/... path of a file under `home` (a relative path counts from
    `home`), or None when it is elsewhere: the one place both the form's pages and Dagster's
    metadata turn a file into a link."""
    if not path:
        return None
    path = Path(path)
    if not path.is_absolute():
        path = home / path
    try:
        relative = path.relative_to(home)
    except ValueError:
        try:
            relative = path.resolve().relative_to(home)
        except (ValueError, OSError):
            return None
    return "/media/" + quote(PurePosixPath(relative.as_posix()).as_posix())
