"""The embedded engine: continuous batching over one llama.cpp context, on its own thread.

Concurrent streams decode together, one sequence each in a shared KV cache (``parallel``
sequences), with one ``llama_decode`` per step for all of them, on one dedicated thread
(llama.cpp contexts are not thread-safe). Streams join and leave at token boundaries; a long
prompt is prefilled ``prefill_chunk`` tokens per step so the others keep decoding meanwhile.
Each step's tokens reach the event loop in one ``call_soon_threadsafe``. Every step checks
each stream's cancel token, so Stop and disconnect end decoding within one token and free
the sequence's KV cells at once. Stop sequences are matched inside the loop
(``StopMatcher``). At load the engine measures from how many streams one batched step beats
one step per stream (``calibrate``).

A fixed seed gives the same text alone or batched with others in our measurements
(tests/test_batching.py), but this is not a hard guarantee: a batch of different size can
change the float summation order in llama.cpp's kernels, and a near-tie may then flip.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import heapq
import logging
import threading
import time
from typing import Any

from tokenwire.backends.llamacpp.calibration import pick_split, pick_threads, thread_candidates
from tokenwire.backends.llamacpp.sampling import Sampling
from tokenwire.backends.llamacpp.sequence import RELEASED, Finished, Sequence, deliver
from tokenwire.errors import BackendError, InvalidRequest

__all__ = ["BatchEngine"]

log = logging.getLogger("tokenwire.backends.llamacpp")


class BatchEngine:
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
        n_threads: int | None,
        n_threads_batch: int | None,
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
        # llama.cpp uses n_threads for one-token steps, n_threads_batch for the rest; None:
        # measured at load on the engine thread (calibration.py).
        self.n_threads = n_threads
        self.n_threads_batch = n_threads_batch
        provisional = max(thread_candidates())
        params.n_threads = n_threads or provisional
        params.n_threads_batch = n_threads_batch or n_threads or provisional
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
        self.sampling = Sampling(llama_cpp, _internals, self.context, self.vocab, self.n_vocab)
        self.eog = self.sampling.eog
        self._free_ids = list(range(n_parallel))  # a heap: the lowest free id first
        # Prompt cache: the tokens whose KV cells each sequence id holds, positions 0..n-1.
        # A finished stream's cells stay; the next request that shares a prefix with them
        # (the next turn of a conversation: same system prompt and history) starts there.
        self._kv_tokens: list[list[int]] = [[] for _ in range(n_parallel)]
        bos = llama.token_bos()
        self.filler_token = bos if bos >= 0 else 0
        self._active: list[Sequence] = []
        self._inbox: collections.deque[Sequence] = collections.deque()
        self._wake = threading.Condition()
        self._closing = False
        # Items for the loop, posted once per step: one wake-up of the loop per step,
        # not one per token per stream.
        self._outbox: list[tuple[Sequence, object]] = []
        self.steps = 0
        self.steps_apart = 0  # decode steps run as one llama_decode per sequence
        self.prefix_copies = 0  # cached prefixes copied to another sequence id (_join)
        #: Decode-only steps of fewer sequences than this run one llama_decode per sequence.
        self.split_below = n_parallel + 1
        #: Each candidate's median step time at load (seconds), when threads were measured.
        self.thread_costs: dict[str, dict[int, float]] = {}
        # Every llama.cpp call that computes runs on this one thread, calibration included:
        # ggml's OpenMP keeps a pool of workers per calling thread, and with more pooled
        # threads than cores libgomp stops spinning at barriers and sleeps in futex at each
        # one (~880 context switches per token at 2 threads; 28 tokens/s where one pool did
        # ~70). See benchmarks/README.md, "Decode threads of the embedded model".
        self._ready = threading.Event()
        self._failed: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="tokenwire-decode", daemon=True)
        self._thread.start()
        self._ready.wait()
        failed = self._startup_failure()
        if failed is not None:
            self._thread.join(timeout=30)
            self._lib.llama_batch_free(self.batch)
            self.context.close()
            raise BackendError(f"calibrating the engine failed: {failed}") from failed

    def _startup_failure(self) -> BaseException | None:
        return self._failed

    @property
    def grammar_rejections(self) -> int:
        """Picks a grammar refused (then masked and resampled), for tests."""
        return self.sampling.rejections

    # -- called from the event loop ------------------------------------------------------

    def submit(self, sequence: Sequence) -> None:
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
            self._emit(self._inbox[0], Finished("cancelled", 0, 0, None, 0.0))
            self._emit(self._inbox.popleft(), RELEASED)
        self._flush()
        if self.batch is not None:
            self._lib.llama_batch_free(self.batch)
            self.batch = None
        self.context.close()

    # -- the engine thread ---------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._calibrate()
        except Exception as exc:  # reported by __init__, on the caller's thread
            self._failed = exc
            return
        finally:
            self._ready.set()
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

    def _emit(self, sequence: Sequence, item: object) -> None:
        self._outbox.append((sequence, item))

    def _flush(self) -> None:
        if not self._outbox:
            return
        outbox, self._outbox = self._outbox, []
        loops: dict[asyncio.AbstractEventLoop, list[tuple[Sequence, object]]] = {}
        for entry in outbox:
            loops.setdefault(entry[0].loop, []).append(entry)
        for loop, items in loops.items():
            with contextlib.suppress(RuntimeError):  # a loop that closed meanwhile
                loop.call_soon_threadsafe(deliver, items)

    def _join(self, sequence: Sequence) -> None:
        seq_id = heapq.heappop(self._free_ids)
        sequence.seq_id = seq_id
        self.sampling.attach(sequence)
        if sequence.produced and not self.sampling.replay(sequence):
            error = InvalidRequest(
                "The answer to continue does not fit the request's output format "
                "(its grammar rejects the text produced so far)."
            )
            self._finish(sequence, error=error)
            return
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

    def _release(self, sequence: Sequence) -> None:
        if sequence.seq_id >= 0:
            # The KV cells stay, as this id's cached prefix (_join).
            heapq.heappush(self._free_ids, sequence.seq_id)
            sequence.seq_id = -1
        self.sampling.detach(sequence)
        self._emit(sequence, RELEASED)

    def _finish(
        self, sequence: Sequence, reason: str = "stop", error: BaseException | None = None
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
                Finished(
                    finish_reason="stop" if reason == "stop_matched" else reason,
                    prompt_tokens=len(sequence.prompt) - len(sequence.produced),
                    completion_tokens=sequence.completed,
                    produced_tokens=len(sequence.produced),
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
        outputs, fillers = self._fill_batch()
        status = self._lib.llama_decode(self.context.ctx, self.batch)
        self.steps += 1
        for seq_id, position in fillers:
            self._lib.llama_memory_seq_rm(self.memory, seq_id, position, -1)
        if status != 0:
            raise BackendError(f"llama_decode returned {status}")
        for sequence, index in outputs:
            self._take(sequence, index)

    def _fill_batch(self) -> tuple[list[tuple[Sequence, int]], list[tuple[int, int]]]:
        """Build one step's batch; return where each output's logits are, and the fillers
        (id, position) to remove after the step."""
        batch = self.batch
        n = 0
        outputs: list[tuple[Sequence, int]] = []
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
        return outputs, fillers

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

    def _take(self, sequence: Sequence, index: int) -> None:
        """Sample ``sequence``'s next token from the logits at ``index`` and pass it on."""
        token = self.sampling.sample(sequence, index)
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

    def _calibrate(self) -> None:
        """Measure, on this thread, what was not given: threads, then the batch split."""
        lib, ctx = self._lib, self.context.ctx
        threads = self.n_threads
        if threads is None:
            threads, self.thread_costs["decode"] = pick_threads(
                lambda: self._throwaway(1, steps=2),
                lambda n: lib.llama_set_n_threads(ctx, n, n),
                thread_candidates(),
            )
            self.n_threads = threads
        batch_threads = self.n_threads_batch
        if batch_threads is None and self.thread_costs:
            # Only the counts that survived the one-token rounds: one that lost 3x there is
            # waiting on busy cores, and its batched warm-up would take seconds more.
            batch_threads, self.thread_costs["batch"] = pick_threads(
                lambda: self._throwaway(min(self.prefill_chunk, 32)),
                lambda n: lib.llama_set_n_threads(ctx, threads, n),
                sorted(self.thread_costs["decode"]),
                rounds=3,
            )
        self.n_threads_batch = batch_threads or threads
        lib.llama_set_n_threads(ctx, self.n_threads, self.n_threads_batch)
        self.split_below = pick_split(self._throwaway, self.n_parallel)

    def _throwaway(self, n: int, steps: int = 1) -> float:
        """Seconds per step of ``n`` throwaway tokens (sequence ids 0..n-1, or one sequence
        for ``n`` > ``n_parallel``) at the start of the cache; the cells are removed after."""
        batch = self.batch
        elapsed = 0.0
        for position in range(steps):
            for i in range(n):
                batch.token[i] = self.filler_token
                batch.pos[i] = position if n <= self.n_parallel else i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = i if n <= self.n_parallel else 0
                batch.logits[i] = n <= self.n_parallel or i == n - 1
            batch.n_tokens = n
            started = time.perf_counter()
            status = self._lib.llama_decode(self.context.ctx, batch)
            elapsed += time.perf_counter() - started
            if status != 0:
                break
        for i in range(min(n, self.n_parallel)):
            self._lib.llama_memory_seq_rm(self.memory, i, -1, -1)
        if status != 0:
            raise BackendError(f"llama_decode returned {status}")
        return elapsed / steps


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
