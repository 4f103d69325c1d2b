"""A small Python client of the kvtier gRPC API (the CLI and the tests use it)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from protos.kvtier.v1 import generation_pb2 as pb
from protos.kvtier.v1 import generation_pb2_grpc as pb_grpc
from workers.sampling_params import SamplingParams

FINISH_REASON_NAMES = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length",
                       pb.FINISH_REASON_ABORT: "abort"}


@dataclass(frozen=True)
class RemoteCompletion:
    token_ids: list[int]
    text: str
    finish_reason: str
    usage: dict
    worker_id: str
    ttft_s: float
    seed: int | None = None  # a sampled request's seed (its own, or the one the server drew)
    # when asked for: per token {"token_id", "logprob", "top": [[token id, logprob], ...]}
    logprobs: list[dict] = field(default_factory=list)
    prompt_logprobs: list[dict] = field(default_factory=list)  # as logprobs, for each prompt token after the first


def logprobs_record(token_id: int, logprob: float, top: Iterable[tuple[int, float]]) -> dict:
    """A generated token's log-probabilities as plain data (``kvtier generate --json``)."""
    return {"token_id": token_id, "logprob": logprob, "top": [[token, value] for token, value in top]}


def _records(found: Iterable[pb.TokenLogprobs]) -> list[dict]:
    return [logprobs_record(f.token_id, f.logprob, ((t.token_id, t.logprob) for t in f.top)) for f in found]


def build_request(prompt: str | Sequence[int], params: SamplingParams, cache_salt: str | None = None,
                  request_id: str = "", priority: int = 0) -> pb.GenerateRequest:
    request = pb.GenerateRequest(request_id=request_id, max_tokens=params.max_tokens, stop=list(params.stop),
                                 stop_token_ids=list(params.stop_token_ids), ignore_eos=params.ignore_eos,
                                 resumed_tokens=params.resumed_tokens, priority=priority,
                                 min_tokens=params.min_tokens)
    if isinstance(prompt, str):
        request.text = prompt
    else:
        request.token_ids.ids[:] = list(prompt)
    sampling = request.sampling
    sampling.temperature, sampling.top_p, sampling.top_k, sampling.min_p = (
        params.temperature, params.top_p, params.top_k, params.min_p)
    if params.seed is not None:
        sampling.seed = params.seed
    if params.has_penalties:
        sampling.repetition_penalty, sampling.presence_penalty, sampling.frequency_penalty = (
            params.repetition_penalty, params.presence_penalty, params.frequency_penalty)
    if params.logprobs is not None:
        sampling.logprobs = params.logprobs
    if params.prompt_logprobs is not None:
        sampling.prompt_logprobs = params.prompt_logprobs
    if cache_salt is not None:
        request.cache_salt = cache_salt
    return request


class KvtierClient:
    """``ca_file`` turns TLS on (the CA that signed the server's certificate); ``token`` is sent as a bearer
    token on every call (over TLS, or in the clear on a trusted network)."""

    def __init__(self, address: str, max_message_bytes: int = 64 * 2**20, ca_file: str | None = None,
                 token: str | None = None) -> None:
        options = [("grpc.max_send_message_length", max_message_bytes),
                   ("grpc.max_receive_message_length", max_message_bytes)]
        if ca_file is not None:
            credentials = grpc.ssl_channel_credentials(root_certificates=Path(ca_file).read_bytes())
            self.channel = grpc.secure_channel(address, credentials, options=options)
        else:
            self.channel = grpc.insecure_channel(address, options=options)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.stub = pb_grpc.GenerationStub(self.channel)

    def stream(self, request: pb.GenerateRequest, timeout_s: float | None = None) -> Iterator[pb.GenerateResponse]:
        return self.stub.Generate(request, timeout=timeout_s, metadata=self.metadata)

    def complete(self, prompt: str | Sequence[int], params: SamplingParams, cache_salt: str | None = None,
                 timeout_s: float | None = None, priority: int = 0) -> RemoteCompletion:
        token_ids, text, logprobs, prompt_logprobs = [], "", [], []
        for response in self.stream(build_request(prompt, params, cache_salt, priority=priority), timeout_s):
            kind = response.WhichOneof("event")
            if kind == "delta":
                token_ids += response.delta.token_ids
                text += response.delta.text
                logprobs += _records(response.delta.logprobs)
            elif kind == "prompt_logprobs":
                prompt_logprobs += _records(response.prompt_logprobs.logprobs)
            else:
                final = response.final
        cached = final.usage.cached_tokens
        usage = {"prompt_tokens": final.usage.prompt_tokens, "completion_tokens": final.usage.completion_tokens,
                 "cached_tokens": {"gpu": cached.gpu, "cpu": cached.cpu, "redis": cached.redis}}
        return RemoteCompletion(token_ids, text, FINISH_REASON_NAMES[final.finish_reason], usage, final.worker_id,
                                final.timings.ttft_s, final.seed if final.HasField("seed") else None, logprobs,
                                prompt_logprobs)

    def cluster_info(self, timeout_s: float = 30.0) -> pb.ClusterInfo:
        return self.stub.GetClusterInfo(pb.GetClusterInfoRequest(), metadata=self.metadata, timeout=timeout_s)

    def stats(self, timeout_s: float = 30.0) -> pb.Stats:
        return self.stub.GetStats(pb.GetStatsRequest(), metadata=self.metadata, timeout=timeout_s)

    def flush_cache(self, cache_salt: str | None = None, salt_scope: str | None = None,
                    timeout_s: float = 300.0) -> pb.FlushCacheResponse:
        """Every block of the model, or ``cache_salt``'s, or every salt in ``salt_scope``'s (not both)."""
        request = pb.FlushCacheRequest(cache_salt=cache_salt, salt_scope=salt_scope)
        return self.stub.FlushCache(request, metadata=self.metadata, timeout=timeout_s)

    def close(self) -> None:
        self.channel.close()
