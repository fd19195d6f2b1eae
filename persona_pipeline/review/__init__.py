"""The review form: a small Starlette + Jinja2 app where reviewers vote, approve steps, pick
winners and approve posts. Every decision goes through `persona_pipeline.db.review`."""

from persona_pipeline.review.app import ReviewConfig, create_app

__all__ = ["ReviewConfig", "create_app"]
