"""Serving: an OpenAI-compatible HTTP server (`python -m ktjax.serve`) over the continuous-batching scheduler.

Engine half: scheduler.py (continuous batching) over the paged latent cache (ktjax/kv/paged.py), its page
allocator with prefix caching (pages.py) and its compiled step programs (programs.py).
HTTP half: protocol.py validates requests and shapes errors, textstream.py turns token ids into text (stop
strings), app.py holds the FastAPI routes, metrics.py the Prometheus metrics, __main__.py the command line.
FastAPI, uvicorn and prometheus_client are imported only by the HTTP half, never by `import ktjax` or
`python -m ktjax.generate`.
"""
