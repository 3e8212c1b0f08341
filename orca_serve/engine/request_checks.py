"""A request's SamplingParams checked when the engine adds it, each list and
map once while a request that uses it runs.

The sequences of one HTTP request (up to 1,024) share its ``stop``,
``stop_token_ids`` and ``logit_bias`` objects, and the prompts of one
``generate()`` their SamplingParams. Checking 40,000 stop ids and as many
stop strings (their types; ids in the vocabulary; with ``min_tokens``,
whether any token is left to sample) cost about 5 ms for each sequence, on
the engine thread. While a running request holds an object's checks
(``identity_cache.py``) that object has not changed (SamplingParams'
contract), so a request with the same one skips them.
"""
from __future__ import annotations

from orca_serve.identity_cache import IdentityCache, Shared
from orca_serve.sampling_params import SamplingParams
from orca_serve.shown import shown


class RequestChecks:
    def __init__(self, vocab_size: int, eos_token_ids: tuple[int, ...]) -> None:
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        # The value: for stop_token_ids, whether with the EOS ids they are the
        # whole vocabulary; None for the others (checked is all there is to say).
        self._checked = {"stop": IdentityCache(lambda stop: None),
                         "stop_token_ids": IdentityCache(self._check_stop_token_ids),
                         "logit_bias": IdentityCache(self._in_vocabulary("logit_bias"))}

    def check(self, params: SamplingParams) -> list[Shared]:
        """Validate ``params`` (ValueError naming the field) and check its ids
        against the model. Returns what the request must hold while it runs."""
        params.validate(checked=lambda name, value: self._checked[name].holds(value))
        held = {name: cache.get(getattr(params, name)) for name, cache in self._checked.items()}
        if params.min_tokens and held["stop_token_ids"].value:
            del held  # held by no request (see LLMEngine.add_request)
            raise ValueError("stop_token_ids: with min_tokens every token of the vocabulary is an EOS or stop "
                             "token, so none is left to sample")
        return list(held.values())

    def _check_stop_token_ids(self, ids: list[int]) -> bool:
        self._in_vocabulary("stop_token_ids")(ids)
        return len(ids) + len(self.eos_token_ids) >= self.vocab_size and \
            len(set(ids).union(self.eos_token_ids)) >= self.vocab_size

    def _in_vocabulary(self, name: str):
        def check(ids) -> None:
            if max(ids, default=-1) >= self.vocab_size:  # in C
                t = next(t for t in ids if t >= self.vocab_size)  # the first, to name it
                raise ValueError(f"{name}: token id {shown(t)} is outside the vocabulary [0, {self.vocab_size})")
        return check
