"""How one request is sampled and when it stops. Plain data: checked by ``workers.validation``."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 is greedy
    top_p: float = 1.0  # in (0, 1]; 1 keeps every token
    top_k: int = 0  # 0 (or -1) keeps every token
    min_p: float = 0.0  # in [0, 1]; 0 keeps every token
    # ``workers.penalties``: > 0, 1 is off (transformers' repetition penalty, on prompt and output tokens)
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0  # in [-2, 2], 0 is off (OpenAI's, on output tokens)
    frequency_penalty: float = 0.0  # in [-2, 2], 0 is off (OpenAI's, per occurrence in the output)
    seed: int | None = None  # same seed => same tokens, whatever else shares the batch
    stop: tuple[str, ...] = ()  # the text is cut before the first of these
    stop_token_ids: tuple[int, ...] = ()  # stop after generating any of these (kept in token_ids)
    ignore_eos: bool = False
    # the output holds at least this many tokens (resumed ones included) before EOS or a stop token id can be
    # sampled (they are masked) or a stop string can end it (``workers.text_output``), as vLLM's
    min_tokens: int = 0
    # the prompt's last resumed_tokens ids were generated for this request by an earlier run of it, whose
    # stream broke (its worker died): this run draws, stops and streams text exactly as that run would have
    # gone on (max_tokens counts only the tokens still to come)
    resumed_tokens: int = 0
    # each generated token's log-probability under the model (log-softmax of its logits, before temperature
    # and the filters) and the ``logprobs`` most likely tokens' at its position; None: none
    logprobs: int | None = None
    # each prompt token's log-probability given the tokens before it (the first has none) and the
    # ``prompt_logprobs`` most likely tokens' at its position, sent before the first generated token; None: none.
    # Such a request computes its whole prompt: the prefix cache supplies none of it (it stores what it computes)
    prompt_logprobs: int | None = None

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0
