"""Token sampling: ``sample`` (temperature / top-k / top-p / min-p, greedy rows, seeded) and
``speculative_accept`` (rejection sampling of draft tokens).

Both are free of host synchronisation: randomness is a counter-based function of each row's
``(seed, offset)`` (Philox4x32-10, see ``reference.philox_uniform``), so a row's token does not
depend on the rest of the batch, and no value is read back to the host for GPU tensors.
Parameter values are checked (ValueError) where that costs nothing: Python numbers always,
tensors on the CPU. Per-row tensors on a GPU are not inspected; every value still has the
defined meaning the reference gives it (e.g. temperature <= 0 is greedy, top_k <= 0 is off).
"""

import torch

from ember.ops import _registry, reference
from ember.ops._validation import FLOAT_DTYPES, check_tensor

INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1

# name -> (kind, float dtype the kernels read, value when the argument is None, allowed range).
_ROW_PARAMS = {
    "temperature": ("float", torch.float32, None, "finite and >= 0"),
    "top_k": ("int", None, 0, ">= -1 (0 or -1: off; >= vocab: off)"),
    "top_p": ("float", torch.float32, 1.0, "in (0, 1]"),
    "min_p": ("float", torch.float32, 0.0, "in [0, 1]"),
}


def _bad_values(name: str, v: torch.Tensor) -> torch.Tensor:
    """Elementwise: where the value of parameter ``name`` is outside its range."""
    if name == "temperature":
        return ~(torch.isfinite(v) & (v >= 0))
    if name == "top_k":
        return v < -1
    if name == "top_p":
        return ~((v > 0) & (v <= 1))
    return ~((v >= 0) & (v <= 1))


def _row_param(op, name, value, batch, device):
    """A ``[batch]`` tensor of parameter ``name`` from a number, a tensor or None."""
    kind, dtype, default, allowed = _ROW_PARAMS[name]
    if value is None:
        value = default
    if isinstance(value, torch.Tensor):
        allowed_dtypes = (torch.int32, torch.int64) if kind == "int" else (torch.float32,)
        check_tensor(op, name, value, dtypes=allowed_dtypes, shape=(batch,), device=device)
        host = value if value.device.type == "cpu" else None
    else:
        number_types = (int,) if kind == "int" else (int, float)
        if isinstance(value, bool) or not isinstance(value, number_types):
            raise TypeError(f"{op}: {name} must be a{'n int' if kind == 'int' else ' number'} or "
                            f"a [batch] tensor, got {type(value).__name__}")
        if kind == "int" and not INT64_MIN <= value <= INT64_MAX:
            raise ValueError(f"{op}: {name} must fit in int64, got {value}")
        wide = torch.int64 if kind == "int" else torch.float64
        host = torch.tensor([value], dtype=wide)
        value = torch.full((batch,), value, dtype=wide, device=device)
    if host is not None and bool(_bad_values(name, host).any()):
        bad = host[_bad_values(name, host)][0].item()
        raise ValueError(f"{op}: {name} must be {allowed}, got {bad}")
    if kind == "int":
        # The kernels read int32 or int64 counts as they come: a count tensor passes through
        # untouched (no extra kernels in a decode step). A number became int64 above, where
        # every value past int32 already means "off" (>= vocab).
        return value
    return value.to(dtype)


def _rng_rows(op, seeds, offsets, batch, device):
    """int64 ``[batch]`` seeds (random when None) and offsets (0 when None)."""
    if seeds is None:
        seeds = torch.randint(INT64_MIN, INT64_MAX, (batch,), dtype=torch.int64, device=device)
    if offsets is None:
        offsets = torch.zeros(batch, dtype=torch.int64, device=device)
    check_tensor(op, "seeds", seeds, dtypes=(torch.int64,), shape=(batch,), device=device)
    check_tensor(op, "offsets", offsets, dtypes=(torch.int64,), shape=(batch,), device=device)
    return seeds, offsets


def sample(logits, temperature, top_k=None, top_p=None, min_p=None, seeds=None, offsets=None,
           *, backend="auto"):
    """Draw one token per row of ``logits``, with per-row sampling parameters.

    Args:
        logits: ``[B, V]`` fp16/bf16/fp32/fp64, contiguous last dim.
        temperature: a number or float32 ``[B]``; ``0`` makes the row greedy (argmax, the
            first index on ties).
        top_k: None, an int or int32/int64 ``[B]``: keep the k most likely tokens (ties at the
            k-th probability stay); 0 or -1 (and >= V) turn it off.
        top_p: None, a number or float32 ``[B]`` in (0, 1]: keep the most likely tokens whose
            mass above them is below top_p (of the top-k-kept mass); 1 turns it off.
        min_p: None, a number or float32 ``[B]`` in [0, 1]: keep tokens with probability at
            least ``min_p`` times the largest; 0 turns it off.
        seeds: int64 ``[B]`` (random when None): the request's seed.
        offsets: int64 ``[B]`` (zeros when None): the request's random-stream position, e.g.
            the number of tokens it has generated so far.
        backend: "auto" or a backend name.

    Filters apply to ``softmax(logits / temperature)`` and the token is drawn from the kept
    tokens, renormalised, by Gumbel-max with noise that depends only on (seed, offset, token
    index): the same row with the same seed and offset gives the same token in any batch.
    NaN logits are never drawn; if a row has +inf logits, the draw is among those; a row with
    no usable logit (all NaN/-inf) is uniform (token 0 when greedy).

    Returns int64 ``[B]`` token ids in ``[0, V)``. Exact semantics: ``reference.sample``.
    """
    op = "sample"
    check_tensor(op, "logits", logits, dtypes=FLOAT_DTYPES + (torch.float64,), ndim=2,
                 last_dim_contiguous=True)
    batch, vocab = logits.shape
    if vocab == 0:
        raise ValueError(f"{op}: logits must have at least one column (vocab), got shape "
                         f"{tuple(logits.shape)}")
    dev = logits.device
    params = [_row_param(op, name, value, batch, dev) for name, value in
              (("temperature", temperature), ("top_k", top_k), ("top_p", top_p),
               ("min_p", min_p))]
    seeds, offsets = _rng_rows(op, seeds, offsets, batch, dev)
    chosen = _registry.resolve(op, backend, dev)
    return torch.ops.ember.sample(logits, *params, seeds, offsets, chosen)


@torch.library.custom_op("ember::sample", mutates_args=())
def _sample_op(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
               top_p: torch.Tensor, min_p: torch.Tensor, seeds: torch.Tensor,
               offsets: torch.Tensor, backend: str) -> torch.Tensor:
    return _registry.implementation("sample", backend)(
        logits, temperature, top_k, top_p, min_p, seeds, offsets)


@_sample_op.register_fake
def _(logits, temperature, top_k, top_p, min_p, seeds, offsets, backend):
    return logits.new_empty(logits.shape[0], dtype=torch.int64)


def speculative_accept(draft_token_ids, draft_probs, target_probs, seeds=None, offsets=None, *,
                       backend="auto"):
    """Verify k draft tokens per row by rejection sampling; the output follows the target model.

    Args:
        draft_token_ids: int32/int64 ``[B, k]``, each in ``[0, V)`` (checked on CPU; on a GPU
            an out-of-range draft is rejected).
        draft_probs: float32 ``[B, k, V]``, the draft model's distributions the drafts were
            sampled from, or None for greedy verification.
        target_probs: float32 ``[B, k + 1, V]``, the target model's distributions at the k
            draft positions and the one after them. Rows must sum to 1 (NaN and negative
            entries count as 0; a row with no positive entry is read as uniform).
        seeds, offsets: int64 ``[B]`` as in :func:`sample` (random / zero when None);
            position j uses stream offset ``offsets + j``, so the next step should start at
            ``offsets + num_accepted + 1``.
        backend: "auto" or a backend name.

    Draft j is accepted with probability ``min(1, p_j(t_j) / q_j(t_j))`` while all earlier
    drafts were; at the first rejection a token is drawn from ``normalize(max(0, p_j - q_j))``;
    if all k pass, a bonus token is drawn from ``p_k`` (Leviathan et al. 2023, Chen et al.
    2023). Greedy (draft_probs None): accept while ``t_j == argmax(p_j)``, then emit
    ``argmax(p_j)``. Batches mixing greedy and sampled rows can pass one-hot p and q for the
    greedy rows, which verifies them exactly greedily.

    Returns ``(output_tokens int64 [B, k + 1], num_accepted int64 [B])``: the accepted drafts,
    the replacement or bonus token, then -1. Exact semantics: ``reference.speculative_accept``.
    """
    op = "speculative_accept"
    check_tensor(op, "draft_token_ids", draft_token_ids, dtypes=(torch.int32, torch.int64),
                 ndim=2)
    batch, k = draft_token_ids.shape
    dev = draft_token_ids.device
    check_tensor(op, "target_probs", target_probs, dtypes=(torch.float32,), ndim=3, device=dev,
                 last_dim_contiguous=True)
    check_tensor(op, "target_probs", target_probs, shape=(batch, k + 1, None))
    vocab = target_probs.shape[2]
    if vocab == 0:
        raise ValueError(f"{op}: target_probs must have a nonempty vocab dim, got shape "
                         f"{tuple(target_probs.shape)}")
    if draft_probs is not None:
        check_tensor(op, "draft_probs", draft_probs, dtypes=(torch.float32,),
                     shape=(batch, k, vocab), device=dev, last_dim_contiguous=True)
    if dev.type == "cpu" and draft_token_ids.numel():
        lo, hi = torch.aminmax(draft_token_ids)
        if int(lo) < 0 or int(hi) >= vocab:
            raise ValueError(f"{op}: draft_token_ids must be in [0, {vocab}) (the vocab of "
                             f"target_probs), got range [{int(lo)}, {int(hi)}]")
    seeds, offsets = _rng_rows(op, seeds, offsets, batch, dev)
    chosen = _registry.resolve(op, backend, dev)
    return torch.ops.ember.speculative_accept(draft_token_ids.long(), draft_probs, target_probs,
                                              seeds, offsets, chosen)


@torch.library.custom_op("ember::speculative_accept", mutates_args=())
def _speculative_accept_op(draft_token_ids: torch.Tensor, draft_probs: torch.Tensor | None,
                           target_probs: torch.Tensor, seeds: torch.Tensor,
                           offsets: torch.Tensor, backend: str) -> tuple[torch.Tensor,
                                                                         torch.Tensor]:
    return _registry.implementation("speculative_accept", backend)(
        draft_token_ids, draft_probs, target_probs, seeds, offsets)


@_speculative_accept_op.register_fake
def _(draft_token_ids, draft_probs, target_probs, seeds, offsets, backend):
    batch, k = draft_token_ids.shape
    return (draft_token_ids.new_empty(batch, k + 1, dtype=torch.int64),
            draft_token_ids.new_empty(batch, dtype=torch.int64))


_registry.register("sample", torch=reference.sample)
_registry.register("speculative_accept", torch=reference.speculative_accept)
_registry.register("sample", triton="ember.triton_kernels.sampling:sample")
