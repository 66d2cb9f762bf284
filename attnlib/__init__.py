"""attnlib: one attention interface over many backends, one mask vocabulary, shared positional encodings."""
from . import masks, rope
from .api import Attention, attention
from .errors import BackendUnavailableError
from .masks import BlockDiagonal, BlockSparse, Causal, DenseMask, KeyPadding
from .registry import canonical_name, get_backend, list_backends, register_backend, resolve_backend, use_backend

__version__ = "0.1.0"

__all__ = [
    "attention", "Attention", "masks", "rope", "Causal", "BlockDiagonal", "KeyPadding", "DenseMask", "BlockSparse",
    "BackendUnavailableError", "list_backends", "use_backend", "resolve_backend", "register_backend",
    "get_backend", "canonical_name", "__version__",
]
