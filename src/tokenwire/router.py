"""Routing by model name: which backend serves a request.

The name ``default`` always routes to the default backend. Other names route to the
backend that lists them; an unknown name is ``ModelNotFound`` (a 404 in every protocol).
"""

from __future__ import annotations

from tokenwire.backends.base import Backend, ModelInfo
from tokenwire.errors import ModelNotFound

__all__ = ["Router"]

DEFAULT_MODEL = "default"


class Router:
    def __init__(self, default: Backend, others: list[Backend] | None = None) -> None:
        self.default = default
        self.backends: list[Backend] = [default, *(others or [])]
        self._aliases: dict[str, str] = {}

    def alias(self, name: str, target: str) -> None:
        self._aliases[name] = target

    def resolve(self, model: str) -> Backend:
        model = self._aliases.get(model, model)
        if model == DEFAULT_MODEL:
            return self.default
        for backend in self.backends:
            if backend.serves(model):
                return backend
        raise ModelNotFound(model)

    def models(self) -> list[ModelInfo]:
        seen: dict[str, ModelInfo] = {DEFAULT_MODEL: ModelInfo(DEFAULT_MODEL)}
        for backend in self.backends:
            for info in backend.models():
                seen.setdefault(info.id, info)
        for alias in self._aliases:
            seen.setdefault(alias, ModelInfo(alias))
        return list(seen.values())

    async def start(self) -> None:
        for backend in self.backends:
            await backend.start()

    async def close(self) -> None:
        for backend in self.backends:
            await backend.close()
