"""Per-request sampling parameters, validated at construction and again when a
request is added."""
from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields

from orca_serve.shown import shown

# A temperature under this samples as greedy: dividing float32 logits by a
# temperature near float32's smallest overflows them to inf (NaN
# probabilities, a garbage token), and sampling that cold picks the argmax
# anyway. The same bound as vLLM's.
GREEDY_BELOW_TEMPERATURE = 1e-5
# OpenAI's bound on a logit bias (vLLM's too).
MAX_LOGIT_BIAS = 100.0


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop.

    temperature 0 (or under 1e-5) means greedy. A ``seed`` makes sampling
    reproducible for this request whatever else shares its batch (the noise is
    derived from the seed and the output position, never from a batch-wide
    generator). Integers may be numpy integers; they are kept as Python ints.

    ``stop``, ``stop_token_ids`` and ``logit_bias`` are used as given once
    checked, not copied (the sequences of one request share them), so they
    must not change while a request that uses them runs: the engine checks
    one when it adds a request with it unless one it runs has it already, and
    what is made from it (the scheduler's set of stop ids, the sampler's
    tensors, the stop strings' index) is made once and kept while one runs.
    Once none does, it may change.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    # Tokens generated before EOS, a stop token or a stop string may end the request.
    min_tokens: int = 0
    logprobs: int | None = None  # number of top logprobs to return per token (0 = sampled token only)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # Token id -> a number in [-100, 100] added to its logit before sampling
    # (greedy too), as OpenAI's logit_bias: -100 all but bans a token. Zeros
    # change nothing and are dropped; None is no bias.
    logit_bias: dict[int, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, checked: Callable[[str, object], bool] | None = None) -> None:
        """Check every field (ValueError naming it) and normalize it: stop to a
        list, numpy numbers to Python ones. The engine calls it again when a
        request is added, since the fields may have changed since construction.

        ``checked(name, value)``: whether ``value``, that very list or map, was
        checked already and cannot have changed since (a running request uses
        it: see above); its checks are then skipped. They cost its length (49,000
        stop ids: 3 ms), and the sequences of one request share their lists."""
        def unchecked(name: str) -> bool:
            return checked is None or not checked(name, getattr(self, name))

        # A list already in its checked form is kept, not copied, and checked in C.
        if unchecked("stop"):
            self.stop = [self.stop] if isinstance(self.stop, str) else _list("stop", self.stop, "strings")
            if not _all_exactly(self.stop, str) or "" in self.stop:
                for s in self.stop:
                    if not isinstance(s, str) or not s:
                        raise ValueError(f"stop strings must be non-empty strings, got {shown(s)}")
        if unchecked("stop_token_ids"):
            self.stop_token_ids = _list("stop_token_ids", self.stop_token_ids, "token ids")
            if not (_all_exactly(self.stop_token_ids, int) and min(self.stop_token_ids, default=0) >= 0):
                self.stop_token_ids = [integer("stop_token_ids", t, minimum=0) for t in self.stop_token_ids]
        self.max_tokens = integer("max_tokens", self.max_tokens, minimum=1)
        self.min_tokens = integer("min_tokens", self.min_tokens, minimum=0)
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({shown(self.min_tokens)}) must be <= max_tokens ({shown(self.max_tokens)})")
        self.temperature = finite_float("temperature", self.temperature)
        if not self.temperature >= 0.0:
            raise ValueError(f"temperature must be >= 0, got {shown(self.temperature)}")
        self.top_p = finite_float("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {shown(self.top_p)}")
        self.top_k = integer("top_k", self.top_k, minimum=-1)
        if self.top_k == -1:
            self.top_k = 0
        if self.seed is not None:
            self.seed = integer("seed", self.seed, minimum=None)
        if self.logprobs is not None:
            self.logprobs = integer("logprobs", self.logprobs, minimum=0)
            if self.logprobs > 20:
                raise ValueError(f"logprobs must be <= 20, got {shown(self.logprobs)}")
        if unchecked("logit_bias"):
            self.logit_bias = _logit_bias(self.logit_bias)
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be {shown(True)} or {shown(False)}, got {shown(getattr(self, name))}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW_TEMPERATURE

    def replace(self, **changes) -> SamplingParams:
        """A copy with ``changes``, checked, sharing this one's lists and map:
        those are not checked here (the engine checks them when it adds a
        request, so a list changed since this one was made is refused there).
        The choices of one HTTP request are made so: checking 1,024 copies of a
        long list cost 1,024 times."""
        unknown = changes.keys() - {f.name for f in fields(self)}
        if unknown:
            raise TypeError(f"SamplingParams has no field {sorted(unknown)[0]!r}")
        new = copy.copy(self)
        for name, value in changes.items():
            setattr(new, name, value)
        new.validate(checked=lambda name, value: value is getattr(self, name))
        return new


def integer(name: str, value, minimum: int | None) -> int:
    """An integer (numpy's too) as a Python int, at least ``minimum``; a bool
    is an int but never meant as a count."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {shown(value)}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {shown(value)}")
    return value


def is_finite_number(value) -> bool:
    """A finite real number (numpy's too): not NaN, ±inf, an int past float's
    range, a bool or a string."""
    try:
        return not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
    except OverflowError:  # an int past float's range
        return False


def finite_float(name: str, value) -> float:
    """A finite real number as a float; anything else is a ValueError naming ``name``."""
    if not is_finite_number(value):
        raise ValueError(f"{name} must be a finite number, got {shown(value)}")
    return float(value)


def _logit_bias(value) -> dict[int, float]:
    """The non-zero biases, keyed by token id (numpy integers as ints)."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"logit_bias must be a mapping of token id to bias, got {type(value).__name__}")
    biases = value.values()
    if (type(value) is dict and _all_exactly(value, int) and min(value, default=0) >= 0
            and _all_exactly(biases, float) and all(map(math.isfinite, biases))
            and -MAX_LOGIT_BIAS <= min(biases, default=0.0) and max(biases, default=0.0) <= MAX_LOGIT_BIAS
            and 0.0 not in biases):
        return value  # as the loop below would make it
    out = {}
    for token, bias in value.items():
        if isinstance(token, bool) or not isinstance(token, numbers.Integral) or token < 0:
            raise ValueError(f"logit_bias: keys must be token ids (integers >= 0), got {shown(token)}")
        bias = finite_float(f"logit_bias[{shown(token)}]", bias)
        if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias[{shown(token)}] must be in [{-MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], "
                             f"got {shown(bias)}")
        if bias:
            out[int(token)] = bias
    return out


def _list(name: str, value, of: str) -> list:
    """A list, tuple, set or array of ``of``; a str, bytes or mapping would pass as its items."""
    if value is None:
        return []
    if not isinstance(value, Iterable) or isinstance(value, (str, bytes, bytearray, Mapping)):
        raise ValueError(f"{name} must be a list of {of}, got {type(value).__name__}")
    return value if type(value) is list else list(value)


def _all_exactly(items, kind: type) -> bool:
    """Whether every item's type is ``kind`` itself (no subclass), checked in C."""
    return set(map(type, items)) <= {kind}
