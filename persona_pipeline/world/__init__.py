"""The procedural world: a seeded generator of captioned images whose every attribute is known, so
that models trained on it can be measured by the world's own labels. Pure code, no Dagster."""
