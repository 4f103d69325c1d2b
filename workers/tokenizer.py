"""Text <-> token ids through the ``tokenizers`` library (a model directory's ``tokenizer.json``)."""

from __future__ import annotations

from pathlib import Path

import tokenizers


class Tokenizer:
    def __init__(self, path: Path) -> None:
        self._tokenizer = tokenizers.Tokenizer.from_file(str(path))

    def encode(self, text: str) -> list[int]:
        """``encode_batch`` of one: unlike ``encode``, it lets go of the GIL while it works, so a long text
        tokenized in a worker thread leaves the event loop free (500 kB: a 10 ms pause instead of 400)."""
        return self._tokenizer.encode_batch([text], add_special_tokens=True)[0].ids

    def decode(self, token_ids: list[int]) -> str:
        return self._tokenizer.decode(token_ids, skip_special_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)


def load_tokenizer(model_dir: Path) -> Tokenizer | None:
    """The model's tokenizer, or None when the directory has no tokenizer.json (token-id prompts only)."""
    path = Path(model_dir) / "tokenizer.json"
    return Tokenizer(path) if path.is_file() else None
