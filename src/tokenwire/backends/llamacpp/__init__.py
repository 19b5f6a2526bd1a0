"""The embedded model (llama.cpp through llama-cpp-python), the default backend.

``weights``: which GGUF is served (the default model, re-quantization). ``engine``: the
batching engine on its own thread (``sequence``: one stream's state; ``sampling``: sampler
chains and grammars). ``backend``: the ``Backend`` adapter the server uses.
"""

from __future__ import annotations

from tokenwire.backends.llamacpp.backend import CHATML_TEMPLATE, LlamaCppBackend
from tokenwire.backends.llamacpp.weights import (
    default_model_path,
    requantized_model,
    serving_weights,
)

__all__ = [
    "CHATML_TEMPLATE",
    "LlamaCppBackend",
    "default_model_path",
    "requantized_model",
    "serving_weights",
]
