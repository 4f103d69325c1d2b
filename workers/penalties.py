"""Repetition, presence and frequency penalties, and ``min_tokens``' masks: the logits a request samples from,
given its own tokens.

- ``repetition_penalty`` (transformers' and vLLM's): every token id in the prompt or the output so far has its
  logit divided by the penalty where it is positive, multiplied by it where it is negative;
- ``presence_penalty`` and ``frequency_penalty`` (OpenAI's): a token id the output holds loses
  ``presence_penalty``, plus ``frequency_penalty`` per time it appears there.

They change only what is sampled (and greedy's argmax): reported logprobs stay the model's own. A request's
statistics live on the device (``PenaltyState``), built from its tokens at its first sampled step and updated
with each token it samples, so a step uploads nothing per token of context; they depend only on the request's
own tokens (a resumed request counts its resumed tokens as output), never on the batch.
"""

from __future__ import annotations

import torch

from workers.sampling_params import SamplingParams
from workers.uploads import upload


class PenaltyState:
    """Which token ids a request's prompt and output hold (``seen``, [V] bool) and how often each appears in
    its output (``counts``, [V] fp32)."""

    def __init__(self, token_ids: list[int], num_output: int, vocab_size: int, device: torch.device) -> None:
        ids = upload(token_ids, device)
        self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        self.seen[ids] = True
        self.counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)
        if num_output:
            self.counts.index_add_(0, ids[len(token_ids) - num_output :],
                                   torch.ones(num_output, dtype=torch.float32, device=device))

    def add(self, token: torch.Tensor) -> None:
        """Count a sampled token (a tensor of one id on the device; indexed as a 1-d index, never as an int,
        which would wait for the device)."""
        index = token.reshape(1)
        self.seen.index_fill_(0, index, True)
        self.counts.index_add_(0, index, torch.ones(1, dtype=self.counts.dtype, device=self.counts.device))


def penalized(logits: torch.Tensor, rows: list[int], params: list[SamplingParams],
              states: list[PenaltyState]) -> torch.Tensor:
    """A copy of logits [S, V] fp32 with each of ``rows`` penalized by its ``params`` and ``states``."""
    device = logits.device
    index = upload(rows, device)
    seen = torch.stack([state.seen for state in states])  # [R, V]
    counts = torch.stack([state.counts for state in states])  # [R, V]
    repetition = upload([p.repetition_penalty for p in params], device, logits.dtype)[:, None]  # [R, 1]
    presence = upload([p.presence_penalty for p in params], device, logits.dtype)[:, None]
    frequency = upload([p.frequency_penalty for p in params], device, logits.dtype)[:, None]
    rows_logits = logits[index]  # [R, V]
    repeated = torch.where(rows_logits < 0, rows_logits * repetition, rows_logits / repetition)
    rows_logits = torch.where(seen, repeated, rows_logits)
    rows_logits = rows_logits - presence * (counts > 0) - frequency * counts
    out = logits.clone()
    out[index] = rows_logits
    return out


def without_tokens(logits: torch.Tensor, banned: list[tuple[int, list[int]]]) -> torch.Tensor:
    """A copy of logits [S, V] where each (row, token ids) of ``banned`` is -inf (``min_tokens``: EOS and the
    stop token ids cannot be sampled yet)."""
    rows = [row for row, ids in banned for _ in ids]
    columns = [token for _, ids in banned for token in ids]
    out = logits.clone()
    out[upload(rows, logits.device), upload(columns, logits.device)] = float("-inf")
    return out
