"""The embedded model as a ``Backend``: llama.cpp through llama-cpp-python, the default.

Loads the weights (``weights.py``) and the chat template, tokenizes each request's prompt,
waits for a decode slot (``tokenwire.admission.admitted``), and turns the engine's output
(``engine.py``) into events: text, usage, completion, and tool calls for a constrained call
(``backends/grammar.py``). When all sequences are busy, requests wait in a fair FIFO queue and
see their position as ``progress`` events; a full queue is refused with 429.

Chat template: the GGUF's ``tokenizer.chat_template`` metadata, rendered with
llama-cpp-python's Jinja2 formatter; when the GGUF has none (or ``--chat-template`` is
given) that template is used, and the documented fallback is ChatML.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from tokenwire.admission import FairQueue, admitted
from tokenwire.backends import grammar
from tokenwire.backends.base import Backend, ModelInfo
from tokenwire.backends.llamacpp.engine import BatchEngine
from tokenwire.backends.llamacpp.sequence import Finished, Sequence
from tokenwire.backends.llamacpp.weights import default_model_path, serving_weights
from tokenwire.cancel import CancelToken
from tokenwire.config import Settings
from tokenwire.errors import BackendError, ContextLengthExceeded, InvalidRequest
from tokenwire.events import Event, StreamCompleted, TextDelta, Usage
from tokenwire.requests import ChatRequest, Message, SamplingParams

__all__ = ["CHATML_TEMPLATE", "LlamaCppBackend"]

log = logging.getLogger("tokenwire.backends.llamacpp")

#: Used when the GGUF carries no chat template.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


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
        n_threads_batch: int | None = None,
        max_queue: int = 64,
        warmup: bool = True,
        parallel: int = 8,
        prefill_chunk: int = 64,
        requantize: str | None = "auto",
        prompt_cache: bool = True,
    ) -> None:
        self.model_path = Path(model_path) if model_path else default_model_path()
        self.requantize = requantize
        self.prompt_cache = prompt_cache
        self._model_name = model_name
        self._chat_template = chat_template
        self.n_ctx = n_ctx
        # None: measured at load (calibration.py), the flags override. One thread per core
        # can win now that every computing call runs on the engine thread (engine.py).
        self.n_threads = n_threads
        self.n_threads_batch = n_threads_batch
        self.warmup = warmup
        self.parallel = max(1, parallel)
        self.prefill_chunk = prefill_chunk
        self.queue = FairQueue(slots=self.parallel, max_waiting=max_queue)
        self._llama: Any = None
        self._engine: BatchEngine | None = None
        self._format: Callable[[list[dict[str, str]]], str] | None = None

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
            n_threads_batch=settings.threads_batch,
            max_queue=settings.max_queue,
            warmup=settings.warmup,
            parallel=settings.parallel,
            prefill_chunk=settings.prefill_chunk,
            requantize=settings.requantize,
            prompt_cache=settings.prompt_cache,
        )

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._load)
        if self.warmup:
            # One short generation: the first real request must not pay for lazy init.
            warm = ChatRequest(
                model="default",
                messages=[Message(role="user", content="Hi")],
                sampling=SamplingParams(max_tokens=2, temperature=0.0),
            )
            async for _ in self._decode(self._prompt_tokens(warm)[0], warm, CancelToken()):
                pass

    def _load(self) -> None:
        from llama_cpp import Llama
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        started = time.perf_counter()
        weights = self.model_path
        weights = serving_weights(
            weights, self.requantize, threads=self.n_threads or os.cpu_count() or 1
        )
        try:
            # This context only tokenizes: generation runs in the engine's batched context.
            self._llama = Llama(
                model_path=str(weights),
                n_ctx=64,
                n_batch=64,
                n_threads=1,
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
            # The file name, not general.name: ids are typed by users and must not hold
            # spaces ("Smollm2 135M 8k Lc100K Mix1 Ep2" is the shipped GGUF's general.name).
            self._model_name = self.model_path.stem
        self._engine = BatchEngine(
            llama,
            n_parallel=self.parallel,
            n_ctx=self.n_ctx,
            prefill_chunk=self.prefill_chunk,
            n_threads=self.n_threads,
            n_threads_batch=self.n_threads_batch,
            prompt_cache=self.prompt_cache,
        )
        engine = self._engine
        self.n_threads, self.n_threads_batch = engine.n_threads, engine.n_threads_batch
        log.info(
            "embedded model %s (weights %s) loaded in %.1fs (ctx %d, %d parallel, %s/%s threads, "
            "batched decode from %d streams; step seconds by threads at load: %s)",
            self.model_path.name,
            weights.name,
            time.perf_counter() - started,
            self.n_ctx,
            self.parallel,
            self.n_threads,
            self.n_threads_batch,
            engine.split_below,
            engine.thread_costs or "not measured (--threads)",
        )

    async def close(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            await asyncio.get_running_loop().run_in_executor(None, engine.close)
        llama, self._llama = self._llama, None
        if llama is not None:
            llama.close()

    def models(self) -> list[ModelInfo]:
        return [ModelInfo(self._model_name or self.model_path.stem, owned_by="tokenwire")]

    # -- request -------------------------------------------------------------------------

    def continuation(self, request: ChatRequest, partial: str) -> ChatRequest | None:
        """Prefill the prompt and the partial answer, sampling as before: the samplers
        (penalties, a JSON grammar) replay the partial answer and stop sequences that began
        in it still match (engine.py, ``Sequence``). Not for tool calls: the partial answer
        may stop inside a call's arguments."""
        if request.tools:
            return None
        prefill = Message(role="assistant", content=partial)
        messages = [*request.messages, prefill]
        return dataclasses.replace(request, messages=messages, continue_final_message=True)

    def _prompt_tokens(self, request: ChatRequest) -> tuple[list[int], int]:
        """The prompt's tokens, and how many of them at its end are a partial answer being
        continued (``continue_final_message``: prefilled after the generation prompt)."""
        assert self._format is not None and self._llama is not None, "backend not started"
        messages = grammar.prompt_messages(request)
        partial = ""
        if request.continue_final_message and messages and messages[-1]["role"] == "assistant":
            partial = messages.pop()["content"]
        try:
            prompt = self._format(messages)
        except Exception as exc:  # jinja errors: the template rejects this conversation
            raise InvalidRequest(f"The chat template rejected the messages: {exc}") from exc
        tokens: list[int] = self._llama.tokenize(prompt.encode(), add_bos=False, special=True)
        continued: list[int] = (
            self._llama.tokenize(partial.encode(), add_bos=False, special=False) if partial else []
        )
        tokens += continued
        if len(tokens) >= self.n_ctx:
            raise ContextLengthExceeded(
                f"This model's context is {self.n_ctx} tokens; the messages take "
                f"{len(tokens)}. Shorten the messages."
            )
        max_tokens = request.sampling.max_tokens
        if max_tokens is not None:
            max_tokens = max(max_tokens - len(continued), 0)
        if max_tokens is not None and len(tokens) + max_tokens > self.n_ctx:
            raise ContextLengthExceeded(
                f"This model's context is {self.n_ctx} tokens; the messages take "
                f"{len(tokens)} and max_tokens asks for {max_tokens} more.",
                param="max_tokens",
            )
        return tokens, len(continued)

    @staticmethod
    def _partial(request: ChatRequest) -> str:
        """The partial answer a continued request ends with (``continue_final_message``)."""
        last = request.messages[-1] if request.messages else None
        if request.continue_final_message and last is not None and last.role == "assistant":
            return last.content
        return ""

    async def stream(self, request: ChatRequest, cancel: CancelToken) -> AsyncIterator[Event]:
        grammar.gbnf_for(request)  # a schema the grammar cannot express is a 400, up front
        loop = asyncio.get_running_loop()
        prompt, continued = await loop.run_in_executor(None, self._prompt_tokens, request)

        def decode() -> AsyncIterator[Event]:
            events = self._decode(prompt, request, cancel, continued)
            return grammar.tool_call_events(events, request)

        events = admitted(self.queue, cancel, decode, prefill=f"{len(prompt)} prompt tokens")
        async with contextlib.aclosing(events):
            async for event in events:
                yield event

    async def _decode(
        self, prompt: list[int], request: ChatRequest, cancel: CancelToken, continued: int = 0
    ) -> AsyncIterator[Event]:
        """``continued``: the prompt ends with that many tokens of a partial answer; they are
        the sequence's ``produced`` tokens, counted by ``max_tokens`` and usage as completion
        tokens, so a continued answer's usage adds up."""
        engine = self._engine
        assert engine is not None, "backend not started"
        params = request.sampling
        split = len(prompt) - continued
        prompt, produced = prompt[:split], prompt[split:]
        limit = params.max_tokens if params.max_tokens is not None else self.n_ctx - len(prompt)
        if produced and len(produced) >= limit:  # the answer so far already used max_tokens
            yield Usage(prompt_tokens=len(prompt), completion_tokens=len(produced))
            yield StreamCompleted(finish_reason="length")
            return
        sequence = Sequence(
            prompt,
            request,
            limit,
            cancel,
            asyncio.get_running_loop(),
            grammar=grammar.llama_grammar(request),  # JSON / tool calls (grammar.py)
            produced=produced,
            partial=self._partial(request),
        )
        queue = sequence.queue
        engine.submit(sequence)
        # Wake the engine when Stop arrives, so a cancel is seen within one step.
        waker = asyncio.ensure_future(cancel.wait())
        waker.add_done_callback(lambda _: engine.wake())
        try:
            while True:
                item = await queue.get()
                if isinstance(item, str):
                    yield TextDelta(text=item)
                elif isinstance(item, Finished):
                    seconds = item.decode_seconds
                    new_tokens = item.completion_tokens - item.produced_tokens
                    yield Usage(
                        prompt_tokens=item.prompt_tokens,
                        completion_tokens=item.completion_tokens,  # with the partial answer
                        cached_tokens=item.cached_tokens,
                        ttft_ms=item.ttft_ms,
                        tokens_per_second=round(new_tokens / seconds, 2) if seconds > 0 else None,
                    )
                    if item.finish_reason != "cancelled":
                        yield StreamCompleted(finish_reason=item.finish_reason)
                    return
                elif isinstance(item, InvalidRequest):  # a partial answer its grammar refuses
                    raise item
                else:
                    raise BackendError(f"the embedded model failed: {item}") from item
        finally:
            waker.cancel()
            sequence.stop.set()
            engine.wake()
            # The slot is free only once the engine dropped the sequence's KV cells.
            await asyncio.shield(sequence.released)
