"""The latent cache subsystem: formats (formats.py, importable before JAX starts), quantization (quant.py),
the cache with write() and attend() (cache.py), its layout on one device or sequence-sharded over a mesh
(layout.py), the XLA attention (attention.py) and the Pallas kernels (pallas/), each kernel beside the XLA
function it is tested against. A new cache format touches this package only.

Import the JAX parts from their modules (`from ktjax.kv.cache import LatentCache`); this file stays light.
"""
from .formats import ALIASES, FORMATS, NAMES, CacheFormat, resolve

__all__ = ["ALIASES", "FORMATS", "NAMES", "CacheFormat", "resolve"]
