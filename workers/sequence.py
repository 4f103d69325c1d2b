"""One request's tokens and its place in the paged KV cache. Pure Python."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from kvstore.hashing import BlockHasher
from kvstore.redis_keys import PrefixRef
from workers.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or max_model_len
    ABORT = "abort"


@dataclass(eq=False)
class Sequence:
    """Invariants: ``num_computed_tokens <= len(token_ids)``; the KV of tokens ``[0, num_computed_tokens)`` is in
    ``block_ids`` (token t in block ``block_ids[t // block_size]``); a waiting sequence holds no blocks;
    ``block_ids`` only grows in place, and any other change assigns a new list (``workers.table_rows`` relies on
    that to send only new entries of a sequence's block table)."""

    request_id: str
    token_ids: list[int]  # the prompt, then every generated token
    num_prompt_tokens: int
    params: SamplingParams
    priority: int = 0  # lower is served first (``workers.scheduler``)
    status: SequenceStatus = SequenceStatus.WAITING
    block_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_preemptions: int = 0
    finish_reason: FinishReason | None = None
    hasher: BlockHasher | None = None  # set when prefix caching is on; carries the tenant's cache salt
    num_cached_blocks: int = 0  # leading blocks registered in the GPU prefix cache
    cached_tokens: dict[str, int] | None = None  # prompt tokens found per tier, at first admission
    # the caches may supply only blocks wholly before this token (None: any); a request scoring its prompt
    # (``workers.prompt_logprobs``) must compute every position it has not scored yet
    reusable_tokens_limit: int | None = None

    @property
    def prefix_ref(self) -> PrefixRef:
        return PrefixRef(self.hasher.salt, self.hasher.hashes[0])

    def reusable_block_hashes(self) -> list[bytes]:
        """Hashes of the full blocks a cache may supply: all but the one holding the last token, which is always
        computed (its logits give the next token), and none from ``reusable_tokens_limit`` on."""
        hashes = self.hasher.update(self.token_ids)
        limit = self.num_tokens - 1 if self.reusable_tokens_limit is None else self.reusable_tokens_limit
        return hashes[: min(self.num_tokens - 1, limit) // self.hasher.block_size]

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]
