"""handforge: a plugin-based framework for synthetic hand data.

Plugins implement the hooks in :mod:`handforge.hookspecs`, marked with :data:`hookimpl`.
"""
from .hookspecs import hookimpl

__version__ = "0.1.0"

__all__ = ["hookimpl", "__version__"]
