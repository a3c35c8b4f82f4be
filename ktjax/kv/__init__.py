"""The latent cache subsystem: formats (formats.py, importable before JAX starts), quantization (quant.py),
the one cache type with write() and attend() (cache.py: a dense cache or a page pool), a pool's pages read
through their table (paged.py), a dense cache's layout on one device or sequence-sharded over a mesh
(layout.py), the XLA attention (attention.py): the reference every attention kernel is tested against
(docs/design.md). A new cache format starts here (docs/contributing.md, recipe 1, lists every file it
touches).

Import the JAX parts from their modules (`from ktjax.kv.cache import LatentCache`); this file stays light.
"""
from ktjax.kv.formats import ALIASES, FORMATS, NAMES, CacheFormat, resolve_format

__all__ = ["ALIASES", "FORMATS", "NAMES", "CacheFormat", "resolve_format"]
