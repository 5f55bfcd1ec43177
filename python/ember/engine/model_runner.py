"""ModelRunner: owns the model and the paged KV cache; turns a scheduled batch into flat
tensors, runs the model and samples; decode-only batches replay a CUDA graph of the whole step
(cuda_graphs.py; with enforce_eager, the same step's ops run one by one).

The batch metadata is built on the host from the sequences' block tables with numpy and copied
to the device without waiting for it. ``launch`` returns at once with a StepOutput; its sampled
token ids reach the host through a pinned buffer, and waiting for them is the one host sync of
a step, which the engine can defer past the launch of the next step (async scheduling).
"""

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

from ember import ops
from ember.engine.block_manager import block_tables, slot_mapping
from ember.engine.config import EngineConfig
from ember.engine.cuda_graphs import DecodeGraphs
from ember.engine.sampler import Sampler
from ember.engine.sampling_params import SamplingParams
from ember.engine.scheduler import ScheduledBatch
from ember.engine.sequence import Sequence
from ember.engine.speculative import is_chain, tree_attention_mask, tree_depths
from ember.models.attention import AttentionMetadata, KVCache
from ember.ops.attention import kernel_unsupported


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # int64 [num_tokens]
    positions: torch.Tensor  # int64 [num_tokens]
    meta: AttentionMetadata
    logits_rows: torch.Tensor  # int64 [num_samples]: rows whose next token is sampled
    sampling_seqs: list  # the sequences that sample, each once
    rows_per_seq: list  # samples of each sampling sequence: 1 + its draft tokens in the step
    sample_seqs: list  # the sequence of each sample
    sample_ahead: list | None  # per sample, its position after the sequence's last token


class StepOutput:
    """A launched step's samples: ``seqs`` (the sequences that sample, in row order), each with
    ``rows[i]`` samples (1, or 1 + its draft tokens with speculative decoding), as token ids
    int64 ``[sum(rows)]`` on the device (``device_tokens``) and, once the step has run, on the
    host (``token_ids()``, ``token_lists()``)."""

    def __init__(self, seqs: list, device_tokens: torch.Tensor | None,
                 host_tokens: torch.Tensor | None = None, ready: torch.cuda.Event | None = None,
                 rows: list | None = None):
        self.seqs = seqs
        self.device_tokens = device_tokens
        self.rows = [1] * len(seqs) if rows is None else rows
        self._host_tokens, self._ready = host_tokens, ready

    def token_ids(self) -> list:
        """The sampled ids as ints; waits for the step to finish."""
        if not self.seqs:
            return []
        if self._ready is None:  # a CPU step has already run
            return self.device_tokens.tolist()
        self._ready.synchronize()
        return self._host_tokens.tolist()

    def token_lists(self) -> list:
        """Per sequence, the list of its sampled ids; waits for the step to finish."""
        flat, lists, at = self.token_ids(), [], 0
        for n in self.rows:
            lists.append(flat[at:at + n])
            at += n
        return lists


def kv_cache_dtype(model, setting: str) -> torch.dtype:
    """The cache's element type for EngineConfig.kv_cache_dtype: the model's, or fp8 e4m3."""
    return model.embed_tokens.weight.dtype if setting == "auto" else torch.float8_e4m3fn


def kv_block_bytes(model, block_size: int, setting: str = "auto") -> int:
    """Bytes of one KV block over all layers (K and V), ``setting`` as kv_cache_dtype's."""
    c = model.config
    itemsize = kv_cache_dtype(model, setting).itemsize
    return 2 * c.num_layers * block_size * c.num_kv_heads * c.head_dim * itemsize


def allocate_kv_cache(model, num_blocks: int, block_size: int, device,
                      setting: str = "auto") -> list:
    """Per layer a KVCache: k and v ``[num_blocks, block_size, heads_kv, head_dim]`` of
    ``kv_cache_dtype(model, setting)``; an fp8 cache with scales of 1.0 (the values are stored
    as they are, saturated to +-448)."""
    c = model.config
    dtype = kv_cache_dtype(model, setting)
    shape = (num_blocks, block_size, c.num_kv_heads, c.head_dim)
    caches = []
    for _ in range(c.num_layers):
        k, v = (torch.empty(shape, dtype=dtype, device=device) for _ in range(2))
        scales = ((torch.ones(1, dtype=torch.float32, device=device) for _ in range(2))
                  if dtype == torch.float8_e4m3fn else (None, None))
        caches.append(KVCache(k, v, *scales))
    return caches


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on ``device``, copied without waiting for the device."""
    return torch.from_numpy(np.ascontiguousarray(array)).to(device, non_blocking=True)


def flat_layout(seqs: list, starts: list, counts: list, num_decodes: int, block_size: int,
                device: torch.device) -> tuple:
    """``(first_row, positions, meta)`` of a flat batch where ``seqs[i]`` computes ``counts[i]``
    tokens from position ``starts[i]`` (the first ``num_decodes`` one each): each sequence's
    first row, every row's position (numpy) and the AttentionMetadata (on ``device``)."""
    n_arr = np.asarray(counts, dtype=np.int64)
    first_row = np.concatenate([[0], np.cumsum(n_arr)[:-1]]).astype(np.int64)
    rows = np.repeat(np.arange(len(seqs)), n_arr)
    positions = (np.arange(int(n_arr.sum()), dtype=np.int64) - first_row[rows]
                 + np.asarray(starts, dtype=np.int64)[rows])
    tables = block_tables(seqs)
    nd = num_decodes
    meta = AttentionMetadata(
        slot_mapping=to_device(slot_mapping(tables, rows, positions, block_size), device),
        num_decodes=nd)
    if nd:
        meta.decode_cache_seqlens = to_device(np.asarray(starts[:nd], dtype=np.int32), device)
        meta.decode_block_table = to_device(tables[:nd], device)
        meta.decode_max_seqlen_k = max(starts[:nd]) + 1  # (else read back from the device)
    if nd < len(seqs):
        meta.chunks = [(int(first_row[i]), int(counts[i]), int(starts[i] + counts[i]))
                       for i in range(nd, len(seqs))]
        meta.chunk_block_table = to_device(tables[nd:], device)
    return first_row, positions, meta


def prepare_inputs(batch: ScheduledBatch, block_size: int, device: torch.device,
                   input_ids: torch.Tensor | None = None) -> StepInputs:
    """The flat tensors of a scheduled batch (see AttentionMetadata); ``input_ids`` (on the
    device) replaces the token ids of an all-decode batch (see ``ModelRunner.launch``)."""
    seqs, counts = batch.seqs, batch.num_new_tokens
    starts = [s.num_computed_tokens for s in seqs]
    if input_ids is None:
        ids = []
        for seq, start, n in zip(seqs, starts, counts, strict=True):
            known = seq.token_ids[start:start + n]
            ids += known if len(known) == n else known + seq.draft_token_ids[:n - len(known)]
    nd = batch.num_decodes
    first_row, positions, meta = flat_layout(seqs, starts, counts, nd, block_size, device)
    n_arr = np.asarray(counts, dtype=np.int64)
    # A sequence samples when this step computes its last known token, and at each of the
    # draft tokens it computes after it (speculative verification).
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    last = lengths - 1 - np.asarray(starts, dtype=np.int64)  # its row among the sequence's
    samples = np.clip(n_arr - last, 0, None)
    sampling = np.flatnonzero(samples)
    per_seq = samples[sampling]
    first_sample = np.cumsum(per_seq) - per_seq
    offset = np.arange(int(per_seq.sum())) - np.repeat(first_sample, per_seq)
    logits_rows = np.repeat(first_row[sampling] + last[sampling], per_seq) + offset
    # A chain of drafts sits at consecutive positions and samples consecutive output tokens.
    # A tree's nodes keep their rows' cache slots (slot_mapping above), but their rotary
    # positions and output tokens are their depths, and each sees only its ancestors.
    ahead = offset
    if batch.num_draft_tokens:
        positions, ahead = positions.copy(), offset.copy()
        meta.chunk_tree_masks = [None] * (len(seqs) - nd)
        for i in range(nd, len(seqs)):
            drafts = batch.drafts_of(i)
            parents = seqs[i].draft_parents[:drafts]
            if drafts == 0 or is_chain(parents):
                continue
            depth = np.asarray(tree_depths(parents), dtype=np.int64)
            draft_rows = first_row[i] + counts[i] - drafts + np.arange(drafts)
            positions[draft_rows] = lengths[i] - 1 + depth
            first = first_sample[np.searchsorted(sampling, i)]
            ahead[first + 1:first + 1 + drafts] = depth
            meta.chunk_tree_masks[i - nd] = to_device(tree_attention_mask(parents), device)
    if input_ids is None:
        input_ids = to_device(np.asarray(ids, dtype=np.int64), device)
    return StepInputs(
        input_ids=input_ids,
        positions=to_device(positions, device),
        meta=meta,
        logits_rows=to_device(logits_rows, device),
        sampling_seqs=[seqs[i] for i in sampling],
        rows_per_seq=per_seq.tolist(),
        sample_seqs=[seqs[i] for i in np.repeat(sampling, per_seq)],
        sample_ahead=ahead.tolist() if len(ahead) > len(sampling) else None)


def count_kv_blocks(config: EngineConfig, model, max_model_len: int,
                    extra_block_bytes: int = 0) -> int:
    """How many KV blocks fit: ``num_kv_blocks`` if given; on CPU ``kv_cache_memory_cpu``
    bytes; on a GPU what ``gpu_memory_utilization`` leaves after the weights (every model
    already loaded) and the peak activations of a full step, measured by running one.
    ``extra_block_bytes``: more bytes per block (a draft model's cache)."""
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks
    block_bytes = kv_block_bytes(model, config.block_size, config.kv_cache_dtype)
    block_bytes += extra_block_bytes
    if config.device.type == "cpu":
        return config.kv_cache_memory_cpu // block_bytes
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    _profile_step(config, model, max_model_len)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    activations = torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated()
    budget = total * config.gpu_memory_utilization - (total - free) - activations
    return max(int(budget) // block_bytes, 0)


def _profile_step(config: EngineConfig, model, max_model_len: int) -> None:
    """Run the largest step the scheduler can produce (max_num_batched_tokens prompt tokens in
    chunks of at most max_model_len, sampling max_num_seqs rows) on a throwaway cache."""
    bs = config.block_size
    seqs, counts, next_block = [], [], 0
    remaining = config.max_num_batched_tokens
    while remaining > 0:
        n = min(remaining, max_model_len)
        seq = Sequence(f"profile-{len(seqs)}", [0] * n, SamplingParams(), max_model_len=n + 1)
        seq.block_table = list(range(next_block, next_block + -(-n // bs)))
        next_block += len(seq.block_table)
        seqs.append(seq)
        counts.append(n)
        remaining -= n
    kv_caches = allocate_kv_cache(model, next_block, bs, config.device, config.kv_cache_dtype)
    inputs = prepare_inputs(ScheduledBatch(seqs=seqs, num_new_tokens=counts), bs,
                            config.device)
    with torch.inference_mode():
        hidden = model(inputs.input_ids, inputs.positions, inputs.meta, kv_caches)
        rows = min(config.max_num_seqs, hidden.shape[0])
        model.compute_logits(hidden[:rows])


def decode_op_on_reference(model, config: EngineConfig, device: torch.device) -> str | None:
    """The op of a decode step that would run its torch reference on ``device``, or None.

    A CUDA graph cannot capture those: they sync with the host (the KV-cache write of
    flash_attn_with_kvcache indexes with a mask, fused_moe finds each expert's tokens on the
    host). Attention runs on torch when asked to, or when the kernels do not take the model's
    dtype, head dim or block size (a tiny test model's head_dim of 16, say)."""
    backend = config.kernel_backend
    dtype = model.embed_tokens.weight.dtype
    if (ops.resolve_backend("flash_attn_with_kvcache", backend, device) == "torch"
            or kernel_unsupported(dtype, model.config.head_dim, config.block_size)):
        return "flash_attn_with_kvcache"
    if model.config.num_experts and ops.resolve_backend("fused_moe", backend, device) == "torch":
        return "fused_moe"
    return None


class ModelRunner:
    def __init__(self, config: EngineConfig, model, num_blocks: int, max_model_len: int,
                 eos_token_ids):
        self.config = config
        self.model = model
        self.device = config.device
        self.block_size = config.block_size
        # Decode-only steps run through DecodeGraphs where their ops can be captured, as
        # graphs or (enforce_eager) op by op on the same static inputs: the same launches.
        static_decodes = (self.device.type == "cuda"
                          and decode_op_on_reference(model, config, self.device) is None)
        # Then one more block past those the block manager hands out: the scratch block that
        # the padding rows of a decode step write their K/V into.
        self.kv_caches = allocate_kv_cache(model, num_blocks + 1 if static_decodes else num_blocks,
                                           config.block_size, self.device,
                                           config.kv_cache_dtype)
        self.sampler = Sampler(eos_token_ids, config.kernel_backend)
        self.graphs = None
        if static_decodes:
            self.graphs = DecodeGraphs(
                model, self.kv_caches, self.sampler, max_num_seqs=config.max_num_seqs,
                max_blocks_per_seq=-(-max_model_len // config.block_size),
                block_size=config.block_size, scratch_block=num_blocks, device=self.device,
                capture=not config.enforce_eager)
        if self.device.type == "cuda":
            # Pinned landing buffers of the sampled ids and their ready events, two used in
            # turn: at most two launched steps are unread at once (async scheduling). A
            # speculative step samples each sequence's drafts too.
            spec = config.speculative
            samples = config.max_num_seqs * (1 + (spec.num_speculative_tokens if spec else 0))
            self._host_tokens = [torch.empty(samples, dtype=torch.int64, pin_memory=True)
                                 for _ in range(2)]
            self._ready = [torch.cuda.Event() for _ in range(2)]
            self._turn = 0

    @property
    def graph_batch_sizes(self) -> list:
        return list(self.graphs.sizes) if self.graphs and self.graphs.captured else []

    @property
    def graph_capture_seconds(self) -> float:
        return self.graphs.capture_seconds if self.graphs else 0.0

    @staticmethod
    def _all_decodes(batch: ScheduledBatch) -> bool:
        """Every sequence computes exactly its last token (and so samples): a decode step.
        A one-token prompt chunk that is not the prompt's end does not count."""
        return batch.num_decodes == len(batch.seqs) and all(
            s.num_computed_tokens + 1 == len(s) for s in batch.seqs)

    def uses_graph(self, batch: ScheduledBatch) -> bool:
        """Whether ``batch`` runs as a decode step of DecodeGraphs (a captured CUDA graph,
        unless enforce_eager)."""
        return bool(self.graphs and self._all_decodes(batch)
                    and self.graphs.size_for(len(batch.seqs)))

    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch, input_ids: torch.Tensor | None = None) -> StepOutput:
        """Start one step on the device; returns without waiting for it.

        ``input_ids``: for an all-decode batch launched before the previous step's samples
        reached the host, those samples (int64 on the device, one per sequence, in order); the
        sequences' last token ids on the host are placeholders then.
        """
        if input_ids is not None and not self._all_decodes(batch):
            raise RuntimeError("input_ids from the device need an all-decode batch")
        # The block tables, lengths and slots come from the block manager: on a GPU the ops'
        # value checks would each sync with the device (on a CPU they cost nothing, and stay).
        checks = (ops.skip_value_checks() if self.device.type == "cuda"
                  else contextlib.nullcontext())
        with checks:
            if self.uses_graph(batch):
                return self._output(batch.seqs, self.graphs.run(batch.seqs, input_ids))
            inputs = prepare_inputs(batch, self.block_size, self.device, input_ids)
            hidden = self.model(inputs.input_ids, inputs.positions, inputs.meta, self.kv_caches)
            if not inputs.sampling_seqs:
                return StepOutput([], None)
            logits = self.model.compute_logits(hidden[inputs.logits_rows])
            tokens = self.sampler(logits, inputs.sample_seqs, inputs.sample_ahead)
            return self._output(inputs.sampling_seqs, tokens, inputs.rows_per_seq)

    def _output(self, seqs: list, device_tokens: torch.Tensor,
                rows: list | None = None) -> StepOutput:
        if self.device.type != "cuda":
            return StepOutput(seqs, device_tokens, rows=rows)
        turn, self._turn = self._turn, self._turn ^ 1
        host = self._host_tokens[turn][:len(device_tokens)]
        ops.multi_copy([host], [device_tokens])
        self._ready[turn].record()
        return StepOutput(seqs, device_tokens, host, self._ready[turn], rows)
