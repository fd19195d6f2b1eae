"""Candidate generation: runs and their job tree, the executor over ComfyUI and diffusers, curation."""
