"""Serving: the continuous-batching scheduler (scheduler.py) over the paged latent cache (ktjax/kv/paged.py),
its page allocator with prefix caching (pages.py) and its compiled step programs (programs.py)."""
