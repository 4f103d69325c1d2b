"""Text <-> token ids through the ``tokenizers`` library (a model directory's ``tokenizer.json``)."""

from __future__ import annotations

from pathlib import Path

import tokenizers


class Tokenizer:
    def __init__(self, path: Path) -> None:
        self._tokenizer = tokenizers.Tokenizer.from_file(str(path))

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=True).ids

    def decode(self, token_ids: list[int]) -> str:
        return self._tokenizer.decode(token_ids, skip_special_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)


def load_tokenizer(model_dir: Path) -> Tokenizer | None:
    """The model's tokenizer, or None when the directory has no tokenizer.json (token-id prompts only)."""
    path = Path(model_dir) / "tokenizer.json"
    return Tokenizer(path) if path.is_file() else None
