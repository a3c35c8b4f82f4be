"""An OpenAI-compatible HTTP server (`python -m ktjax.serve`) over the continuous-batching Scheduler.

protocol.py validates requests and shapes errors, textstream.py turns token ids into text (stop strings),
app.py holds the FastAPI routes, metrics.py the Prometheus metrics, __main__.py the command line. FastAPI,
uvicorn and prometheus_client are imported only here, never by `import ktjax` or `python -m ktjax.generate`.
"""
