"""From a GenerateRequest to what the engine takes (the prompt, SamplingParams, the cache salt), and from a
FlushCacheRequest to the salts it covers.

Unset optional fields take SamplingParams' defaults. Checks on values live in ``workers.validation`` (one
place for every front end); this module only checks what only the protocol can get wrong.
"""

from __future__ import annotations

import secrets

from kvstore.redis_keys import SaltSelection
from protos.kvtier.v1 import generation_pb2 as pb
from workers.sampling_params import SamplingParams
from workers.validation import InvalidRequestError

MAX_STOP_STRINGS = 16

FINISH_REASONS = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH, "abort": pb.FINISH_REASON_ABORT}


def prompt_of(request: pb.GenerateRequest) -> str | list[int]:
    kind = request.WhichOneof("prompt")
    if kind == "text":
        return request.text
    if kind == "token_ids":
        return list(request.token_ids.ids)
    raise InvalidRequestError("prompt", "set text or token_ids")


def sampling_of(request: pb.GenerateRequest) -> SamplingParams:
    if len(request.stop) > MAX_STOP_STRINGS:
        raise InvalidRequestError("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(request.stop)}")
    sampling = request.sampling
    defaults = SamplingParams()
    return SamplingParams(
        max_tokens=request.max_tokens if request.HasField("max_tokens") else defaults.max_tokens,
        temperature=sampling.temperature if sampling.HasField("temperature") else defaults.temperature,
        top_p=sampling.top_p if sampling.HasField("top_p") else defaults.top_p,
        top_k=sampling.top_k if sampling.HasField("top_k") else defaults.top_k,
        min_p=sampling.min_p if sampling.HasField("min_p") else defaults.min_p,
        repetition_penalty=(sampling.repetition_penalty if sampling.HasField("repetition_penalty")
                            else defaults.repetition_penalty),
        presence_penalty=sampling.presence_penalty if sampling.HasField("presence_penalty") else 0.0,
        frequency_penalty=sampling.frequency_penalty if sampling.HasField("frequency_penalty") else 0.0,
        seed=sampling.seed if sampling.HasField("seed") else None,
        stop=tuple(request.stop),
        stop_token_ids=tuple(request.stop_token_ids),
        ignore_eos=request.ignore_eos,
        min_tokens=request.min_tokens,
        resumed_tokens=request.resumed_tokens,
        logprobs=sampling.logprobs if sampling.HasField("logprobs") else None,
        prompt_logprobs=sampling.prompt_logprobs if sampling.HasField("prompt_logprobs") else None,
    )


def drawn_seed(request: pb.GenerateRequest) -> int | None:
    """A seed for a sampled request that has none (None for a greedy one, or one with its own): drawn by the
    router, so that every worker the stream may move to samples with the same one (``Final.seed``)."""
    if request.sampling.HasField("seed") or sampling_of(request).is_greedy:
        return None
    return secrets.randbelow(2**63)


def salt_of(request: pb.GenerateRequest) -> str | None:
    return request.cache_salt if request.HasField("cache_salt") else None


def salts_of(request: pb.FlushCacheRequest) -> SaltSelection:
    """The salts a flush covers: ``salt_scope``'s, ``cache_salt``, or (neither set) every salt."""
    if request.HasField("salt_scope") and request.HasField("cache_salt"):
        raise InvalidRequestError("salt_scope", "set salt_scope or cache_salt, not both")
    if request.HasField("salt_scope"):
        try:
            return SaltSelection.in_scope(request.salt_scope)
        except ValueError as error:
            raise InvalidRequestError("salt_scope", str(error)) from None
    return SaltSelection.one_salt(request.cache_salt) if request.HasField("cache_salt") else SaltSelection()


def with_token_ids(request: pb.GenerateRequest, request_id: str, token_ids: list[int]) -> pb.GenerateRequest:
    """The request as the router forwards it: tokenized, with its id."""
    forwarded = pb.GenerateRequest()
    forwarded.CopyFrom(request)
    forwarded.request_id = request_id
    forwarded.token_ids.ids[:] = token_ids
    return forwarded
