"""Stand-ins for the world outside the pipeline, shared by the tests and bench/: fake servers
(ComfyUI, Gemini, the Instagram Graph API and its media host, a Slack webhook) and the plumbing they
share (serving.py), throwaway migrated databases, persona folders and review data."""
