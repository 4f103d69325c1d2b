"""Random-weight transformers models saved to disk, and transformers' own greedy output as the reference."""

from __future__ import annotations

import random
from pathlib import Path

import torch

# Small models of each family shape the engine must reproduce token for token.
SHAPES = {
    "llama3": dict(
        family="llama", hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=320, max_position_embeddings=1024, tie_word_embeddings=True,
        rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 128,
        },
        bos_token_id=1, eos_token_id=2,
    ),
    "llama2": dict(  # multi-head attention (no GQA), default RoPE, untied
        family="llama", hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=320, max_position_embeddings=1024, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2,
    ),
    "mistral": dict(  # GQA; its sliding window is wider than any test sequence
        family="mistral", hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, vocab_size=320, max_position_embeddings=1024, tie_word_embeddings=False,
        sliding_window=1024, bos_token_id=1, eos_token_id=2,
    ),
    "mistral-window": dict(  # a sliding window (every layer) far shorter than the longer prompts
        family="mistral", hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=320, max_position_embeddings=1024, tie_word_embeddings=False,
        sliding_window=40, bos_token_id=1, eos_token_id=2,
    ),
    "qwen2-window": dict(  # the window on the layers from max_window_layers on: layer 0 full, layer 1 windowed
        family="qwen2", hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=320, max_position_embeddings=1024, tie_word_embeddings=False,
        use_sliding_window=True, sliding_window=40, max_window_layers=1, bos_token_id=None, eos_token_id=None,
    ),
    "qwen2": dict(
        family="qwen2", hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=320, max_position_embeddings=1024, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=None,
    ),
}


def save_random_model(shape: str, directory: Path, seed: int = 0) -> Path:
    """A transformers model with random weights (std 0.1: peaked enough that greedy ties are unlikely)."""
    import transformers

    kwargs = dict(SHAPES[shape])
    prefix = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}[kwargs.pop("family")]
    config_cls = getattr(transformers, f"{prefix}Config")
    model_cls = getattr(transformers, f"{prefix}ForCausalLM")
    config = config_cls(initializer_range=0.1, **kwargs)
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    model.save_pretrained(directory)
    return Path(directory)


def random_prompts(lengths: list[int], vocab_size: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab_size) for _ in range(n)] for n in lengths]


def hf_greedy(model_dir: Path, prompts: list[list[int]], max_new_tokens: int, processors=None,
              **generate_options) -> list[list[int]]:
    """transformers' greedy ``generate``, one prompt at a time (no padding), new tokens only; ``processors``
    (prompt length -> a list of logits processors) adds processors of the test's own."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    outputs = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            extra = {"logits_processor": processors(len(prompt))} if processors is not None else {}
            generated = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                pad_token_id=0, **extra, **generate_options,
            )
        outputs.append(generated[0, len(prompt):].tolist())
    return outputs


def hf_log_softmax(model_dir: Path, token_ids: list[int]) -> torch.Tensor:
    """transformers' log-softmax of the logits at every position of ``token_ids`` ([len, vocab], fp32)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([token_ids])).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


class OpenAIPenalties:
    """A transformers logits processor: OpenAI's presence and frequency penalties over the generated tokens
    (those after ``prompt_len``), as the reference for ``workers.penalties``."""

    def __init__(self, presence: float, frequency: float, prompt_len: int) -> None:
        self.presence, self.frequency, self.prompt_len = presence, frequency, prompt_len

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        counts = torch.zeros_like(scores)
        generated = input_ids[:, self.prompt_len :]
        counts.scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - self.presence * (counts > 0) - self.frequency * counts
