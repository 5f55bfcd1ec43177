"""sample on the Triton backend: the same token as the torch reference for the same seeds and
offsets, row by row.

The kernel reproduces the reference's Gumbel noise bit for bit, so wherever both keep the same
tokens the drawn token must be equal. Their filter probabilities are rounded differently, so
inputs with filters put every filter boundary far from rounding: logits on a 0.25 grid (equal
logits tie exactly; distinct ones differ in probability by a factor >= e^(0.25 / T)) and
top-p / min-p values chosen midway between the masses or probabilities of neighbouring
logit levels. Filters cut most of the mass of flat rows, so a kernel that ignored one would
draw outside the kept set and differ from the reference.

The Triton interpreter (CPU) is slow per program, so batches are small there; bf16 runs on
the GPU only (the interpreter's bf16 is unreliable).
"""

import math

import pytest
import torch
from helpers import backends_to_test

import ember
from ember.ops import _registry, reference

try:
    import triton
    import triton.language as tl

    from ember.triton_kernels.sampling import _philox_uniform
except ImportError:
    triton = None

BACKENDS = backends_to_test("sample", cpu_backends=("triton",), gpu_backends=("triton",))
INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1
GRID = 0.25  # logit spacing of grid_logits
P_VALUE = 1e-6


def with_dtypes(*dtypes):
    """BACKENDS crossed with dtypes, bf16 on the GPU only."""
    params = []
    for param in BACKENDS:
        backend, device = param.values
        for dtype in dtypes:
            if dtype == torch.bfloat16 and device == "cpu":
                continue
            params.append(pytest.param(backend, device, dtype, marks=param.marks,
                                       id=f"{param.id}-{str(dtype).removeprefix('torch.')}"))
    return params


def random_seeds(n):
    return torch.randint(INT64_MIN, INT64_MAX, (n,), dtype=torch.int64)


def random_offsets(n):
    return torch.randint(0, 2 ** 40, (n,), dtype=torch.int64)


def grid_logits(batch, vocab, spread=3.0):
    """float32 logits on a 0.25 grid in [-20, 20], exact in fp16 and bf16."""
    return ((torch.randn(batch, vocab) * spread / GRID).round().clamp(-80, 80) * GRID)


def row_params(batch, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seeds=None,
               offsets=None):
    """Per-row parameter tensors (CPU) from numbers, lists or tensors."""

    def column(v, dtype):
        return torch.as_tensor(v, dtype=dtype).expand(batch).clone()

    return dict(temperature=column(temperature, torch.float32),
                top_k=column(top_k, torch.int32), top_p=column(top_p, torch.float32),
                min_p=column(min_p, torch.float32),
                seeds=random_seeds(batch) if seeds is None else seeds,
                offsets=random_offsets(batch) if offsets is None else offsets)


def sample_both(backend, device, logits, params, checked=True):
    """(kernel tokens, reference tokens) on CPU for logits [B, V] and row_params(...).

    checked=False calls the backend's launcher directly, past ember.ops.sample's validation,
    for values only GPU tensors can carry (they have the reference's meaning)."""
    args = [logits.to(device)] + [params[name].to(device) for name in
                                  ("temperature", "top_k", "top_p", "min_p", "seeds", "offsets")]
    if checked:
        out = ember.ops.sample(*args, backend=backend)
    else:
        out = _registry.implementation("sample", backend)(*args)
    assert out.dtype == torch.int64 and out.shape == (logits.shape[0],)
    return out.cpu(), reference.sample(*args).cpu()


def logit_levels(row, temperature):
    """The distinct finite logits of a row, largest first, with each level's token count and
    unnormalised probability exp((level - max) / T), all float64."""
    values, counts = torch.unique(row.double(), sorted=True, return_counts=True)
    finite = torch.isfinite(values)
    values, counts = values[finite].flip(0), counts[finite].flip(0)
    return values, counts, torch.exp((values - values[0]) / temperature)


def clear_top_p(row, temperature, top_k, gen):
    """A top_p (< 1) that keeps whole logit levels of ``row``: midway between the masses above
    two neighbouring top-k-kept levels, the upper one holding at least half the mass of the
    heaviest level (so the margin dwarfs float rounding)."""
    _, counts, prob = logit_levels(row, temperature)
    if 0 < top_k < row.numel():
        counts_above = torch.cumsum(counts, 0)
        kept_levels = int((counts_above < top_k).sum()) + 1
        counts, prob = counts[:kept_levels], prob[:kept_levels]
    mass = counts * prob
    total = mass.sum()
    above = torch.cumsum(mass, 0) - mass
    choices = torch.nonzero(mass >= mass.max() / 2).flatten()
    level = choices[torch.randint(0, choices.numel(), (), generator=gen)]
    return ((above[level] + mass[level] / 2) / total).item()


def clear_min_p(row, temperature, gen, max_level=5):
    """A min_p between the probabilities of two neighbouring logit levels of ``row`` (ratio
    e^(0.125 / T) on each side), keeping one of the top ``max_level + 1`` levels."""
    values, _, _ = logit_levels(row, temperature)
    level = int(torch.randint(0, min(max_level, values.numel() - 1) + 1, (), generator=gen))
    return math.exp(-((values[0] - values[level]).item() + GRID / 2) / temperature)


MODES = ("greedy", "plain", "top_k", "top_p", "min_p", "all", "top_k_off")


def mixed_batch(rows_per_mode, vocab, modes=MODES):
    """Grid logits and parameters: ``rows_per_mode`` rows of each mode, filters clear of
    rounding. Temperatures 1..2 keep rows flat, so the filters cut much of the mass."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 31, ())))
    mode_of_row = [mode for mode in modes for _ in range(rows_per_mode)]
    batch = len(mode_of_row)
    logits = grid_logits(batch, vocab, spread=1.5)
    temperature = (1.0 + torch.rand(batch, generator=gen)).tolist()
    top_k, top_p, min_p = [0] * batch, [1.0] * batch, [0.0] * batch
    for i, mode in enumerate(mode_of_row):
        row, t = logits[i], temperature[i]
        if mode == "greedy":
            temperature[i] = 0.0
            top_k[i], top_p[i], min_p[i] = 5, 0.5, 0.1  # ignored by greedy rows
        if mode in ("top_k", "all") and vocab > 1:
            top_k[i] = int(torch.randint(1, min(vocab - 1, 20) + 1, (), generator=gen))
        if mode in ("top_p", "all"):
            top_p[i] = clear_top_p(row, t, top_k[i], gen)
        if mode in ("min_p", "all"):
            min_p[i] = clear_min_p(row, t, gen)
        if mode == "top_k_off":
            top_k[i] = [-1, 0, vocab, vocab + 3][i % 4]
    return logits, row_params(batch, temperature, top_k, top_p, min_p), mode_of_row


# ------------------------------------------------------------------------------------------------
# The random numbers
# ------------------------------------------------------------------------------------------------

if triton is not None:
    @triton.jit
    def _uniforms_kernel(seeds_ptr, offsets_ptr, out_ptr, stream, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        index = tl.arange(0, BLOCK)
        uniform = _philox_uniform(tl.load(seeds_ptr + row), index, tl.load(offsets_ptr + row),
                                  stream)
        tl.store(out_ptr + row * BLOCK + index, uniform)


@pytest.mark.skipif(triton is None, reason="needs triton")
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_philox_uniforms_match_reference(backend, device):
    """The kernel's uniforms are bit-identical to reference.philox_uniform, for negative and
    > 2^32 seeds, negative offsets and offsets past 2^32, and every stream."""
    seeds = torch.tensor([0, 1, -1, 2 ** 32, 2 ** 32 + 5, -(2 ** 40) + 3, INT64_MIN, INT64_MAX])
    offsets = torch.tensor([0, 2 ** 32 - 1, 2 ** 32, 2 ** 32 + 7, 2 ** 40 + 11, -1, INT64_MAX,
                            -(2 ** 40) - 9])
    seeds = torch.cat([seeds, random_seeds(4)])
    offsets = torch.cat([offsets, random_offsets(4)])
    block = 64
    for stream in (reference.SAMPLE_STREAM, reference.ACCEPT_STREAM, reference.RESAMPLE_STREAM):
        out = torch.empty(seeds.numel(), block, device=device)
        _uniforms_kernel[(seeds.numel(),)](seeds.to(device), offsets.to(device), out, stream,
                                           BLOCK=block)
        want = reference.philox_uniform(seeds[:, None], offsets[:, None], torch.arange(block),
                                        stream)
        assert torch.equal(out.cpu().view(torch.int32), want.view(torch.int32))


# ------------------------------------------------------------------------------------------------
# Greedy and unfiltered rows
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,device,dtype",
                         with_dtypes(torch.float32, torch.float16, torch.bfloat16))
@pytest.mark.parametrize("vocab", [1, 7, 1000, 5000, 20000])
@pytest.mark.parametrize("max_pass", ["auto", "one_program"])
def test_greedy_rows_match_reference(backend, device, dtype, vocab, max_pass, monkeypatch):
    """First index of the largest logit, ties across chunks included; filters are ignored.
    Rows longer than one max-pass chunk take the separate max pass at this batch ("auto") or
    the in-program one."""
    if max_pass == "one_program" and backend == "triton":
        from ember.triton_kernels import sampling
        monkeypatch.setattr(sampling, "max_pass_chunks", lambda *args: 1)
    batch = 5
    logits = torch.randn(batch, vocab)
    if vocab > 2:
        # Row 1: the maximum twice, the second in a later chunk but at a lower lane for
        # vocab > BLOCK_V; row 2: a NaN before the maximum.
        logits[1, [vocab // 3, vocab - 1]] = logits[1].max() + 1
        logits[2, 0] = float("nan")
    logits = logits.to(dtype)
    params = row_params(batch, 0.0, top_k=3, top_p=0.5, min_p=0.2)
    out, want = sample_both(backend, device, logits, params)
    assert torch.equal(out, want)
    assert torch.equal(out[1:2], logits[1:2].float().argmax(-1))


@pytest.mark.parametrize("backend,device,dtype",
                         with_dtypes(torch.float32, torch.float16, torch.bfloat16))
@pytest.mark.parametrize("vocab,batch", [(1, 2), (7, 12), (1000, 8), (49152, 2)])
def test_unfiltered_rows_match_reference(backend, device, dtype, vocab, batch):
    """Without filters every token is kept, so the kernel's token equals the reference's."""
    logits = (torch.randn(batch, vocab) * 3).to(dtype)
    params = row_params(batch, torch.rand(batch) * 1.8 + 0.2)
    out, want = sample_both(backend, device, logits, params)
    assert torch.equal(out, want)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_float64_and_strided_rows(backend, device):
    """fp64 logits (computed in float32, as by the reference) and rows further apart than V."""
    vocab, batch = 300, 6
    padded = torch.randn(batch, vocab + 37, dtype=torch.float64) * 2
    logits = padded[:, :vocab]
    params = row_params(batch, [0.0, 1.0, 0.5, 1.0, 2.0, 0.0])
    out, want = sample_both(backend, device, logits, params)
    assert torch.equal(out, want)


# ------------------------------------------------------------------------------------------------
# Filters
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,device,dtype",
                         with_dtypes(torch.float32, torch.float16, torch.bfloat16))
@pytest.mark.parametrize("vocab,rows_per_mode", [(1, 1), (7, 2), (1000, 3)])
def test_mixed_batch_matches_reference(backend, device, dtype, vocab, rows_per_mode):
    """Greedy, unfiltered, top-k, top-p, min-p, all three and top-k-off rows in one batch."""
    logits, params, modes = mixed_batch(rows_per_mode, vocab)
    out, want = sample_both(backend, device, logits.to(dtype), params)
    for i, mode in enumerate(modes):
        assert out[i] == want[i], f"row {i} ({mode}): kernel {out[i]}, reference {want[i]}"


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_mixed_batch_large_vocab(backend, device):
    """Llama-3's vocabulary: many chunks per row and many tokens tied at each logit level."""
    logits, params, modes = mixed_batch(1, 128256, modes=("plain", "top_k", "top_p", "all"))
    out, want = sample_both(backend, device, logits, params)
    for i, mode in enumerate(modes):
        assert out[i] == want[i], f"row {i} ({mode}): kernel {out[i]}, reference {want[i]}"


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_filters_keep_ties_at_the_threshold(backend, device):
    """top-k keeps every token tied with the k-th largest; top-p keeps a tied level whole."""
    temperature, batch = 3.0, 8
    levels = torch.tensor([3.0, 2.0, 1.0, 0.0])
    counts = torch.tensor([2, 5, 13, 20])
    base = levels.repeat_interleave(counts)
    logits = torch.stack([base[torch.randperm(base.numel())] for _ in range(batch)])
    # top_p between the shares of the top level and of the top two levels: the tokens of
    # level 2.0 have less than top_p of the mass above them, those of level 1.0 do not.
    mass = counts * torch.exp(levels.double() / temperature)
    share = (torch.cumsum(mass, 0) / mass.sum()).tolist()
    top_p = (share[0] + share[1]) / 2
    # k = 3 and 7 both fall in level 2.0 (7 tokens >= 2.0); k = 2 keeps level 3.0 only.
    top_k = [3, 7, 2, 3, 0, 0, 7, 2]
    params = row_params(batch, temperature, top_k=top_k,
                        top_p=[1.0, 1.0, 1.0, top_p, top_p, top_p, 1.0, 1.0])
    out, want = sample_both(backend, device, logits, params)
    assert torch.equal(out, want)
    drawn = logits[torch.arange(batch), out]
    assert (drawn >= 2.0).all() and (drawn[torch.tensor(top_k) == 2] == 3.0).all()


# ------------------------------------------------------------------------------------------------
# Edge cases
# ------------------------------------------------------------------------------------------------

def special_rows(vocab):
    """Rows with NaN, -inf, +inf entries, no usable logit, and a single usable logit."""
    base = grid_logits(1, vocab)[0]
    nan_row, neginf_row, posinf_row = base.clone(), base.clone(), base.clone()
    one_usable = torch.full((vocab,), float("nan"))
    nan_row[torch.randperm(vocab)[:vocab // 3]] = float("nan")
    neginf_row[torch.randperm(vocab)[:vocab // 3]] = float("-inf")
    posinf_row[[2, vocab - 3]] = float("inf")
    posinf_row[vocab // 2] = float("nan")
    one_usable[vocab - 2] = -4.0
    all_nan = torch.full((vocab,), float("nan"))
    all_neginf = torch.full((vocab,), float("-inf"))
    return torch.stack([nan_row, neginf_row, posinf_row, one_usable, all_nan, all_neginf])


@pytest.mark.parametrize("backend,device,dtype",
                         with_dtypes(torch.float32, torch.float16, torch.bfloat16))
@pytest.mark.parametrize("vocab", [17, 3000, 20000])
def test_nan_and_inf_rows_match_reference(backend, device, dtype, vocab):
    """NaN never drawn, +inf entries share the mass, no usable logit is uniform (greedy: 0);
    greedy, unfiltered and filtered."""
    rows = special_rows(vocab)
    kinds = len(rows)
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 31, ())))
    # top-p and min-p clear of rounding on the NaN row; the other rows tie or have one level.
    usable_nan_row = torch.where(torch.isnan(rows[0]), float("-inf"), rows[0])
    top_p = clear_top_p(usable_nan_row, 1.5, 0, gen)
    min_p = clear_min_p(usable_nan_row, 1.5, gen)
    settings = [  # temperature, top_k, top_p, min_p
        (0.0, 0, 1.0, 0.0),
        (1.0, 0, 1.0, 0.0),
        (1.5, 4, 1.0, 0.0),
        (1.5, 0, top_p, min_p),
    ]
    logits = rows.repeat(len(settings), 1)
    columns = [torch.tensor(col).repeat_interleave(kinds) for col in zip(*settings, strict=True)]
    params = row_params(len(logits), *columns)
    out, want = sample_both(backend, device, logits.to(dtype), params)
    assert torch.equal(out, want)
    drawn = logits[torch.arange(len(logits)), out].view(len(settings), kinds)
    assert not torch.isnan(drawn[:, :4]).any()  # rows with a usable logit never draw NaN
    assert (drawn[:, 2] == float("inf")).all()
    assert (out.view(len(settings), kinds)[:, 3] == vocab - 2).all()
    assert (out.view(len(settings), kinds)[0, 4:] == 0).all()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_unvalidated_parameter_values(backend, device):
    """Values only unchecked GPU tensors carry keep the reference's meaning: an infinite or NaN
    temperature, top_p <= 0 or NaN, min_p > 1, NaN or < 0, top_k below -1 or past int32."""
    vocab = 200
    settings = [  # temperature, top_k, top_p, min_p
        (float("inf"), 0, 1.0, 0.0),
        (float("inf"), 5, 1.0, 0.0),
        (float("nan"), 5, 0.5, 0.0),
        (-1.0, 0, 1.0, 0.0),
        (1e-30, 0, 1.0, 0.0),
        (1.0, 0, 0.0, 0.0),
        (1.0, 0, -0.5, 0.0),
        (1.0, 0, float("nan"), 0.0),
        (1.0, 0, 1.5, 0.0),
        (1.0, 0, 1.0, 1.5),
        (1.0, 0, 1.0, float("nan")),
        (1.0, 0, 1.0, -float("nan")),  # sign bit set: its bit pattern is a negative int
        (1.0, 0, 1.0, -0.5),
        (1.0, -7, 1.0, 0.0),
        (1.0, 2 ** 31 - 1, 1.0, 0.0),
    ]
    # Flat rows: a draw that ignored "only the most likely" would rarely hit the maximum.
    logits = grid_logits(len(settings), vocab, spread=0.5)
    columns = [torch.tensor(col) for col in zip(*settings, strict=True)]
    params = row_params(len(settings), *columns)
    out, want = sample_both(backend, device, logits, params, checked=False)
    assert torch.equal(out, want)
    argmax = logits.argmax(-1)
    # Greedy (NaN, negative or tiny temperature) and "only the most likely" rows.
    for i in (2, 3, 4, 5, 6, 7, 9, 10, 11):
        assert logits[i, out[i]] == logits[i, argmax[i]], f"setting {settings[i]}"


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_empty_batch(backend, device):
    params = row_params(0)
    out, want = sample_both(backend, device, torch.randn(0, 10), params)
    assert out.shape == want.shape == (0,)


# ------------------------------------------------------------------------------------------------
# Randomness
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,device", BACKENDS)
def test_seeded_reproducible_and_batch_invariant(backend, device):
    logits, params, _ = mixed_batch(1, 300)
    out, _ = sample_both(backend, device, logits, params)
    again, _ = sample_both(backend, device, logits, params)
    assert torch.equal(out, again)
    perm = torch.randperm(len(out))
    permuted, _ = sample_both(backend, device, logits[perm], {k: v[perm] for k, v in
                                                              params.items()})
    assert torch.equal(permuted, out[perm])
    # The offset moves the stream: one flat row drawn at 48 offsets gives many tokens.
    flat = torch.zeros(48, 100)
    seeds = random_seeds(1).expand(48).clone()
    by_offset, _ = sample_both(backend, device, flat,
                               row_params(48, seeds=seeds, offsets=torch.arange(48) + 2 ** 32))
    assert by_offset.unique().numel() > 25  # about 38.5 expected


def slow_on_cpu(params):
    """``params`` with the CPU ones marked slow (about 30 ms per row under the interpreter)."""
    return [pytest.param(*p.values, id=p.id,
                         marks=[*p.marks, pytest.mark.slow] if "cpu" in p.values else p.marks)
            for p in params]


@pytest.mark.parametrize("backend,device", slow_on_cpu(BACKENDS))
def test_top_p_draws_follow_the_kept_distribution(backend, device):
    """4000 draws from 5 tokens with top-p cutting the least likely: it never appears, and
    the others follow the renormalised distribution (chi-square, p > 1e-6)."""
    draws = 4000
    probs = torch.tensor([0.15, 0.4, 0.05, 0.3, 0.1], dtype=torch.float64)
    # Mass above the 0.05 token is 0.95 >= top_p; above the 0.1 token, 0.85 < top_p.
    logits = probs.log().float().expand(draws, -1)
    out, want = sample_both(backend, device, logits, row_params(draws, top_p=0.9))
    assert torch.equal(out, want)
    counts = torch.bincount(out, minlength=5).double()
    assert counts[2] == 0
    kept = torch.tensor([0, 1, 3, 4])
    expected = probs[kept] / probs[kept].sum() * draws
    statistic = ((counts[kept] - expected) ** 2 / expected).sum()
    dof = torch.tensor((len(kept) - 1) / 2, dtype=torch.float64)
    assert torch.special.gammaincc(dof, statistic / 2).item() > P_VALUE


@pytest.mark.cuda
def test_one_compile_for_parameter_rows_of_any_alignment(monkeypatch):
    """The engine's eager steps pass the per-row parameters as row views of packed ``[3,
    batch]`` tensors, whose 16-byte alignment changes with the batch. The kernel must not be
    compiled again for each new combination of alignments: each compile took ~2 s inside a
    timed throughput run (H100)."""
    if triton is None:
        pytest.skip("triton is not installed")
    from triton.runtime.jit import JITFunction

    from ember.triton_kernels import sampling

    if not hasattr(JITFunction, "_do_compile"):
        pytest.skip("this Triton version has no JITFunction._do_compile to count compiles")
    compiles = []
    original = JITFunction._do_compile

    def counting(self, *args, **kwargs):
        if self is sampling._sample_kernel:
            compiles.append(args[0])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(JITFunction, "_do_compile", counting)
    batch, vocab = 4, 1000
    logits = torch.randn(batch, vocab, device="cuda")
    floats = torch.rand(3, batch + 4, device="cuda") * 0.5 + 0.5  # temperature, top_p, min_p
    ints = torch.randint(1, 50, (3, batch + 4), device="cuda")    # top_k, seed, offset
    tokens = []
    for shift in range(4):  # 4-byte shifts of float32 rows, 8-byte shifts of int64 rows
        f, i = floats[:, shift:shift + batch], ints[:, shift:shift + batch]
        tokens.append(ember.ops.sample(logits, f[0], i[0], f[1], f[2] * 0.0, i[1], i[2],
                                       backend="triton"))
    torch.cuda.synchronize()
    assert all(t.shape == (batch,) and 0 <= int(t.min()) and int(t.max()) < vocab for t in tokens)
    assert len(compiles) <= 1, f"the sampling kernel was compiled {len(compiles)} times"
