import math

import pytest

from workers.sampling_params import SamplingParams
from workers.validation import InvalidRequestError, RequestLimits, validate_request, validate_text_prompt

LIMITS = RequestLimits(vocab_size=100, max_model_len=64, kv_capacity_tokens=128, has_tokenizer=True)


@pytest.mark.parametrize(
    "prompt, params, field",
    [
        ([], SamplingParams(), "prompt_token_ids"),
        ([1, 100], SamplingParams(), "prompt_token_ids[1]"),
        ([1, -1], SamplingParams(), "prompt_token_ids[1]"),
        ([1, 2.5], SamplingParams(), "prompt_token_ids[1]"),
        ([1, True], SamplingParams(), "prompt_token_ids[1]"),
        ([5] * 1000 + [100], SamplingParams(max_tokens=1), "prompt_token_ids[1000]"),
        ([1] * 60, SamplingParams(max_tokens=5), "max_tokens"),
        ([1], SamplingParams(max_tokens=0), "max_tokens"),
        ([1], SamplingParams(temperature=-0.1), "temperature"),
        ([1], SamplingParams(temperature=math.nan), "temperature"),
        ([1], SamplingParams(temperature=math.inf), "temperature"),
        ([1], SamplingParams(top_p=0.0), "top_p"),
        ([1], SamplingParams(top_p=1.5), "top_p"),
        ([1], SamplingParams(top_p=math.nan), "top_p"),
        ([1], SamplingParams(top_k=-2), "top_k"),
        ([1], SamplingParams(top_k=2.0), "top_k"),
        ([1], SamplingParams(min_p=1.5), "min_p"),
        ([1], SamplingParams(min_p=math.nan), "min_p"),
        ([1], SamplingParams(seed=-1), "seed"),
        ([1], SamplingParams(logprobs=21), "logprobs"),
        ([1], SamplingParams(logprobs=-1), "logprobs"),
        ([1], SamplingParams(logprobs=True), "logprobs"),
        ([1], SamplingParams(prompt_logprobs=21), "prompt_logprobs"),
        ([1], SamplingParams(repetition_penalty=0.0), "repetition_penalty"),
        ([1], SamplingParams(max_tokens=4, min_tokens=5), "min_tokens"),
        ([1], SamplingParams(min_tokens=-1), "min_tokens"),
        ([1], SamplingParams(min_tokens=1.0), "min_tokens"),
        ([1], SamplingParams(repetition_penalty=math.inf), "repetition_penalty"),
        ([1], SamplingParams(presence_penalty=-2.5), "presence_penalty"),
        ([1], SamplingParams(frequency_penalty=math.nan), "frequency_penalty"),
        ([1], SamplingParams(prompt_logprobs=1.0), "prompt_logprobs"),
        ([1, 2], SamplingParams(prompt_logprobs=0, resumed_tokens=1), "prompt_logprobs"),  # sent by the earlier run
        ([1, 2], SamplingParams(prompt_logprobs=0, resumed_tokens="1"), "resumed_tokens"),
        ([1], SamplingParams(stop=("",)), "stop[0]"),
        ([1], SamplingParams(stop_token_ids=(5, 100)), "stop_token_ids[1]"),
        ([1, 2], SamplingParams(resumed_tokens=2), "resumed_tokens"),  # at least one token of the prompt itself
        ([1, 2], SamplingParams(resumed_tokens=-1), "resumed_tokens"),
    ],
)
def test_each_invalid_field_is_named(prompt, params, field):
    with pytest.raises(InvalidRequestError) as caught:
        validate_request(prompt, params, LIMITS)
    assert caught.value.field == field
    assert str(caught.value).startswith(f"{field}: ")


def test_a_request_longer_than_the_whole_kv_pool_is_rejected():
    limits = RequestLimits(vocab_size=100, max_model_len=1000, kv_capacity_tokens=32, has_tokenizer=True)
    with pytest.raises(InvalidRequestError, match="exceeds the KV cache") as caught:
        validate_request([1] * 30, SamplingParams(max_tokens=3), limits)
    assert caught.value.field == "max_tokens"


@pytest.mark.parametrize("priority", [2**31, -(2**31) - 1, 1.5, True, "1"])
def test_a_priority_outside_int32_or_not_an_int_is_named(priority):
    with pytest.raises(InvalidRequestError) as caught:
        validate_request([1], SamplingParams(), LIMITS, priority=priority)
    assert caught.value.field == "priority"


def test_valid_requests_pass():
    validate_request([1] * 48, SamplingParams(max_tokens=16, temperature=0, top_k=-1, top_p=1.0), LIMITS)
    validate_request([99], SamplingParams(temperature=2, top_k=5, top_p=0.1, min_p=1.0, seed=0, stop=("x",)), LIMITS)
    for priority in (-(2**31), -1, 0, 2**31 - 1):
        validate_request([1], SamplingParams(), LIMITS, priority=priority)


def test_text_prompt_checks():
    with pytest.raises(InvalidRequestError, match="prompt: is empty"):
        validate_text_prompt("", LIMITS)
    no_tokenizer = RequestLimits(vocab_size=100, max_model_len=64, kv_capacity_tokens=128, has_tokenizer=False)
    with pytest.raises(InvalidRequestError, match="send prompt_token_ids"):
        validate_text_prompt("hi", no_tokenizer)
    with pytest.raises(InvalidRequestError, match="resumed_tokens: a resumed request's prompt must be token ids"):
        validate_text_prompt("hi", LIMITS, resumed_tokens=1)
    with pytest.raises(InvalidRequestError) as caught:
        validate_request([1], SamplingParams(stop=("x",)), no_tokenizer)
    assert caught.value.field == "stop"
