"""handforge: a plugin-based framework for synthetic hand data.

Plugins implement the hooks in :mod:`handforge.hookspecs`, marked with :data:`hookimpl`, and keep
files they can rebuild under :func:`cache_dir` (``$HANDFORGE_CACHE``, else ``~/.cache/handforge``).
"""
from .hookspecs import hookimpl
from .weights import cache_dir

__version__ = "0.1.0"

__all__ = ["cache_dir", "hookimpl", "__version__"]
