"""Next-token sampling: frequencies follow the probabilities; masked tokens never come up."""

import pytest
import torch

from persona_ops.inference.sampling import exponential_race, inverse_cdf, sample_next, top_p_filter


@pytest.mark.parametrize("sampler", [exponential_race, inverse_cdf])
def test_frequencies_follow_probabilities_and_seed_repeats(sampler):
    probs = torch.tensor([0.5, 0.0, 0.3, 0.15, 0.05]).expand(20000, -1)  # 20k rows = 20k draws
    draws = sampler(probs, torch.Generator().manual_seed(1))
    freq = torch.bincount(draws, minlength=5).float() / len(draws)
    assert freq[1] == 0
    assert (freq - probs[0]).abs().max() < 0.015  # ~4 standard errors at p = 0.5
    assert torch.equal(draws, sampler(probs, torch.Generator().manual_seed(1)))


def test_temperature_and_greedy():
    logits = torch.tensor([[2.0, 1.0, 0.0]]).expand(20000, -1)
    g = torch.Generator().manual_seed(0)
    cold = torch.bincount(sample_next(logits, 0.5, generator=g), minlength=3).float() / 20000
    want = (logits[0] / 0.5).softmax(-1)
    assert (cold - want).abs().max() < 0.015
    assert sample_next(logits[:2], 0.0).tolist() == [0, 0]


def test_top_p_keeps_the_smallest_set():
    logits = torch.tensor([[0.1, 0.5, 0.25, 0.15]]).log()
    kept = torch.isfinite(top_p_filter(logits, 0.7))[0].tolist()
    assert kept == [False, True, True, False]
    draws = sample_next(logits.expand(5000, -1), 1.0, top_p=0.7, generator=torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == {1, 2}
