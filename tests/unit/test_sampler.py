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
