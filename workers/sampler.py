"""Turns the last hidden state's logits into one token per sequence.

Greedy rows take the argmax. Other rows apply temperature, then top-k, top-p and min-p, and draw with the
exponential race (argmax of p / E, E ~ Exp(1)), with noise from the request's own generator, seeded for each
token by ``token_seed``: a request's draws depend only on its seed, the token's index among those it
generated, and its own logits; never on what else is in the batch, nor on which worker (a stream resumed
elsewhere after n tokens draws its next as the first run would have).
"""

from __future__ import annotations

import torch

from workers.sampling_params import SamplingParams
from workers.uploads import upload


_MASK64 = 2**64 - 1


def token_seed(seed: int, index: int) -> int:
    """The seed of the draw for a request's ``index``-th generated token (0 first): SplitMix64 of the request's
    seed stepped ``index + 1`` times, so neighbouring seeds and indices give unrelated streams."""
    z = (seed + (index + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> list[int]:
    """logits [S, V] fp32 -> S token ids."""
    return sample_on_device(logits, params, generators).tolist()


def sample_on_device(logits: torch.Tensor, params: list[SamplingParams],
                     generators: list[torch.Generator]) -> torch.Tensor:
    """logits [S, V] fp32 -> [S] token ids, on the logits' device (no host synchronisation)."""
    tokens = logits.argmax(dim=-1)  # [S]
    random_rows = [row for row, p in enumerate(params) if not p.is_greedy]
    if random_rows:
        rows = upload(random_rows, logits.device)
        probs = filtered_probs(logits[rows], [params[row] for row in random_rows])  # [R, V]
        noise = torch.stack([_exponential(probs.shape[-1], generators[row], probs.device) for row in random_rows])
        tokens[rows] = (probs / noise).argmax(dim=-1)
    return tokens


def filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """[R, V] logits -> [R, V] probabilities after temperature, top-k, top-p and min-p."""
    device = logits.device
    temperature = upload([p.temperature for p in params], device, logits.dtype)
    logits = logits / temperature[:, None]
    if any(p.top_k > 0 or p.top_p < 1 for p in params):
        logits = _top_k_top_p(logits, params)
    probs = logits.softmax(dim=-1)
    if any(p.min_p > 0 for p in params):
        min_p = upload([p.min_p for p in params], device, probs.dtype)
        floor = min_p[:, None] * probs.max(dim=-1, keepdim=True).values
        probs = probs.masked_fill(probs < floor, 0.0)
    return probs


def _top_k_top_p(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # [R, V]
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    top_k = upload([p.top_k if p.top_k > 0 else vocab for p in params], logits.device)
    sorted_logits = sorted_logits.masked_fill(ranks >= top_k[:, None], float("-inf"))
    top_p = upload([p.top_p for p in params], logits.device, logits.dtype)
    sorted_probs = sorted_logits.softmax(dim=-1)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # probability of the better-ranked tokens
    drop = (mass_before >= top_p[:, None]) & (top_p[:, None] < 1) & (ranks > 0)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def _exponential(size: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    noise = torch.empty(size, device=device).exponential_(generator=generator)
    return noise.clamp_min_(torch.finfo(noise.dtype).tiny)  # an exact 0 would divide 0 by 0
