"""On CUDA, an eager step and sampling queue their work without waiting for the device (skipped without one):
under ``torch.cuda.set_sync_debug_mode("error")`` any call that would synchronise the host raises."""

from __future__ import annotations

import pytest
import torch

from tests.gpu.sync import no_host_sync
from tests.hf_reference import random_prompts, save_random_model
from workers.engine import LLMEngine
from workers.engine_config import CacheConfig, EngineConfig
from workers.runner import build_host_batch
from workers.sampler import sample_on_device
from workers.sampling_params import SamplingParams

pytestmark = pytest.mark.gpu


def test_an_eager_step_with_new_table_entries_does_not_synchronise_the_host(tmp_path):
    config = EngineConfig(model=str(save_random_model("llama3", tmp_path)), device="cuda", attention_backend="triton",
                          cuda_graphs=False, cache=CacheConfig(num_blocks=128))
    engine = LLMEngine.from_config(config, progress=False)
    for prompt in random_prompts([30, 70, 5], vocab_size=320, seed=5):
        engine.add_request(f"r{len(prompt)}", prompt, SamplingParams(max_tokens=8, temperature=0))
    plan = engine.scheduler.schedule()  # the prefill: every row of the block table is new
    batch = build_host_batch(plan.chunks, engine.cache_shape.block_size, engine.runner.table_rows)
    assert batch.table_updates
    logits = no_host_sync(lambda: engine.runner.run(batch, with_logits=True))
    assert logits.shape == (3, engine.model_config.vocab_size)


def test_sampling_with_every_filter_does_not_synchronise_the_host():
    logits = torch.randn(4, 1000, device="cuda")
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0.7, top_k=50),
              SamplingParams(temperature=1.0, top_p=0.9), SamplingParams(temperature=1.2, min_p=0.05)]
    generators = [torch.Generator(device="cuda").manual_seed(i) for i in range(4)]
    tokens = no_host_sync(lambda: sample_on_device(logits, params, generators))
    assert tokens.shape == (4,) and tokens[0].item() == logits[0].argmax().item()


def test_penalties_and_their_counts_do_not_synchronise_the_host():
    from workers.penalties import PenaltyState, penalized

    logits = torch.randn(3, 1000, device="cuda")
    params = [SamplingParams(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.2)] * 2
    device = torch.device("cuda")
    states = [PenaltyState([1, 2, 3, 2], 2, 1000, device), PenaltyState([7, 8], 0, 1000, device)]
    generators = [torch.Generator(device="cuda").manual_seed(i) for i in range(3)]

    def step() -> torch.Tensor:
        tokens = sample_on_device(penalized(logits, [0, 2], params, states), [params[0]] * 3, generators)
        states[0].add(tokens[0])
        states[1].add(tokens[2])
        return tokens

    tokens = no_host_sync(step)
    assert states[0].counts[tokens[0]].item() >= 1 and states[1].seen[tokens[2]].item()
