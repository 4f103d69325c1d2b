import torch

from workers.sampler import filtered_probs, sample
from workers.sampling_params import SamplingParams

LOGITS = torch.log(torch.tensor([[0.1, 0.4, 0.2, 0.3]]))


def kept(params):
    return (filtered_probs(LOGITS.clone(), [params])[0] > 0).tolist()


def test_top_k_keeps_the_k_most_likely():
    assert kept(SamplingParams(top_k=2)) == [False, True, False, True]


def test_top_p_keeps_the_smallest_set_reaching_p():
    assert kept(SamplingParams(top_p=0.5)) == [False, True, False, True]  # 0.4 < 0.5, 0.4 + 0.3 >= 0.5
    assert kept(SamplingParams(top_p=0.4)) == [False, True, False, False]
    assert kept(SamplingParams(top_p=0.05)) == [False, True, False, False]  # the best token always stays


def test_min_p_drops_tokens_below_a_fraction_of_the_best():
    assert kept(SamplingParams(min_p=0.6)) == [False, True, False, True]  # floor 0.24


def test_filtered_probabilities_renormalise():
    probs = filtered_probs(LOGITS.clone(), [SamplingParams(top_k=2)])[0]
    assert torch.allclose(probs, torch.tensor([0.0, 4 / 7, 0.0, 3 / 7]))


def test_greedy_rows_take_the_argmax_and_random_rows_follow_their_generator():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0), SamplingParams(temperature=1.0)]

    def draw():
        generators = [torch.Generator().manual_seed(s) for s in (0, 7, 7)]
        return sample(logits.clone(), params, generators)

    first = draw()
    assert first[0] == logits[0].argmax().item()
    assert draw() == first


def test_sampling_frequencies_follow_the_distribution():
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(4)
    for _ in range(4000):
        (token,) = sample(LOGITS.clone(), [SamplingParams(temperature=1.0)], [generator])
        counts[token] += 1
    assert torch.allclose(counts / 4000, torch.tensor([0.1, 0.4, 0.2, 0.3]), atol=0.03)


def test_top_k_keeps_the_ties_of_the_kth_token_and_top_p_those_of_its_last():
    logits = torch.log(torch.tensor([[0.1, 0.3, 0.2, 0.3, 0.1]]))

    def kept_of(params):
        return (filtered_probs(logits.clone(), [params])[0] > 0).tolist()

    assert kept_of(SamplingParams(top_k=1)) == [False, True, False, True, False]  # 0.3 twice
    assert kept_of(SamplingParams(top_k=3)) == [False, True, True, True, False]
    assert kept_of(SamplingParams(top_k=4)) == [True, True, True, True, True]  # 0.1 twice
    assert kept_of(SamplingParams(top_p=0.2)) == [False, True, False, True, False]  # one 0.3 reaches p: both stay
    assert kept_of(SamplingParams(top_p=0.85)) == [True, True, True, True, True]  # 0.3 + 0.3 + 0.2 + one 0.1


def _random_logits(rng: torch.Generator, vocab: int, tied: bool) -> torch.Tensor:
    logits = torch.randn(1, vocab, generator=rng) * 3  # [1, V]
    return (logits * 2).round() / 2 if tied else logits  # rounded: many equal logits, as in bf16


def test_what_is_kept_does_not_depend_on_the_order_of_the_vocabulary():
    rng = torch.Generator().manual_seed(0)
    for trial in range(200):
        logits = _random_logits(rng, 64, tied=True)
        params = SamplingParams(temperature=0.8, top_k=[1, 5, 20][trial % 3], top_p=[1.0, 0.5, 0.9][trial % 2 + 1])
        order = torch.randperm(64, generator=rng)
        kept = filtered_probs(logits.clone(), [params])[0] > 0
        assert torch.equal(filtered_probs(logits[:, order].clone(), [params])[0] > 0, kept[order])


def test_filters_keep_what_transformers_warpers_keep():
    from transformers.generation.logits_process import (MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    def warped(logits, params):
        scores = TemperatureLogitsWarper(params.temperature)(None, logits.clone())
        for warper, active in ((TopKLogitsWarper(max(params.top_k, 1)), params.top_k > 0),
                               (TopPLogitsWarper(params.top_p), params.top_p < 1),
                               (MinPLogitsWarper(params.min_p), params.min_p > 0)):
            scores = warper(None, scores) if active else scores
        return torch.isfinite(scores[0])

    rng = torch.Generator().manual_seed(1)
    checked = 0
    for trial in range(600):
        tied = trial % 2 == 1
        logits = _random_logits(rng, [7, 50, 320][trial % 3], tied)
        params = SamplingParams(temperature=[0.7, 1.0, 1.5][trial % 3], top_k=[0, 1, 3, 40][trial % 4],
                                top_p=[1.0, 0.95, 0.6, 0.2][trial // 4 % 4], min_p=[0.0, 0.1][trial // 16 % 2])
        ours, theirs = filtered_probs(logits.clone(), [params])[0] > 0, warped(logits, params)
        if tied and params.top_p < 1:  # transformers splits the ties of top-p's last token by sort order
            assert torch.equal(ours | theirs, ours) and logits[0][ours].min() == logits[0][theirs].min()
        else:
            assert torch.equal(ours, theirs), (trial, params)
            checked += 1
    assert checked >= 350  # every untied draw, and the tied ones without top-p
