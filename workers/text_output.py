"""A request's generated text: incremental detokenization, stop strings, and what may be streamed yet.

Decoding token by token is not decoding the whole: a character may span tokens, and some tokenizers change a
token's text by what precedes it. So each new token is decoded with a few tokens of context before it, and
text is released only once it no longer ends in an incomplete character (U+FFFD).

Stop strings: the text is cut before the first stop string and the request stops. While streaming, the last
``longest stop string - 1`` characters are held back, since they may turn out to start a stop string. With
``min_tokens``, a stop string counts only once it ends in the text of the ``min_tokens``-th generated token or
later (as vLLM, which checks stop strings from that token on); one ending earlier is text like any other.
"""

from __future__ import annotations

from typing import Protocol

_CONTEXT_TOKENS = 5
_INCOMPLETE = "\ufffd"


class Decoder(Protocol):
    def decode(self, token_ids: list[int]) -> str: ...


class TextOutput:
    def __init__(self, decoder: Decoder | None, prompt_token_ids: list[int], stop: tuple[str, ...],
                 min_tokens: int = 0) -> None:
        self._decoder = decoder
        self._ids = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._stop = stop
        self._holdback = max((len(s) for s in stop), default=1) - 1
        self.text = ""
        self._released = 0
        self._min_tokens = min_tokens
        self._generated = 0  # tokens appended (replayed ones included)
        self._unarmed_until = 0  # no stop string ends at or before this text position

    def append(self, token_id: int) -> bool:
        """Add one generated token; True when a stop string has appeared (the text is cut before it)."""
        if self._decoder is None:
            return False
        self._ids.append(token_id)
        self._generated += 1
        checked_until = len(self.text)
        self.text += self._decode_new(final=False)
        return self._cut_at_stop(max(0, checked_until - self._holdback))

    def replay(self, token_ids: list[int]) -> bool:
        """Tokens an earlier run of this request generated (a resumed stream, ``resumed_tokens``): appended, and
        what that run would have released of their text counts as released. True if they hold a stop string
        (that run would have stopped there)."""
        for token_id in token_ids:
            if self.append(token_id):
                return True
        self.take_delta(finished=False)
        return False

    def finish(self) -> None:
        """Flush what was held as an incomplete character: the request is over."""
        if self._decoder is not None and self._read_offset < len(self._ids):
            checked_until = len(self.text)
            self.text += self._decode_new(final=True)
            self._cut_at_stop(max(0, checked_until - self._holdback))

    def take_delta(self, finished: bool) -> str:
        """Text not yet released; while unfinished, keep back what may still start a stop string."""
        end = len(self.text) if finished else max(self._released, len(self.text) - self._holdback)
        delta = self.text[self._released : end]
        self._released = end
        return delta

    def _decode_new(self, final: bool) -> str:
        seen = self._decoder.decode(self._ids[self._prefix_offset : self._read_offset])
        whole = self._decoder.decode(self._ids[self._prefix_offset :])
        if len(whole) <= len(seen) or (whole.endswith(_INCOMPLETE) and not final):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return whole[len(seen) :]

    def _cut_at_stop(self, search_from: int) -> bool:
        if self._generated < self._min_tokens:
            self._unarmed_until = len(self.text)
            return False
        hits = [i for i in (self.text.find(s, max(search_from, self._unarmed_until - len(s) + 1)) for s in self._stop)
                if i >= 0]
        if not hits:
            return False
        self.text = self.text[: min(hits)]
        self._released = min(self._released, len(self.text))
        return True
