"""Application database: models, engine/session helpers, migrations and the write operations
that both the assets and the review form use."""
