"""Every check on a request, in one place. Each failure is an ``InvalidRequestError`` naming the field."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from dataclasses import dataclass
from numbers import Integral, Real
from typing import TypeVar

from workers.sampling_params import SamplingParams

T = TypeVar("T")


class InvalidRequestError(ValueError):
    """The request cannot be served as asked; ``field`` names the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.reason = message


@dataclass(frozen=True)
class RequestLimits:
    vocab_size: int
    max_model_len: int
    kv_capacity_tokens: int  # tokens the whole KV pool holds: a longer sequence could never run
    has_tokenizer: bool


def validate_text_prompt(prompt: str, limits: RequestLimits, resumed_tokens: int = 0) -> None:
    if not isinstance(prompt, str):
        raise InvalidRequestError("prompt", f"must be text, got {type(prompt).__name__}")
    if not prompt:
        raise InvalidRequestError("prompt", "is empty")
    if resumed_tokens:
        raise InvalidRequestError("resumed_tokens", "a resumed request's prompt must be token ids")
    if not limits.has_tokenizer:
        raise InvalidRequestError("prompt", "this model has no tokenizer.json; send prompt_token_ids instead")


MAX_CACHE_SALT_CHARS = 1024
MAX_LOGPROBS = 20  # alternatives per generated token (as OpenAI's API and vLLM's default)
PRIORITY_RANGE = (-(2**31), 2**31 - 1)  # the wire's int32
# A prompt at least this long (characters or token ids) is tokenized and checked in a worker thread by whatever
# serves it from an event loop (the router, a worker): on the loop, a 128k-token prompt would hold up every
# other stream's tokens for a tenth of a second.
LONG_PROMPT = 8192


async def in_a_thread_if_long(prompt_size: int, work: Callable[[], T]) -> T:
    """``work()`` on a prompt of ``prompt_size`` characters or ids: in a worker thread from ``LONG_PROMPT`` on,
    so the event loop goes on meanwhile; at once for a shorter one (a thread costs more than the work)."""
    return await asyncio.to_thread(work) if prompt_size >= LONG_PROMPT else work()


def validate_request(
    prompt_token_ids: list[int], params: SamplingParams, limits: RequestLimits, cache_salt: str | None = None,
    priority: int = 0,
) -> None:
    if not _is_int(priority) or not PRIORITY_RANGE[0] <= priority <= PRIORITY_RANGE[1]:
        raise InvalidRequestError("priority", f"must be an integer in [{PRIORITY_RANGE[0]}, {PRIORITY_RANGE[1]}]")
    if cache_salt is not None and (not isinstance(cache_salt, str) or len(cache_salt) > MAX_CACHE_SALT_CHARS):
        raise InvalidRequestError("cache_salt", f"must be a string of at most {MAX_CACHE_SALT_CHARS} characters")
    _check_prompt_ids(prompt_token_ids, limits)
    _check_sampling(params, limits)
    _check_stops(params, limits)
    _check_resumed(len(prompt_token_ids), params.resumed_tokens)
    if not _is_int(params.min_tokens) or not 0 <= params.min_tokens <= params.max_tokens + params.resumed_tokens:
        raise InvalidRequestError("min_tokens", f"must be an integer in [0, max_tokens], got {params.min_tokens!r}")
    if params.prompt_logprobs is not None and params.resumed_tokens:
        raise InvalidRequestError("prompt_logprobs", "a resumed stream sent its prompt's log-probabilities already")
    _check_length(len(prompt_token_ids), params.max_tokens, limits)


def _check_prompt_ids(token_ids: list[int], limits: RequestLimits) -> None:
    if len(token_ids) == 0:
        raise InvalidRequestError("prompt_token_ids", "is empty")
    if all(type(t) is int for t in token_ids) and min(token_ids) >= 0 and max(token_ids) < limits.vocab_size:
        return  # the usual case, without a Python step per id (a 128k-token prompt: 7 ms, not 56)
    for index, token_id in enumerate(token_ids):  # which one is wrong, for the message
        if not _is_int(token_id) or not 0 <= token_id < limits.vocab_size:
            raise InvalidRequestError(
                f"prompt_token_ids[{index}]", f"{token_id!r} is not a token id in [0, {limits.vocab_size})"
            )


def _check_sampling(params: SamplingParams, limits: RequestLimits) -> None:
    if not _is_int(params.max_tokens) or params.max_tokens < 1:
        raise InvalidRequestError("max_tokens", f"must be an integer >= 1, got {params.max_tokens!r}")
    _check_real("temperature", params.temperature, low=0.0, low_open=False, high=math.inf)
    _check_real("top_p", params.top_p, low=0.0, low_open=True, high=1.0)
    _check_real("min_p", params.min_p, low=0.0, low_open=False, high=1.0)
    _check_real("repetition_penalty", params.repetition_penalty, low=0.0, low_open=True, high=math.inf)
    _check_real("presence_penalty", params.presence_penalty, low=-2.0, low_open=False, high=2.0)
    _check_real("frequency_penalty", params.frequency_penalty, low=-2.0, low_open=False, high=2.0)
    if not _is_int(params.top_k) or params.top_k < -1:
        raise InvalidRequestError("top_k", f"must be -1 or 0 (off) or an integer >= 1, got {params.top_k!r}")
    if params.seed is not None and (not _is_int(params.seed) or not 0 <= params.seed < 2**63):
        raise InvalidRequestError("seed", f"must be an integer in [0, 2**63), got {params.seed!r}")
    if params.logprobs is not None and (not _is_int(params.logprobs) or not 0 <= params.logprobs <= MAX_LOGPROBS):
        raise InvalidRequestError("logprobs", f"must be an integer in [0, {MAX_LOGPROBS}], got {params.logprobs!r}")
    count = params.prompt_logprobs
    if count is not None and (not _is_int(count) or not 0 <= count <= MAX_LOGPROBS):
        raise InvalidRequestError("prompt_logprobs", f"must be an integer in [0, {MAX_LOGPROBS}], got {count!r}")


def _check_real(field: str, value: object, low: float, low_open: bool, high: float) -> None:
    """Finite (or +inf-free) real in [low, high] or (low, high]."""
    if isinstance(value, bool) or not isinstance(value, Real) or math.isnan(value) or math.isinf(value):
        raise InvalidRequestError(field, f"must be a finite number, got {value!r}")
    below = value <= low if low_open else value < low
    if below or value > high:
        bracket = "(" if low_open else "["
        raise InvalidRequestError(field, f"must be in {bracket}{low:g}, {high:g}], got {value!r}")


def _check_stops(params: SamplingParams, limits: RequestLimits) -> None:
    for index, text in enumerate(params.stop):
        if not isinstance(text, str) or not text:
            raise InvalidRequestError(f"stop[{index}]", "must be a non-empty string")
    if params.stop and not limits.has_tokenizer:
        raise InvalidRequestError("stop", "stop strings need a tokenizer; this model has none")
    for index, token_id in enumerate(params.stop_token_ids):
        if not _is_int(token_id) or not 0 <= token_id < limits.vocab_size:
            raise InvalidRequestError(f"stop_token_ids[{index}]", f"{token_id!r} is not a token id")


def _check_resumed(prompt_len: int, resumed_tokens: object) -> None:
    if not _is_int(resumed_tokens) or not 0 <= resumed_tokens < prompt_len:
        raise InvalidRequestError("resumed_tokens", f"must be an integer in [0, {prompt_len}) (below the prompt's "
                                                    f"length), got {resumed_tokens!r}")


def _check_length(prompt_len: int, max_tokens: int, limits: RequestLimits) -> None:
    if prompt_len + max_tokens > limits.max_model_len:
        raise InvalidRequestError(
            "max_tokens",
            f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceeds max_model_len {limits.max_model_len}",
        )
    if prompt_len + max_tokens > limits.kv_capacity_tokens:
        raise InvalidRequestError(
            "max_tokens",
            f"prompt ({prompt_len}) + max_tokens ({max_tokens}) exceeds the KV cache ({limits.kv_capacity_tokens} tokens)",
        )


def _is_int(value: object) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)
