"""Turns the last hidden state's logits into one token per sequence.

Greedy rows take the argmax. Other rows apply temperature, then top-k, top-p and min-p, and draw with the
exponential race (argmax of p / E, E ~ Exp(1)), with noise from the request's own generator, seeded for each
token by ``token_seed``: a request's draws depend only on its seed, the token's index among those it
generated, and its own logits; never on what else is in the batch, nor on which worker (a stream resumed
elsewhere after n tokens draws its next as the first run would have).
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class TokenLogprobs:
    """A generated token's log-probability under the model, and the most likely tokens' at its position."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # (token id, log-probability), most likely first


def logprobs_of(logits: torch.Tensor, tokens: torch.Tensor, rows: list[int], counts: list[int]) -> list[TokenLogprobs]:
    """For ``rows`` of logits [S, V] and their sampled ``tokens`` [S]: the log-softmax of each row's token and
    of its ``counts[i]`` most likely tokens, in fp32 (one copy to the host)."""
    index = upload(rows, logits.device)
    logprobs = torch.log_softmax(logits[index].float(), dim=-1)  # [R, V]
    chosen_ids = tokens[index]  # [R]
    chosen = logprobs.gather(-1, chosen_ids[:, None])[:, 0]  # [R]
    top_values, top_ids = logprobs.topk(max(counts), dim=-1)  # [R, K]
    ids, values, top_ids, top_values = (t.tolist() for t in (chosen_ids, chosen, top_ids, top_values))
    return [TokenLogprobs(ids[i], values[i], tuple(zip(top_ids[i][:count], top_values[i][:count])))
            for i, count in enumerate(counts)]


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
    """Drop what top-k and top-p drop, by value: each keeps its least likely token's ties too, so what is kept
    never depends on how a sort orders equal logits (bf16 logits tie often). Top-k is then transformers' (and
    vLLM's): every token at least as likely as the k-th. Top-p is the smallest set of the best tokens whose
    mass reaches p, taken from what top-k kept, plus the ties of its last token."""
    vocab = logits.shape[-1]
    sorted_logits = logits.sort(dim=-1, descending=True).values  # [R, V]
    top_k = upload([min(p.top_k, vocab) if p.top_k > 0 else vocab for p in params], logits.device)
    kth = sorted_logits.gather(-1, top_k[:, None] - 1)  # [R, 1]: the least logit top-k keeps
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    top_p = upload([p.top_p for p in params], logits.device, logits.dtype)[:, None]  # [R, 1]
    sorted_probs = sorted_logits.softmax(dim=-1)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # probability of the better-ranked tokens
    needed = (mass_before < top_p).sum(dim=-1, keepdim=True)  # [R, 1], at least 1: the best token's is 0
    floor = torch.where(top_p < 1, torch.maximum(sorted_logits.gather(-1, needed - 1), kth), kth)  # [R, 1]
    return logits.masked_fill(logits < floor, float("-inf"))


def _exponential(size: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    noise = torch.empty(size, device=device).exponential_(generator=generator)
    return noise.clamp_min_(torch.finfo(noise.dtype).tiny)  # an exact 0 would divide 0 by 0
