"""Sampling: SamplingParams validation and the engine's Sampler (per-request parameters and
seeds into ``ember.ops.sample``), checked statistically against the filtered distribution."""

import pytest
import torch

from ember.engine.sampler import Sampler
from ember.engine.sampling_params import SamplingParams
from ember.engine.sequence import Sequence

DRAWS = 4000


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=-0.5), "temperature must be >= 0"),
    (dict(temperature=float("nan")), "temperature must be finite"),
    (dict(temperature="hot"), "temperature must be a number"),
    (dict(top_k=-2), "top_k must be -1, 0"),
    (dict(top_k=2.5), "top_k must be an int"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(min_p=-0.1), r"min_p must be in \[0, 1\]"),
    (dict(max_tokens=0), "max_tokens must be >= 1"),
    (dict(max_tokens=True), "max_tokens must be an int"),
    (dict(min_tokens=-1), "min_tokens must be >= 0"),
    (dict(min_tokens=5, max_tokens=4), "min_tokens .* must be <= max_tokens"),
    (dict(seed=1.5), "seed must be an int"),
    (dict(stop=[""]), "stop must be a non-empty string"),
    (dict(stop=["ok", 3]), "stop must be a non-empty string"),
    (dict(stop_token_ids=[-4]), "stop_token_ids must be non-negative"),
    (dict(stop_token_ids=["2"]), "stop_token_ids entries must be an int"),
])
def test_invalid_params_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_params_normalise():
    p = SamplingParams(top_k=-1, stop="###", stop_token_ids=(5, 6))
    assert p.top_k == 0 and p.stop_strings == ("###",) and p.stop_token_ids == [5, 6]
    assert SamplingParams(max_tokens=None).max_tokens is None


LOGITS = torch.tensor([2.0, 1.6, 1.5, 0.7, 0.2, 0.0, -0.5, -1.0, -3.0, 0.9])


def draw(params: SamplingParams, logits=LOGITS, eos=(), num_output=0):
    """DRAWS tokens for one request's parameters, each from a different seed."""
    seqs = []
    for i in range(DRAWS):
        seq = Sequence(str(i), [1], params, seed=1000 + i, max_model_len=100)
        seq.token_ids += [1] * num_output
        seqs.append(seq)
    return Sampler(eos)(logits.repeat(DRAWS, 1).clone(), seqs)


def assert_distribution(tokens, probs):
    """Every drawn token has probability > 0 and frequencies match within 5 sigma."""
    counts = torch.bincount(tokens, minlength=len(probs)).double()
    assert (counts[probs == 0] == 0).all(), f"filtered tokens drawn: {counts}"
    freq = counts / DRAWS
    sigma = (probs * (1 - probs) / DRAWS).sqrt()
    assert ((freq - probs).abs() <= 5 * sigma + 1e-9).all(), f"{freq} vs {probs}"


def kept_distribution(keep, temperature=1.0):
    p = torch.softmax(LOGITS.double() / temperature, -1)
    p = torch.where(keep, p, 0.0)
    return p / p.sum()


def test_temperature():
    tokens = draw(SamplingParams(temperature=0.5))
    assert_distribution(tokens, kept_distribution(torch.ones(10, dtype=torch.bool), 0.5))


def test_top_k():
    tokens = draw(SamplingParams(temperature=1.0, top_k=3))
    keep = torch.zeros(10, dtype=torch.bool)
    keep[LOGITS.topk(3).indices] = True
    assert_distribution(tokens, kept_distribution(keep))


def test_top_p():
    top_p = 0.6
    p = torch.softmax(LOGITS.double(), -1)
    # Keep a token if the mass of the strictly more likely tokens is below top_p.
    keep = torch.tensor([p[p > pi].sum() < top_p for pi in p])
    assert 1 < int(keep.sum()) < 10
    assert_distribution(draw(SamplingParams(temperature=1.0, top_p=top_p)), kept_distribution(keep))


def test_min_p():
    p = torch.softmax(LOGITS.double(), -1)
    keep = p >= 0.4 * p.max()
    assert 1 < int(keep.sum()) < 10
    assert_distribution(draw(SamplingParams(temperature=1.0, min_p=0.4)), kept_distribution(keep))


def test_greedy_and_seed_reproducibility():
    assert (draw(SamplingParams(temperature=0.0)) == 0).all()
    a = draw(SamplingParams(temperature=1.0))
    assert torch.equal(a, draw(SamplingParams(temperature=1.0)))  # same seeds
    # A token's draw depends on how many tokens the request generated (its stream offset).
    b = draw(SamplingParams(temperature=1.0), num_output=1)
    assert not torch.equal(a, b)


def test_min_tokens_bans_eos_and_stop_ids():
    logits = LOGITS.clone()
    logits[7] = 10.0  # EOS would win every draw
    params = SamplingParams(temperature=1.0, min_tokens=2, stop_token_ids=[3])
    early = draw(params, logits, eos=[7], num_output=1)
    assert not ((early == 7) | (early == 3)).any()
    late = draw(params, logits, eos=[7], num_output=2)
    assert (late == 7).float().mean() > 0.99
    ignoring = draw(SamplingParams(temperature=0.0, min_tokens=2, ignore_eos=True), logits,
                    eos=[7], num_output=0)
    assert (ignoring == 7).all()  # ignore_eos: EOS is an ordinary token


def test_sampler_rows_use_their_own_parameters():
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, top_k=1),
              SamplingParams(temperature=1.0, min_p=1.0)]
    seqs = [Sequence(str(i), [1], p, seed=i, max_model_len=10) for i, p in enumerate(params)]
    logits = torch.stack([LOGITS, LOGITS.flip(0), LOGITS.roll(2)])
    tokens = Sampler([])(logits.clone(), seqs)
    assert tokens.tolist() == [0, 9, 2]
