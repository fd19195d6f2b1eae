"""LoRA training and the tiny offline model builders (no Dagster here)."""
