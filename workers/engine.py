"""One worker's engine: requests in, token deltas out, one ``step()`` at a time.

``LLMEngine.from_config`` loads the model and sizes the KV pool; ``add_request`` validates and queues;
``step`` schedules, runs the model, samples and returns what each request gained; ``abort`` frees a
request's blocks at once (its final output comes with the next ``step``).
"""

from __future__ import annotations

import functools
import logging
import random
import time
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

import torch

from kvstore.block_pool import BlockPool
from kvstore.config import KVStoreConfig
from kvstore.cost_model import FetchCostModel
from kvstore.events import KVEventLog
from kvstore.hashing import BlockHasher
from kvstore.redis_keys import SaltSelection
from kvstore.redis_store import RedisHealth
from kvstore.salt_index import SaltIndex
from kvstore.stats import KVStoreStats
from kvstore.tier_policy import LRUTierPolicy
from workers.attention import make_backend
from workers.engine_config import EngineConfig, EngineConfigError
from workers.forward_timer import ForwardTimer
from workers.block_mover import GATHER_PIECE_BLOCKS, BlockMover, writer_head_ranges
from workers.decode_graphs import decode_graph_batch
from workers.kv_cache import KVCacheShape, allocate_kv_cache, plan_kv_cache
from workers.kv_tiers import KVTiers, cpu_tier_slots
from workers.model import LlamaForCausalLM
from workers.model_config import ModelConfig, load_model_config
from workers.model_loader import fingerprint_model, load_model, resolve_dtype
from workers.parallel import ParallelContext, check_parallel_degree
from workers.penalties import PenaltyState, penalized, without_tokens
from workers.presets import resolve_model_dir
from workers.prompt_logprobs import PromptScores, plan_scoring, score
from workers.runner import ModelRunner
from workers.sampler import TokenLogprobs, logprobs_of, sample_on_device, token_seed
from workers.sampling_params import SamplingParams
from workers.scheduler import Scheduler, SchedulerOutput
from workers.sequence import FinishReason, Sequence
from workers.text_output import TextOutput
from workers.tp_group import RankLauncher, TPGroup, collective_device
from workers.tokenizer import Tokenizer, load_tokenizer
from workers.validation import InvalidRequestError, RequestLimits, validate_request, validate_text_prompt

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CachedTokens:
    """Prompt tokens that were not computed, by the tier they came from."""

    gpu: int = 0
    cpu: int = 0
    redis: int = 0

    @property
    def total(self) -> int:
        return self.gpu + self.cpu + self.redis


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: CachedTokens = CachedTokens()


@dataclass(frozen=True)
class RequestOutput:
    """What one request gained in one step. The last one has ``finished`` set and a ``finish_reason``."""

    request_id: str
    new_token_ids: tuple[int, ...]
    new_text: str
    finished: bool
    finish_reason: FinishReason | None
    usage: Usage
    seed: int | None = None  # on the last one of a sampled (not greedy) request: what it was sampled with
    logprobs: tuple[TokenLogprobs, ...] = ()  # one per new token, when the request asked for them
    # on the output with the first generated token, when the request asked: one per prompt token after the first
    prompt_logprobs: tuple[TokenLogprobs, ...] = ()


@dataclass(frozen=True)
class PreparedRequest:
    """A validated request, ready to enter the scheduler (built without touching engine state)."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    cache_salt: str | None = None
    priority: int = 0  # lower is served first (``workers.scheduler``)


@dataclass
class _RequestState:
    seq: Sequence
    text: TextOutput
    seed: int
    generator: torch.Generator  # seeded again for each token the request samples (``token_seed``)
    prompt_scores: PromptScores | None = None  # while a request asking for prompt logprobs has not sent them
    penalty: PenaltyState | None = None  # from its first sampled step, when it has penalties

    def generator_for_next_token(self) -> torch.Generator:
        params = self.seq.params
        if not params.is_greedy:
            self.generator.manual_seed(token_seed(self.seed, params.resumed_tokens + self.seq.num_output_tokens))
        return self.generator


@dataclass
class EngineStats:
    steps: int = 0
    preemptions: int = 0
    priority_preemptions: int = 0  # of the preemptions, those that made room for a more urgent request
    computed_tokens: int = 0  # prompt and recomputed tokens run through the model
    generated_tokens: int = 0
    step_seconds: float = 0.0  # wall time in steps that ran the model
    token_wait_seconds: float = 0.0  # of which blocked on the device for sampled tokens; the rest is host work


@dataclass(frozen=True)
class Completion:
    """A finished request, assembled from its outputs by ``LLMEngine.generate``."""

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: FinishReason
    usage: Usage
    seed: int | None = None  # a sampled request's seed (its own, or the one the engine drew); None when greedy
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # one per token, when the request asked
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)  # one per prompt token after the first


@dataclass
class _Collector:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)


class LLMEngine:
    def __init__(
        self,
        config: EngineConfig,
        model: LlamaForCausalLM,
        tokenizer: Tokenizer | None,
        cache_shape: KVCacheShape,
        device: torch.device,
        kvstore: KVStoreConfig | None = None,
        fingerprint: str = "0" * 64,
        tp_group: TPGroup | None = None,
    ) -> None:
        self.config = config
        self.kvstore_config = kvstore or KVStoreConfig()
        self.model_config: ModelConfig = model.config
        self.tokenizer = tokenizer
        self.device = device
        self.cache_shape = cache_shape
        self.fingerprint = fingerprint
        self.tp_group = tp_group
        self.parallel = ParallelContext(0, config.tensor_parallel_size)
        self.kv_events = KVEventLog()
        self.block_pool = BlockPool(cache_shape.num_blocks, self.kv_events)
        self.limits = RequestLimits(
            vocab_size=self.model_config.vocab_size,
            max_model_len=max_model_len(config, self.model_config),
            kv_capacity_tokens=cache_shape.num_blocks * cache_shape.block_size,
            has_tokenizer=tokenizer is not None,
        )
        kv_cache = allocate_kv_cache(cache_shape, device)
        self.runner = ModelRunner(model, kv_cache, cache_shape.block_size, device, config.scheduler.max_num_seqs,
                                  self.limits.max_model_len, broadcaster=tp_group)
        self.kv_stats = KVStoreStats()
        self._forward_timer = ForwardTimer(device)
        self.cost_model = FetchCostModel(enabled=self.kvstore_config.cost_model, work=self.model_config.prefill_work())
        self.tiers = self._set_up_tiers(kv_cache)
        cpu_slots = self._cpu_tier.num_slots if self._cpu_tier is not None else 0
        self._salts = SaltIndex(prune_above=2 * (cache_shape.num_blocks + cpu_slots))  # for a salt's flush
        self._pending_stores: list = []
        self.scheduler = Scheduler(
            config.scheduler, self.block_pool, cache_shape.block_size, lower_tiers=self.tiers, stats=self.kv_stats,
        )
        self._capture_decode_graphs()  # after the other ranks learned the pool size (_set_up_tiers)
        self.stats = EngineStats()
        self._requests: dict[str, _RequestState] = {}
        self._aborted: list[RequestOutput] = []
        self._seed_source = random.Random(config.seed)
        self._arrivals = 0

    @classmethod
    def from_config(
        cls,
        config: EngineConfig,
        kvstore: KVStoreConfig | None = None,
        progress: bool = True,
        distributed: bool | None = None,
        launch_ranks: RankLauncher | None = None,
    ) -> LLMEngine:
        """Load the model and size the pools. ``distributed``: run through a torch.distributed group (None: only
        when tensor_parallel_size > 1; True also at 1, which exercises the NCCL path on a single GPU).
        ``launch_ranks`` starts ranks 1..N-1 (default: child processes of this one)."""
        model_dir = resolve_model_dir(config.model)
        device = resolve_device(config.device)
        model_config = load_model_config(model_dir)
        dtype = resolve_dtype(config.dtype, model_config)
        check_parallel_degree(model_config, config.tensor_parallel_size)
        parallel = ParallelContext(0, config.tensor_parallel_size)
        use_group = parallel.world_size > 1 if distributed is None else distributed
        group = TPGroup(config, device, launch_ranks) if use_group else None
        try:
            backend = make_backend(config.attention_backend, str(device))
            model = load_model(model_dir, dtype, str(device), backend, progress, parallel)
            cache_shape = plan_kv_cache(config.cache, model_config, dtype, device, parallel.kv_heads(model_config).size)
            log.info("%s on %s (rank 0 of %d)", cache_shape.describe(), device, parallel.world_size)
            fingerprint = fingerprint_model(model_dir, model_config, dtype, config.cache.block_size)
            return cls(config, model, load_tokenizer(model_dir), cache_shape, device, kvstore, fingerprint, group)
        except BaseException:
            if group is not None:
                group.stop()
            raise

    def _set_up_tiers(self, kv_cache: torch.Tensor) -> KVTiers | None:
        """This rank's block mover, the other ranks' pool sizes, and rank 0's tier decisions (None: GPU only)."""
        shape, model = self.cache_shape, self.model_config
        full_block_shape = KVCacheShape(
            shape.num_blocks, shape.num_layers, shape.block_size, model.num_kv_heads, shape.head_dim, shape.dtype
        )
        num_cpu_slots = cpu_tier_slots(self.kvstore_config, full_block_shape.bytes_per_block)
        if self.tp_group is not None:
            self.tp_group.broadcast_sizes(shape.num_blocks, num_cpu_slots)
        kvstore = self.kvstore_config
        has_tiers = kvstore.prefix_caching and bool(num_cpu_slots or kvstore.redis.url)
        self.mover = BlockMover(
            kv_cache, num_cpu_slots, self.parallel.kv_heads(model), model.num_kv_heads, self.parallel,
            collective_device(self.device), time_loads=has_tiers,  # KVTiers reads the loads' GPU times
        )
        if not has_tiers:
            return None
        unit_ranges = writer_head_ranges(self.parallel.world_size, model.num_kv_heads)
        return KVTiers(
            full_block_shape, unit_ranges, kvstore, num_cpu_slots, self.fingerprint, self.kv_stats,
            # (callables that do not hold the engine: it is freed, KV cache and all, once dropped, without
            # waiting for the garbage collector to find a cycle)
            self.cost_model, functools.partial(_apply_tier_ops, self.mover, self.tp_group),
            functools.partial(_gpu_hits, self.block_pool), self.kv_events,
            pin_staging=self.device.type == "cuda",
            gather_piece_blocks=GATHER_PIECE_BLOCKS if self.tp_group is None else 0,  # with ranks: not pinned
            load_clock=self.mover.settled_load_seconds if self.mover.time_loads else None,
        )

    def _capture_decode_graphs(self) -> None:
        """On CUDA with the Triton backend; the other ranks capture at the same point of their start-up."""
        max_batch = decode_graph_batch(self.config, self.device)
        if max_batch:
            self.runner.enable_decode_graphs(max_batch, self.limits.max_model_len, with_logits=True, capture=True)

    def prepare_request(
        self,
        request_id: str,
        prompt: str | Seq[int],
        params: SamplingParams | None = None,
        cache_salt: str | None = None,
        *,
        priority: int = 0,
    ) -> PreparedRequest:
        """Tokenize and validate; raises ``InvalidRequestError`` naming the field. Touches no engine state."""
        params = params or SamplingParams()
        if isinstance(prompt, str):
            validate_text_prompt(prompt, self.limits, params.resumed_tokens)
            prompt_ids = self.tokenizer.encode(prompt)
        else:
            prompt_ids = list(prompt)
        validate_request(prompt_ids, params, self.limits, cache_salt, priority)
        return PreparedRequest(str(request_id), prompt_ids, params, cache_salt, priority)

    def add_request(
        self,
        request_id: str,
        prompt: str | Seq[int],
        params: SamplingParams | None = None,
        cache_salt: str | None = None,
        *,
        priority: int = 0,
    ) -> None:
        self.submit(self.prepare_request(request_id, prompt, params, cache_salt, priority=priority))

    def submit(self, request: PreparedRequest) -> None:
        if request.request_id in self._requests:
            raise InvalidRequestError("request_id", f"{request.request_id!r} is already running")
        text = self._text_output(request)
        seed = request.params.seed
        if seed is None:
            seed = self._seed_source.randrange(2**63)
        seq = Sequence(
            request.request_id, list(request.prompt_token_ids), len(request.prompt_token_ids), request.params,
            request.priority,
        )
        if self.kvstore_config.prefix_caching:
            seq.hasher = BlockHasher(self.cache_shape.block_size, salt=request.cache_salt)
        self._arrivals += 1
        state = _RequestState(seq, text, seed, torch.Generator(device=self.device))
        if request.params.prompt_logprobs is not None:
            state.prompt_scores = PromptScores(request.params.prompt_logprobs)
            state.prompt_scores.limit_reuse(seq)
        self._requests[seq.request_id] = state
        self.scheduler.add(seq)
        if self.tiers is not None and seq.hasher is not None:
            self._prefetch(seq)

    def _text_output(self, request: PreparedRequest) -> TextOutput:
        """The request's text; a resumed request's (``SamplingParams.resumed_tokens``) as its earlier run left it."""
        prompt, resumed = request.prompt_token_ids, request.params.resumed_tokens
        text = TextOutput(self.tokenizer, prompt[: len(prompt) - resumed], request.params.stop,
                          request.params.min_tokens)
        if text.replay(prompt[len(prompt) - resumed :]):
            raise InvalidRequestError("resumed_tokens", "the resumed tokens hold a stop string: that run had ended")
        return text

    def _prefetch(self, seq: Sequence) -> None:
        """Start reading the prompt's full blocks that the GPU pool lacks from Redis now, in the background, so
        the read runs beside the steps taken until the request is admitted (``KVTiers.prefetch``)."""
        hashes = seq.reusable_block_hashes()
        on_gpu = _gpu_hits(self.block_pool, hashes)
        if on_gpu < len(hashes):
            self.tiers.prefetch(seq.request_id, hashes[on_gpu:], seq.prefix_ref, on_gpu)

    def abort(self, request_id: str) -> bool:
        """Stop a request and free its blocks now; False if it is unknown or already finished."""
        state = self._requests.pop(request_id, None)
        if state is None:
            return False
        self.scheduler.finish(state.seq, FinishReason.ABORT)
        self._aborted.append(self._output(state, (), finished=True))
        return True

    def has_unfinished(self) -> bool:
        return bool(self._requests or self._aborted)

    def step(self) -> list[RequestOutput]:
        stepped = time.perf_counter()
        outputs, self._aborted = self._aborted, []
        plan = self.scheduler.schedule()
        self.stats.preemptions += len(plan.preempted)
        self.stats.priority_preemptions += plan.yielded
        if not plan.chunks:
            return outputs
        self._move_blocks_in(plan)
        scoring = plan_scoring(plan.chunks, lambda seq: self._requests[seq.request_id].prompt_scores)
        self._forward_timer.start()
        result = self.runner.execute(plan.chunks, scoring.rows)
        self._forward_timer.stop()
        sampling = [self._requests[chunk.seq.request_id] for chunk in plan.chunks if chunk.samples]
        tokens, logprobs = self._sample(result.logits, sampling)
        if scoring.rows:
            score(scoring, result.scored_hidden, self.runner.model.compute_logits)
        self._observe_step(plan, self._forward_timer.seconds())
        self.scheduler.mark_computed(plan)
        newly_cached = self.scheduler.cache_full_blocks(plan)
        for block_hash, _, prefix in newly_cached:
            self._salts.add([block_hash], prefix.salt, self._held_locally)
        outputs += [self._append_token(*sampled) for sampled in zip(sampling, tokens, logprobs)]
        if self.tiers is not None:
            self._pending_stores += newly_cached
            if not self.scheduler.has_unfinished():  # idle: write what is pending now, not at the next request
                self.tiers.move([], [], self._take_pending_stores(), [])
        self.stats.step_seconds += time.perf_counter() - stepped
        return outputs

    def _sample(self, logits: torch.Tensor | None,
                sampling: list[_RequestState]) -> tuple[list[int], list[TokenLogprobs | None]]:
        """The step's tokens on the host, and the log-probabilities of those whose requests asked for them;
        reading the tokens is the step's one wait for the device (timed)."""
        if not sampling:
            return [], []
        params = [state.seq.params for state in sampling]
        generators = [state.generator_for_next_token() for state in sampling]
        penalized_rows = [row for row, p in enumerate(params) if p.has_penalties]
        tokens = sample_on_device(self._sampling_logits(logits, sampling, penalized_rows), params, generators)
        for row in penalized_rows:
            sampling[row].penalty.add(tokens[row])
        asking = [row for row, p in enumerate(params) if p.logprobs is not None]
        waited = time.perf_counter()
        host_tokens = tokens.tolist()
        self.stats.token_wait_seconds += time.perf_counter() - waited
        logprobs: list[TokenLogprobs | None] = [None] * len(sampling)
        if asking:
            for row, found in zip(asking, logprobs_of(logits, tokens, asking, [params[r].logprobs for r in asking])):
                logprobs[row] = found
        return host_tokens, logprobs

    def _sampling_logits(self, logits: torch.Tensor, sampling: list[_RequestState],
                         penalized_rows: list[int]) -> torch.Tensor:
        """The logits to sample from: the penalties of ``penalized_rows`` applied (``workers.penalties``), and
        EOS and the stop token ids masked where the output holds fewer than ``min_tokens`` tokens."""
        logits = self._penalized(logits, sampling, penalized_rows) if penalized_rows else logits
        banned = [(row, self._stop_ids(state.seq.params)) for row, state in enumerate(sampling)
                  if state.seq.num_output_tokens + state.seq.params.resumed_tokens < state.seq.params.min_tokens]
        banned = [(row, ids) for row, ids in banned if ids]
        return without_tokens(logits, banned) if banned else logits

    def _stop_ids(self, params: SamplingParams) -> list[int]:
        eos = () if params.ignore_eos else self.model_config.eos_token_ids
        return sorted(set(params.stop_token_ids) | set(eos))

    def _penalized(self, logits: torch.Tensor, sampling: list[_RequestState], rows: list[int]) -> torch.Tensor:
        """``logits`` with the penalties of ``rows`` applied; a request's statistics are made at its first."""
        for row in rows:
            state = sampling[row]
            if state.penalty is None:
                seq = state.seq
                state.penalty = PenaltyState(seq.token_ids, seq.num_output_tokens + seq.params.resumed_tokens,
                                             logits.shape[-1], logits.device)
        return penalized(logits, rows, [sampling[row].seq.params for row in rows],
                         [sampling[row].penalty for row in rows])

    def _move_blocks_in(self, plan: SchedulerOutput) -> None:
        """Before the forward, in this order: gather last step's new blocks for Redis, spill what the pool evicted
        (its blocks are about to be reused), load this step's hits."""
        evicted = self.block_pool.take_evicted()
        if self.tiers is None:
            self.kv_stats["gpu"].evicted_blocks += len(evicted)
            return
        self.tiers.move(evicted, plan.loads, self._take_pending_stores(), plan.pool_hits)
        self.scheduler.mark_loaded(plan.loads)
        for load in plan.loads:
            self._salts.add([load.block_hash], load.salt, self._held_locally)

    def _take_pending_stores(self) -> list:
        pending, self._pending_stores = self._pending_stores, []
        return pending

    def _observe_step(self, plan: SchedulerOutput, forward_seconds: float | None) -> None:
        self.stats.steps += 1
        self.stats.computed_tokens += plan.num_tokens
        prefill_tokens = sum(chunk.num_tokens for chunk in plan.chunks if chunk.num_tokens > 1)
        # a step that is mostly prefill measures the prefill rate, by its forward's time alone (not the copies
        # of tier moves the forward waited for on the GPU: workers.forward_timer)
        if forward_seconds is not None and prefill_tokens >= plan.num_tokens // 2:
            work = self.cost_model.work
            flops = sum(work.flops(chunk.start, chunk.num_tokens) for chunk in plan.chunks) if work else 0.0
            self.cost_model.observe_prefill(plan.num_tokens, forward_seconds, flops)

    def flush_cache(self, salts: SaltSelection = SaltSelection(), redis: bool = True) -> dict[str, int | None]:
        """Drop this model's cached blocks of the selected salts (every block, by default): from the GPU and CPU
        tiers (a block a running request holds stays its own) and, unless ``redis`` is False, Redis. Returns
        blocks dropped per tier (Redis: keys, None when it did not answer)."""
        self.mover.settle_gathers()  # uncached blocks can be overwritten next step, reported as reused or not
        local = None if salts.everything else self._salts.hashes_of(salts)  # None: every block
        gpu = self.block_pool.reset_cache() if local is None else self.block_pool.uncache(local)
        dropped = {"gpu": gpu, "cpu": 0, "redis": 0}
        self._pending_stores = [s for s in self._pending_stores if not salts.covers(s[2].salt)]
        if self.tiers is not None:
            dropped.update(self.tiers.flush(salts, redis, local))
        self._salts.prune(self._held_locally)
        return dropped

    def _held_locally(self, block_hash: bytes) -> bool:
        """Whether the GPU pool or the CPU tier holds the block."""
        cpu = self._cpu_tier
        return self.block_pool.cached_block(block_hash) is not None or (cpu is not None and cpu.holds(block_hash))

    @property
    def _cpu_tier(self) -> LRUTierPolicy | None:
        return self.tiers.cpu if self.tiers is not None else None

    def kv_snapshot(self) -> dict[str, list[bytes]]:
        """The blocks this worker holds per local tier (what a freshly subscribed router indexes)."""
        cpu = self._cpu_tier.lru_order() if self._cpu_tier is not None else []
        return {"gpu": self.block_pool.cached_hashes(), "cpu": cpu}

    def load(self) -> int:
        """Requests running or waiting."""
        return len(self.scheduler.running) + len(self.scheduler.waiting)

    def kv_store_stats(self) -> dict[str, dict[str, int]]:
        if self.tiers is not None:
            self.tiers.sync_writer_stats()
        return self.kv_stats.as_dict()

    def tier_usage(self) -> dict[str, dict[str, float]]:
        """Occupancy of the local tiers, in blocks: GPU blocks held by sequences and by the prefix cache, CPU
        slots filled; each with its capacity. No I/O (Redis's own numbers come from ``redis_health``)."""
        pool = self.block_pool
        usage = {"gpu": {"used_blocks": float(pool.num_used), "cached_blocks": float(pool.num_cached),
                         "capacity_blocks": float(pool.num_blocks)}}
        cpu = self._cpu_tier
        if cpu is not None:
            usage["cpu"] = {"used_blocks": float(len(cpu)), "capacity_blocks": float(cpu.num_slots)}
        return usage

    def redis_health(self) -> RedisHealth | None:
        """A blocking probe of the Redis tier (PING, INFO); None when no Redis is configured."""
        if self.tiers is None or self.tiers.redis is None:
            return None
        return self.tiers.redis.health()

    def close(self) -> None:
        """Finish queued Redis writes, close connections, stop the other tensor-parallel ranks."""
        if self.tiers is not None:
            self.tiers.close()
        if self.tp_group is not None:
            self.tp_group.stop()
            self.tp_group = None

    def generate(
        self,
        prompts: Seq[str | Seq[int]],
        params: SamplingParams | Seq[SamplingParams],
        cache_salt: str | None = None,
        priority: int = 0,
    ) -> list[Completion]:
        """Run ``prompts`` as one batch to completion; results in prompt order."""
        params_list = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        request_ids = [f"generate-{self._arrivals + i}" for i in range(len(prompts))]
        prepared = [self.prepare_request(rid, p, sp, cache_salt, priority=priority)
                    for rid, p, sp in zip(request_ids, prompts, params_list)]
        for request in prepared:
            self.submit(request)
        return self.run_to_completion(request_ids)

    def run_to_completion(self, request_ids: list[str]) -> list[Completion]:
        """Step until ``request_ids`` finish; their completions hold what they produce from this call on."""
        collected = {rid: _Collector() for rid in request_ids}
        finals: dict[str, RequestOutput] = {}
        while len(finals) < len(request_ids):
            for output in self.step():
                if output.request_id in collected:
                    collected[output.request_id].token_ids += output.new_token_ids
                    collected[output.request_id].text += output.new_text
                    collected[output.request_id].logprobs += output.logprobs
                    collected[output.request_id].prompt_logprobs += output.prompt_logprobs
                    if output.finished:
                        finals[output.request_id] = output
        return [Completion(rid, collected[rid].token_ids, collected[rid].text, finals[rid].finish_reason,
                           finals[rid].usage, finals[rid].seed, collected[rid].logprobs, collected[rid].prompt_logprobs)
                for rid in request_ids]

    def _append_token(self, state: _RequestState, token: int, logprobs: TokenLogprobs | None = None) -> RequestOutput:
        seq = state.seq
        seq.token_ids.append(token)
        self.stats.generated_tokens += 1
        stop_string_hit = state.text.append(token)
        reason = self._finish_reason(seq, token, stop_string_hit)
        if reason is not None:
            self.scheduler.finish(seq, reason)
            state.text.finish()
            del self._requests[seq.request_id]
        found = (logprobs,) if logprobs is not None else ()
        return self._output(state, (token,), finished=reason is not None, logprobs=found,
                            prompt_logprobs=self._take_prompt_logprobs(state))

    @staticmethod
    def _take_prompt_logprobs(state: _RequestState) -> tuple[TokenLogprobs, ...]:
        """With a request's first token: its prompt's scores (all are scored by then), once; else none."""
        scores, state.prompt_scores = state.prompt_scores, None
        return () if scores is None else tuple(scores.scored)

    def _finish_reason(self, seq: Sequence, token: int, stop_string_hit: bool) -> FinishReason | None:
        params = seq.params
        is_eos = token in self.model_config.eos_token_ids and not params.ignore_eos
        if is_eos or token in params.stop_token_ids or stop_string_hit:
            return FinishReason.STOP
        if seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.limits.max_model_len:
            return FinishReason.LENGTH
        return None

    def _output(self, state: _RequestState, new_tokens: tuple[int, ...], finished: bool,
                logprobs: tuple[TokenLogprobs, ...] = (),
                prompt_logprobs: tuple[TokenLogprobs, ...] = ()) -> RequestOutput:
        seq = state.seq
        cached = CachedTokens(**(seq.cached_tokens or {}))
        usage = Usage(seq.num_prompt_tokens, seq.num_output_tokens, cached)
        seed = state.seed if finished and not seq.params.is_greedy else None
        return RequestOutput(
            seq.request_id, new_tokens, state.text.take_delta(finished), finished, seq.finish_reason, usage, seed,
            logprobs, prompt_logprobs,
        )


def _apply_tier_ops(mover: BlockMover, tp_group: TPGroup | None, ops, payload):
    """Run a step's tier copies here, and on every rank of a group (in the same order)."""
    if tp_group is None:
        return mover.apply(ops, payload)
    if ops.copies_nothing:  # only reused blocks: with ranks no gather is left running to order them after
        return None
    return tp_group.run_tier_ops(ops, lambda: mover.apply(ops, payload))


def _gpu_hits(block_pool: BlockPool, block_hashes: list[bytes]) -> int:
    """How many leading blocks of ``block_hashes`` the GPU pool caches."""
    return len(block_pool.match_prefix(block_hashes))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise EngineConfigError(f"engine.device: {name!r} asked for, but torch sees no CUDA device")
    return torch.device(name)


def max_model_len(config: EngineConfig, model: ModelConfig) -> int:
    """The configured limit, capped by the model's positions."""
    limit = model.max_position_embeddings
    if config.max_model_len is not None:
        if config.max_model_len > limit:
            raise EngineConfigError(
                f"engine.max_model_len: {config.max_model_len} exceeds what the model supports ({limit})"
            )
        limit = config.max_model_len
    return limit
