"""The sampling references: the counter-based RNG, greedy rows, seeded batch invariance, the
filters (never a token outside the allowed set, and the right distribution over many seeds),
NaN/inf safety, and speculative acceptance keeping the target distribution.

Statistical checks use a chi-square test at p < 1e-6 over thousands of seeds: a correct
sampler fails one about once in a million runs, while the wrong distributions these tests
guard against are rejected with near certainty.
"""

import math

import pytest
import torch

from ember.ops import reference

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

P_VALUE = 1e-6
INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1


def random_seeds(n):
    return torch.randint(INT64_MIN, INT64_MAX, (n,), dtype=torch.int64)


def random_offsets(n):
    return torch.randint(0, 2 ** 40, (n,), dtype=torch.int64)


def chi_square_pvalue(tokens, probs):
    """p-value of the draws ``tokens`` (int64 [N]) against categorical ``probs`` ([V], float64),
    pooling categories with fewer than 5 expected draws into one bin. A draw of a
    zero-probability token gives 0."""
    n = tokens.numel()
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    if counts[probs == 0].sum() > 0:
        return 0.0
    expected = probs.double() * n
    small = (expected < 5) & (probs > 0)
    obs = torch.cat([counts[expected >= 5], counts[small].sum().reshape(1)])
    exp = torch.cat([expected[expected >= 5], expected[small].sum().reshape(1)])
    obs, exp = obs[exp > 0], exp[exp > 0]
    dof = obs.numel() - 1
    if dof == 0:  # a single category holds every draw
        return 1.0
    stat = ((obs - exp) ** 2 / exp).sum()
    return torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat / 2).item()


def sample_rows(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seeds=None,
                offsets=None):
    """reference.sample with per-row parameters broadcast from numbers."""
    b = logits.shape[0]

    def full(v, dtype):
        return v if isinstance(v, torch.Tensor) else torch.full((b,), v, dtype=dtype)

    return reference.sample(
        logits, full(temperature, torch.float32), full(top_k, torch.int32),
        full(top_p, torch.float32), full(min_p, torch.float32),
        random_seeds(b) if seeds is None else seeds,
        random_offsets(b) if offsets is None else offsets)


# ------------------------------------------------------------------------------------------------
# The random numbers
# ------------------------------------------------------------------------------------------------

if triton is not None:
    @triton.jit
    def _philox_kernel(seed_ptr, offset_ptr, out_ptr, stream, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        seed = tl.load(seed_ptr + row)
        offset = tl.load(offset_ptr + row)
        index = tl.arange(0, BLOCK).to(tl.uint32)
        zero = index * 0
        lo = (offset & 0xFFFFFFFF).to(tl.uint32) + zero
        hi = ((offset >> 32) & 0xFFFFFFFF).to(tl.uint32) + zero
        r0, r1, r2, r3 = tl.philox(seed, index, lo, hi, stream + zero)
        out = out_ptr + row * 4 * BLOCK + tl.arange(0, BLOCK)
        tl.store(out, r0.to(tl.int64))
        tl.store(out + BLOCK, r1.to(tl.int64))
        tl.store(out + 2 * BLOCK, r2.to(tl.int64))
        tl.store(out + 3 * BLOCK, r3.to(tl.int64))


@pytest.mark.skipif(triton is None, reason="needs triton")
def test_philox_matches_triton(device):
    """The torch Philox is bit-identical to Triton's tl.philox (an independent implementation),
    including negative seeds and offsets past 2^32."""
    seeds = torch.cat([random_seeds(5), torch.tensor([0, -1, INT64_MAX])]).to(device)
    offsets = torch.cat([random_offsets(5), torch.tensor([0, 2 ** 32 + 3, INT64_MAX])])
    offsets = offsets.to(device)
    stream = int(torch.randint(0, 3, ()))
    block = 64
    out = torch.zeros(8, 4, block, dtype=torch.int64, device=device)
    _philox_kernel[(8,)](seeds, offsets, out, stream, BLOCK=block)
    index = torch.arange(block, device=device)
    words = reference.philox4x32(seeds[:, None], index, offsets[:, None], offsets[:, None] >> 32,
                                 stream)
    assert torch.equal(torch.stack(words, dim=1), out)


def test_uniforms_are_uniform_and_independent():
    n = 50_000
    seed, offset = random_seeds(1), random_offsets(1)
    index = torch.arange(n)
    u = reference.philox_uniform(seed, offset, index, reference.SAMPLE_STREAM)
    assert u.dtype == torch.float32 and (u > 0).all() and (u < 1).all()
    # Kolmogorov-Smirnov distance to U(0, 1): P(D > 2.5 / sqrt(n)) ~ 4e-6.
    ecdf = torch.arange(1, n + 1, dtype=torch.float64) / n
    distance = (u.double().sort().values - ecdf).abs().max().item()
    assert distance < 2.5 / math.sqrt(n)
    # Neighbouring streams, offsets and seeds give uncorrelated numbers.
    others = [
        reference.philox_uniform(seed, offset, index, reference.ACCEPT_STREAM),
        reference.philox_uniform(seed, offset + 1, index, reference.SAMPLE_STREAM),
        reference.philox_uniform(seed + 1, offset, index, reference.SAMPLE_STREAM),
    ]
    for other in others:
        corr = torch.corrcoef(torch.stack([u, other]).double())[0, 1].abs().item()
        assert corr < 5 / math.sqrt(n)


# ------------------------------------------------------------------------------------------------
# sample
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_greedy_rows_are_argmax(dtype):
    logits = torch.randn(7, 1000).to(dtype)
    logits[2, 10] = logits[2, 700] = logits[2].max() + 1  # ties: the first index wins
    temperature = torch.tensor([0, 0.8, 0, 1.0, 0, 0, 1.5])
    out = sample_rows(logits, temperature, top_k=50, top_p=0.9)
    assert out.dtype == torch.int64
    greedy = temperature == 0
    assert torch.equal(out[greedy], logits.float().argmax(dim=-1)[greedy])
    assert out[2] == 10


def test_tiny_temperature_is_argmax():
    logits = torch.randn(50, 300)
    out = sample_rows(logits, temperature=1e-30)
    assert torch.equal(out, logits.argmax(dim=-1))


def mixed_batch(b, vocab):
    logits = torch.randn(b, vocab) * 3
    params = dict(
        temperature=torch.rand(b) * 1.5 * (torch.rand(b) > 0.2),
        top_k=torch.randint(-1, 40, (b,), dtype=torch.int32),
        top_p=torch.rand(b) * 0.5 + 0.5,
        min_p=torch.rand(b) * 0.1,
        seeds=random_seeds(b),
        offsets=random_offsets(b),
    )
    return logits, params


def test_seeded_reproducible_and_batch_invariant():
    logits, params = mixed_batch(9, 500)
    out = sample_rows(logits, **params)
    assert torch.equal(out, sample_rows(logits, **params))
    for i in range(9):
        alone = sample_rows(logits[i:i + 1], **{k: v[i:i + 1] for k, v in params.items()})
        assert alone.item() == out[i].item()
    perm = torch.randperm(9)
    permuted = sample_rows(logits[perm], **{k: v[perm] for k, v in params.items()})
    assert torch.equal(permuted, out[perm])


def test_seed_and_offset_change_the_draw():
    logits = torch.zeros(128, 200)
    by_offset = sample_rows(logits, seeds=random_seeds(1).expand(128),
                            offsets=torch.arange(128))
    by_seed = sample_rows(logits, seeds=random_seeds(128), offsets=random_offsets(1).expand(128))
    # 128 uniform draws from 200 tokens: about 95 distinct values expected (sd ~ 4).
    assert by_offset.unique().numel() > 70 and by_seed.unique().numel() > 70


def naive_allowed(logits, temperature, top_k, top_p, min_p):
    """Allowed tokens and their renormalised probabilities, from the documented rules."""
    z = [v / temperature for v in logits.double().tolist()]
    top = max(z)
    exps = [math.exp(v - top) for v in z]
    p = [e / sum(exps) for e in exps]
    vocab = len(p)
    k = vocab if top_k <= 0 or top_k >= vocab else top_k
    kth = sorted(p, reverse=True)[k - 1]
    in_k = [j for j in range(vocab) if p[j] >= kth]
    total = sum(p[j] for j in in_k)
    p_max = max(p)
    allowed = []
    for i in range(vocab):
        above = sum(p[j] for j in in_k if p[j] > p[i])
        keep_p = top_p >= 1 or above < top_p * total
        if (p[i] >= kth and keep_p and p[i] >= min_p * p_max) or p[i] == p_max:
            allowed.append(i)
    probs = torch.zeros(vocab, dtype=torch.float64)
    probs[allowed] = torch.tensor([p[i] for i in allowed], dtype=torch.float64)
    return allowed, probs / probs.sum()


FILTER_CASES = [  # temperature, top_k, top_p, min_p
    (1.0, 0, 1.0, 0.0),
    (0.7, 5, 1.0, 0.0),
    (1.3, -1, 0.6, 0.0),
    (1.0, 0, 1.0, 0.15),
    (0.8, 8, 0.85, 0.02),
    (2.0, 12, 0.9, 0.05),
]


def test_filters_keep_the_allowed_set_and_distribution():
    """All cases share one batch (per-row parameters), thousands of seeds per case."""
    vocab, draws = 24, 3000
    logits = torch.randn(vocab)
    rows = [case for case in FILTER_CASES for _ in range(draws)]
    temperature, top_k, top_p, min_p = (torch.tensor(col) for col in zip(*rows, strict=True))
    out = sample_rows(logits.expand(len(rows), vocab), temperature.float(), top_k.int(),
                      top_p.float(), min_p.float())
    for c, case in enumerate(FILTER_CASES):
        tokens = out[c * draws:(c + 1) * draws]
        allowed, probs = naive_allowed(logits, *case)
        if case[1] > 0:
            assert len(allowed) <= case[1]
        outside = set(tokens.tolist()) - set(allowed)
        assert not outside, f"case {case}: tokens {outside} are outside the allowed set {allowed}"
        assert chi_square_pvalue(tokens, probs) > P_VALUE, f"case {case}"


def test_nan_and_inf_logits():
    vocab, draws = 16, 2000
    base = torch.randn(vocab)
    nan_row = base.clone()
    nan_row[torch.randperm(vocab)[:5]] = float("nan")
    neginf_row = base.clone()
    neginf_row[torch.randperm(vocab)[:5]] = float("-inf")
    posinf_row = base.clone()
    posinf_row[[3, 11]] = float("inf")
    all_nan = torch.full((vocab,), float("nan"))
    all_neginf = torch.full((vocab,), float("-inf"))
    cases = [nan_row, neginf_row, posinf_row, all_nan, all_neginf]
    logits = torch.stack([row for row in cases for _ in range(draws)])
    out = sample_rows(logits)
    greedy = sample_rows(torch.stack(cases), temperature=0.0)
    assert ((out >= 0) & (out < vocab)).all()

    def draws_of(c):
        return out[c * draws:(c + 1) * draws]

    usable = torch.where(torch.isnan(nan_row), float("-inf"), nan_row)
    assert chi_square_pvalue(draws_of(0), torch.softmax(usable.double(), 0)) > P_VALUE
    assert greedy[0] == usable.argmax()
    assert chi_square_pvalue(draws_of(1), torch.softmax(neginf_row.double(), 0)) > P_VALUE
    assert greedy[1] == neginf_row.argmax()
    # +inf entries share all the mass; greedy takes the first.
    assert set(draws_of(2).tolist()) == {3, 11} and greedy[2] == 3
    # No usable logit: uniform, and token 0 when greedy.
    uniform = torch.full((vocab,), 1.0 / vocab, dtype=torch.float64)
    for c in (3, 4):
        assert chi_square_pvalue(draws_of(c), uniform) > P_VALUE
        assert greedy[c] == 0


# ------------------------------------------------------------------------------------------------
# speculative_accept
# ------------------------------------------------------------------------------------------------


def random_dists(*shape, sharpness=1.5):
    return torch.softmax(torch.randn(*shape) * sharpness, dim=-1)


def test_speculative_accept_keeps_the_target_distribution():
    """Drafts drawn from q (via sample, as an engine would) and verified against p: each
    emitted position follows p, and the first draft is accepted with prob sum min(p, q)."""
    n, k, vocab = 8000, 2, 6
    q = random_dists(k, vocab)
    p = random_dists(k + 1, vocab)
    seeds, offsets = random_seeds(n), random_offsets(n)
    drafts = torch.stack([
        sample_rows(q[j].log().expand(n, vocab), seeds=seeds, offsets=offsets + j)
        for j in range(k)], dim=1)
    out, accepted = reference.speculative_accept(drafts, q.expand(n, k, vocab),
                                                 p.expand(n, k + 1, vocab), seeds, offsets)
    assert chi_square_pvalue(out[:, 0], p[0].double()) > P_VALUE
    # Position 1 is emitted when draft 0 passed; that event is independent of position 1.
    second = out[accepted >= 1, 1]
    assert chi_square_pvalue(second, p[1].double()) > P_VALUE
    bonus = out[accepted == k, k]
    assert chi_square_pvalue(bonus, p[k].double()) > P_VALUE
    rate = torch.minimum(p[0], q[0]).sum().item()
    observed = (accepted >= 1).double().mean().item()
    assert abs(observed - rate) < 5 * math.sqrt(rate * (1 - rate) / n)


def naive_greedy_accept(drafts, target):
    outs, counts = [], []
    for row, dists in zip(drafts.tolist(), target, strict=True):
        best = dists.argmax(dim=-1).tolist()
        emitted = []
        for j, token in enumerate(row):
            if token != best[j]:
                break
            emitted.append(token)
        n = len(emitted)
        emitted.append(best[n])
        outs.append(emitted + [-1] * (len(row) + 1 - len(emitted)))
        counts.append(n)
    return torch.tensor(outs), torch.tensor(counts)


def greedy_case(b, k, vocab):
    target = random_dists(b, k + 1, vocab)
    drafts = target[:, :k].argmax(dim=-1)
    # Corrupt some drafts so that rows stop at different positions.
    wrong = torch.rand(b, k) < 0.3
    drafts = torch.where(wrong, (drafts + torch.randint(1, vocab, (b, k))) % vocab, drafts)
    return drafts, target


@pytest.mark.parametrize("b,k,vocab", [(1, 1, 5), (7, 4, 50), (33, 3, 17)])
def test_speculative_accept_greedy_matches_naive(b, k, vocab):
    drafts, target = greedy_case(b, k, vocab)
    out, accepted = reference.speculative_accept(drafts, None, target, random_seeds(b),
                                                 random_offsets(b))
    want_out, want_accepted = naive_greedy_accept(drafts, target)
    assert torch.equal(out, want_out) and torch.equal(accepted, want_accepted)
    assert out.dtype == accepted.dtype == torch.int64


def test_speculative_accept_one_hot_is_greedy():
    b, k, vocab = 12, 4, 30
    drafts, target = greedy_case(b, k, vocab)
    one_hot_target = torch.nn.functional.one_hot(target.argmax(-1), vocab).float()
    one_hot_draft = torch.nn.functional.one_hot(drafts, vocab).float()
    out, accepted = reference.speculative_accept(drafts, one_hot_draft, one_hot_target,
                                                 random_seeds(b), random_offsets(b))
    want_out, want_accepted = naive_greedy_accept(drafts, target)
    assert torch.equal(out, want_out) and torch.equal(accepted, want_accepted)


def test_speculative_accept_format_and_safety():
    b, k, vocab = 64, 3, 10
    q = random_dists(b, k, vocab)
    p = random_dists(b, k + 1, vocab)
    drafts = torch.randint(0, vocab, (b, k))
    drafts[0, 0], drafts[1, 1] = -3, vocab + 2  # out-of-range drafts are rejected
    p[2, 0, 4] = float("nan")  # NaN probability counts as 0: never emitted
    seeds, offsets = random_seeds(b), random_offsets(b)
    out, accepted = reference.speculative_accept(drafts, q, p, seeds, offsets)
    assert out.shape == (b, k + 1) and accepted.shape == (b,)
    assert accepted[0] == 0 and accepted[1] <= 1 and out[2, 0] != 4
    for row in range(b):
        n = accepted[row].item()
        assert torch.equal(out[row, :n], drafts[row, :n])
        assert 0 <= out[row, n] < vocab
        assert (out[row, n + 1:] == -1).all()
    again = reference.speculative_accept(drafts, q, p, seeds, offsets)
    assert torch.equal(again[0], out) and torch.equal(again[1], accepted)
    for row in (5, 17):
        alone = reference.speculative_accept(drafts[row:row + 1], q[row:row + 1],
                                             p[row:row + 1], seeds[row:row + 1],
                                             offsets[row:row + 1])
        assert torch.equal(alone[0][0], out[row]) and alone[1].item() == accepted[row]


def test_speculative_accept_zero_residual_falls_back_to_target():
    """p == q leaves no residual; a rejected zero-probability draft is replaced from p."""
    n, vocab = 3000, 5
    p = torch.tensor([0.1, 0.0, 0.2, 0.3, 0.4])
    dist = p.expand(n, 1, vocab)
    out, accepted = reference.speculative_accept(
        torch.ones(n, 1, dtype=torch.int64), dist, p.expand(n, 2, vocab), random_seeds(n),
        random_offsets(n))
    assert (accepted == 0).all()
    assert chi_square_pvalue(out[:, 0], p.double()) > P_VALUE
