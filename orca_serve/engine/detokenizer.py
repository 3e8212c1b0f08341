"""Incremental detokenization and stop strings.

Decoding one token at a time is wrong for byte-level BPE (a multi-byte
character spans tokens) and for SentencePiece (a token's leading space depends
on its left neighbour). So we decode a small window: the text of
tokens[prefix:] minus the text of tokens[prefix:read]; a delta that ends in the
replacement character is held back until the character completes.

Each step decodes two windows for every running request, so the call itself
matters: transformers' ``decode`` spends about nine times the Rust decoder's
own time converting and checking its arguments (cProfile of the engine
without a model, 256 requests). ``decoder_for`` calls the fast tokenizer's
Rust decoder directly wherever that gives the same text (no clean-up of
tokenization spaces asked for).
"""
from __future__ import annotations

from orca_serve.engine.stop_strings import StopStrings
from orca_serve.sampling_params import SamplingParams

_PROMPT_CONTEXT = 6  # prompt tokens kept as left context for the first outputs


def decoder_for(tokenizer):
    """``decode(ids, skip_special_tokens)`` giving ``tokenizer.decode``'s text:
    the Rust decoder of a fast tokenizer when transformers would add nothing
    to it (its class keeps the base ``decode``, and no
    ``clean_up_tokenization_spaces``), else ``tokenizer.decode``."""
    from transformers import PreTrainedTokenizerFast

    cls = type(tokenizer)
    plain = (isinstance(tokenizer, PreTrainedTokenizerFast) and cls.decode is PreTrainedTokenizerFast.decode
             and cls._decode is PreTrainedTokenizerFast._decode)
    if not plain or getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return lambda ids, skip_special_tokens: tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    backend = tokenizer.backend_tokenizer
    return lambda ids, skip_special_tokens: backend.decode(ids, skip_special_tokens=skip_special_tokens)


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], params: SamplingParams,
                 stop_strings: StopStrings | None = None) -> None:
        """``stop_strings``: ``params.stop`` indexed, when the caller shares it
        between requests with an equal list; else indexed here."""
        self.tokenizer = tokenizer
        self._decoder = decoder_for(tokenizer) if tokenizer is not None else None
        self.params = params
        self.ids: list[int] = list(prompt_token_ids[-_PROMPT_CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""  # what has been handed out
        self._full = ""  # decoded so far, including held-back characters
        self._stops = (stop_strings or StopStrings(params.stop)) if params.stop else None
        self._max_stop_len = self._stops.max_len if self._stops else 0
        # How much of _full was searched (finding no stop string), so that the
        # next search looks only at what follows; None once a stop string cut _full.
        self._searched_upto: int | None = 0
        self._num_output_tokens = 0

    def _decode(self, ids: list[int]) -> str:
        return self._decoder(ids, skip_special_tokens=self.params.skip_special_tokens)

    def add_tokens(self, token_ids: list[int], final: bool = False) -> tuple[str, str | None]:
        """Feed new tokens; returns (delta text, matched stop string or None).

        With ``final`` any held-back partial character is flushed as is.
        """
        if self.tokenizer is None:
            return "", None
        self.ids.extend(token_ids)
        self._num_output_tokens += len(token_ids)
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        if len(new_text) > len(prefix_text) and (final or not new_text.endswith("\ufffd")):
            delta = new_text[len(prefix_text):]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
        else:
            delta = ""
        return self._apply_stop(delta, final)

    def _apply_stop(self, delta: str, final: bool) -> tuple[str, str | None]:
        """Append ``delta``; cut at the first stop string. While streaming, the
        last len(longest stop)-1 characters are held back, since they may be
        the start of a stop string that must not reach the client."""
        search_from = max(0, len(self._full) - self._max_stop_len + 1)
        read_from = len(self._full)
        self._full += delta
        matched = None
        # Like an EOS or stop token, a stop string may end the request only
        # after min_tokens tokens: it is looked for in text from a later token.
        if self._stops is not None and delta and self._num_output_tokens > self.params.min_tokens:
            found = self._find_stop(search_from, read_from)
            if found is not None:
                idx, matched = found
                cut = idx + len(matched) if self.params.include_stop_str_in_output else idx
                self._full = self._full[:cut]
                final = True
        hold = 0 if final else max(self._max_stop_len - 1, 0)
        upto = max(len(self.text), len(self._full) - hold)
        out = self._full[len(self.text):upto]
        self.text = self._full[:upto]
        return out, matched

    def _find_stop(self, search_from: int, read_from: int) -> tuple[int, str] | None:
        """(position, stop string) of the stop string in _full[search_from:]
        that starts first, the first listed on a tie. Only those ending in
        _full[read_from:] are looked for: one that ends before it would have
        been found already."""
        if self._searched_upto != read_from:
            # What came before was not searched (text from before min_tokens,
            # or a cut): search from search_from, as if new.
            read_from = search_from
        found = self._stops.find(self._full, search_from, read_from)
        if found is None:
            self._searched_upto = len(self._full)
            return None
        self._searched_upto = None  # the caller cuts _full there
        return found[0], self._stops.stops[found[1]]
