"""Token sampling for the embedded engine: each sequence's sampler chain, and grammars.

Each sequence has its own llama.cpp sampler chain (greedy at temperature 0, else top-k 40,
top-p, min-p 0.05, temperature, and a ``dist`` sampler seeded with the request's ``seed``).
A request's grammar (JSON / tool calls, ``backends/grammar.py``) is checked against the token
the chain picked, and applied to the whole vocabulary only when it rejects that token (as
llama.cpp's own server does): the same distribution, at a fraction of the cost of masking
49k candidates every step. Runs on the engine thread only.
"""

from __future__ import annotations

import ctypes
import random
from typing import Any

from tokenwire.backends.llamacpp.sequence import Sequence

__all__ = ["Sampling"]


class Sampling:
    """Sampler chains over one context, and the candidate arrays constrained picks reuse."""

    def __init__(self, lib: Any, internals: Any, context: Any, vocab: Any, n_vocab: int) -> None:
        import numpy

        self._lib = lib
        self._internals = internals
        self._context = context
        self.vocab = vocab
        self.n_vocab = n_vocab
        self.eog = frozenset(
            token for token in range(n_vocab) if lib.llama_vocab_is_eog(vocab, token)
        )
        self.rejections = 0  # picks the grammar refused (then masked and resampled)
        # Constrained sampling: one candidate array over the whole vocabulary, filled from
        # the logits with numpy, and a one-token array for the check.
        self._np: Any = numpy
        self._candidates_data = (lib.llama_token_data * n_vocab)()
        self._candidates_view: Any = numpy.frombuffer(
            self._candidates_data, dtype=[("id", "<i4"), ("logit", "<f4"), ("p", "<f4")]
        )
        self._token_ids = numpy.arange(n_vocab, dtype=numpy.int32)
        self._candidates = lib.llama_token_data_array(
            data=self._candidates_data, size=n_vocab, selected=-1, sorted=False
        )
        self._candidates_ref = ctypes.byref(self._candidates)
        self._single_data = (lib.llama_token_data * 1)()
        self._single = lib.llama_token_data_array(
            data=self._single_data, size=1, selected=-1, sorted=False
        )
        self._single_ref = ctypes.byref(self._single)
        self._single_view: Any = numpy.frombuffer(
            self._single_data, dtype=self._candidates_view.dtype
        )

    def attach(self, sequence: Sequence) -> None:
        """Give ``sequence`` its sampler chain (and its grammar sampler, if any)."""
        sequence.sampler = self._chain(sequence)

    def replay(self, sequence: Sequence) -> bool:
        """Advance ``sequence``'s samplers through the tokens it already produced (penalty
        history, grammar state); False if its grammar rejects one of them."""
        chain = sequence.sampler.sampler
        grammar = sequence.grammar_sampler
        for token in sequence.produced:
            if grammar is not None:
                if not self._allows(grammar, token):
                    return False
                self._lib.llama_sampler_accept(grammar, token)
            self._lib.llama_sampler_accept(chain, token)
        return True

    def _allows(self, grammar: Any, token: int) -> bool:
        """Whether ``grammar`` in its current state accepts ``token`` (accepting a token it
        rejects would abort the process inside llama.cpp)."""
        single = self._single
        single.size, single.selected, single.sorted = 1, -1, False
        checked = self._single_view
        checked["id"], checked["logit"] = token, 1.0
        self._lib.llama_sampler_apply(grammar, self._single_ref)
        return bool(checked["logit"][0] != float("-inf"))

    def detach(self, sequence: Sequence) -> None:
        """Free ``sequence``'s samplers."""
        if sequence.sampler is not None:
            sequence.sampler.close()
            sequence.sampler = None
        if sequence.grammar_sampler is not None:
            self._lib.llama_sampler_free(sequence.grammar_sampler)
            sequence.grammar_sampler = None

    def sample(self, sequence: Sequence, index: int) -> int:
        """``sequence``'s next token from the logits at batch ``index``."""
        if sequence.grammar_sampler is None:
            token: int = self._lib.llama_sampler_sample(
                sequence.sampler.sampler, self._context.ctx, index
            )
            return token
        return self._sample_constrained(sequence, index)

    def _chain(self, sequence: Sequence) -> Any:
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

    def _sample_constrained(self, sequence: Sequence, index: int) -> int:
        """Sample with the grammar: the chain's pick if the grammar accepts it, else the
        chain's pick among the tokens the grammar allows (llama.cpp's common sampler)."""
        lib = self._lib
        chain = sequence.sampler.sampler
        candidates = self._candidates
        view = self._candidates_view
        logits = self._np.ctypeslib.as_array(
            lib.llama_get_logits_ith(self._context.ctx, index), shape=(self.n_vocab,)
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
            self.rejections += 1
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
