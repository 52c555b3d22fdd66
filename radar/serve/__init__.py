"""The OpenAI-compatible HTTP API on Ray Serve, in front of the target + draft + RADAR controller decoder.

config (ServeConfig, YAML), protocol (request and response models), errors, guard (body size, API key, unknown
routes), streaming (detokenizing, stop strings), worker (the one decode thread), metrics (Prometheus), replica
(the routes), app (build_app, app_builder, run).
"""
