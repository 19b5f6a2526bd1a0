"""Model backends: the embedded llama.cpp model and upstream servers."""

from tokenwire.backends.base import Backend, ModelInfo

__all__ = ["Backend", "ModelInfo"]
