"""ModelRunner: owns the model and the paged KV cache; turns a scheduled batch into flat
tensors, runs the model (replaying a CUDA graph for decode-only batches) and samples.

The batch metadata is built on the host from the sequences' block tables with numpy and copied
to the device without waiting for it; the sampled token ids coming back are the one host sync
of a step.
"""

import time
from dataclasses import dataclass

import numpy as np
import torch

from ember.engine.config import EngineConfig
from ember.engine.sampler import Sampler
from ember.engine.sampling_params import SamplingParams
from ember.engine.scheduler import ScheduledBatch
from ember.engine.sequence import Sequence
from ember.models.attention import AttentionMetadata


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # int64 [num_tokens]
    positions: torch.Tensor  # int64 [num_tokens]
    meta: AttentionMetadata
    logits_rows: torch.Tensor  # int64 [num_sampling]: rows whose next token is sampled
    sampling_seqs: list


def kv_block_bytes(model, block_size: int) -> int:
    """Bytes of one KV block over all layers (K and V)."""
    c = model.config
    itemsize = model.embed_tokens.weight.dtype.itemsize
    return 2 * c.num_layers * block_size * c.num_kv_heads * c.head_dim * itemsize


def allocate_kv_cache(model, num_blocks: int, block_size: int, device) -> list:
    """Per layer ``(k_cache, v_cache)``, each ``[num_blocks, block_size, heads_kv, head_dim]``."""
    c = model.config
    dtype = model.embed_tokens.weight.dtype
    shape = (num_blocks, block_size, c.num_kv_heads, c.head_dim)
    return [(torch.empty(shape, dtype=dtype, device=device),
             torch.empty(shape, dtype=dtype, device=device)) for _ in range(c.num_layers)]


def prepare_inputs(batch: ScheduledBatch, device: torch.device) -> StepInputs:
    """The flat tensors of a scheduled batch (see AttentionMetadata)."""
    seqs, counts = batch.seqs, batch.num_new_tokens
    starts = [s.num_computed_tokens for s in seqs]
    input_ids = []
    for seq, start, n in zip(seqs, starts, counts, strict=True):
        input_ids += seq.token_ids[start:start + n]
    n_arr = np.asarray(counts, dtype=np.int64)
    first_row = np.concatenate([[0], np.cumsum(n_arr)[:-1]]).astype(np.int64)
    positions = (np.arange(int(n_arr.sum()), dtype=np.int64) - np.repeat(first_row, n_arr)
                 + np.repeat(np.asarray(starts, dtype=np.int64), n_arr))
    width = max(len(s.block_table) for s in seqs)
    tables = np.zeros((len(seqs), width), dtype=np.int32)
    for i, seq in enumerate(seqs):
        tables[i, :len(seq.block_table)] = seq.block_table

    def to_dev(array):
        return torch.from_numpy(np.ascontiguousarray(array)).to(device, non_blocking=True)

    nd = batch.num_decodes
    meta = AttentionMetadata(num_decodes=nd)
    if nd:
        meta.decode_cached = to_dev(np.asarray(starts[:nd], dtype=np.int32))
        meta.decode_block_table = to_dev(tables[:nd])
    if nd < len(seqs):
        meta.chunks = [(int(first_row[i]), counts[i], starts[i]) for i in range(nd, len(seqs))]
        meta.chunk_block_table = to_dev(tables[nd:])

    # A sequence samples when this step computes its last known token.
    sampling = [i for i, (s, start, n) in enumerate(zip(seqs, starts, counts, strict=True))
                if start + n == len(s)]
    return StepInputs(
        input_ids=to_dev(np.asarray(input_ids, dtype=np.int64)),
        positions=to_dev(positions),
        meta=meta,
        logits_rows=to_dev((first_row + n_arr - 1)[sampling]),
        sampling_seqs=[seqs[i] for i in sampling])


def count_kv_blocks(config: EngineConfig, model, max_model_len: int) -> int:
    """How many KV blocks fit: ``num_kv_blocks`` if given; on CPU ``kv_cache_memory_cpu``
    bytes; on a GPU what ``gpu_memory_utilization`` leaves after the weights and the peak
    activations of a full step, measured by running one."""
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks
    block_bytes = kv_block_bytes(model, config.block_size)
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
    kv_caches = allocate_kv_cache(model, next_block, bs, config.device)
    inputs = prepare_inputs(ScheduledBatch(seqs=seqs, num_new_tokens=counts), config.device)
    with torch.inference_mode():
        hidden = model(inputs.input_ids, inputs.positions, inputs.meta, kv_caches)
        rows = min(config.max_num_seqs, hidden.shape[0])
        model.compute_logits(hidden[:rows])


class ModelRunner:
    def __init__(self, config: EngineConfig, model, num_blocks: int, max_model_len: int,
                 eos_token_ids):
        self.config = config
        self.model = model
        self.device = config.device
        self.block_size = config.block_size
        self.max_blocks_per_seq = -(-max_model_len // config.block_size)
        self.num_blocks = num_blocks
        # One extra block past the managed ones: padded rows of CUDA graph batches write there.
        self.scratch_block = num_blocks
        self.kv_caches = allocate_kv_cache(model, num_blocks + 1, config.block_size, self.device)
        self.sampler = Sampler(eos_token_ids, config.kernel_backend)
        self.graphs: dict = {}
        self.graph_capture_seconds = 0.0
        if self.device.type == "cuda" and not config.enforce_eager:
            self._capture_decode_graphs()

    # ------------------------------------------------------------------------------------------
    # Running a step
    # ------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> tuple:
        """Run one step; returns ``(sampling sequences, their new token ids)``."""
        inputs = prepare_inputs(batch, self.device)
        num_tokens = inputs.input_ids.shape[0]
        if batch.num_decodes == len(batch.seqs) and self._graph_size(num_tokens) is not None:
            hidden = self._replay_graph(inputs)
        else:
            hidden = self.model(inputs.input_ids, inputs.positions, inputs.meta, self.kv_caches)
        if not inputs.sampling_seqs:
            return [], []
        logits = self.model.compute_logits(hidden[inputs.logits_rows])
        tokens = self.sampler(logits, inputs.sampling_seqs)
        return inputs.sampling_seqs, tokens.tolist()

    # ------------------------------------------------------------------------------------------
    # CUDA graphs for decode-only batches
    # ------------------------------------------------------------------------------------------

    def _graph_batch_sizes(self) -> list:
        largest = min(self.config.max_num_seqs, 512)
        sizes = [b for b in (1, 2, 4, 8) if b < largest] + list(range(16, largest, 16))
        return sizes + [largest]

    def _graph_size(self, batch_size: int) -> int | None:
        """The smallest captured batch size that fits ``batch_size`` decodes, if any."""
        for size in self.graphs:
            if size >= batch_size:
                return size
        return None

    def _capture_decode_graphs(self) -> None:
        start = time.perf_counter()
        sizes = self._graph_batch_sizes()
        largest = sizes[-1]
        dev = self.device
        self.graph_inputs = {
            "input_ids": torch.zeros(largest, dtype=torch.int64, device=dev),
            "positions": torch.zeros(largest, dtype=torch.int64, device=dev),
            "cached": torch.zeros(largest, dtype=torch.int32, device=dev),
            "block_table": torch.full((largest, self.max_blocks_per_seq), self.scratch_block,
                                      dtype=torch.int32, device=dev),
        }
        pool = None
        for size in reversed(sizes):  # largest first, so smaller graphs reuse its memory pool
            g = self.graph_inputs
            meta = AttentionMetadata(num_decodes=size, decode_cached=g["cached"][:size],
                                     decode_block_table=g["block_table"][:size])
            args = (g["input_ids"][:size], g["positions"][:size], meta, self.kv_caches)
            with torch.inference_mode():
                self.model(*args)  # warm-up outside capture: lazy initialisation, autotuning
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                try:
                    with torch.cuda.graph(graph, pool=pool):
                        out = self.model(*args)
                except RuntimeError as e:
                    raise RuntimeError(
                        f"capturing the decode CUDA graph (batch {size}) failed: {e}; an op "
                        f"synchronises with the host inside the model. Pass enforce_eager=True "
                        f"to run without CUDA graphs.") from e
            pool = graph.pool()
            self.graphs[size] = (graph, out)
        self.graphs = dict(sorted(self.graphs.items()))
        torch.cuda.synchronize()
        self.graph_capture_seconds = time.perf_counter() - start

    def _replay_graph(self, inputs: StepInputs) -> torch.Tensor:
        n = inputs.input_ids.shape[0]
        size = self._graph_size(n)
        g = self.graph_inputs
        meta = inputs.meta
        g["input_ids"][:n] = inputs.input_ids
        g["positions"][:n] = inputs.positions
        g["cached"][:n] = meta.decode_cached
        g["block_table"][:n, :meta.decode_block_table.shape[1]] = meta.decode_block_table
        # Padding rows: no cached tokens; their one new token lands in the scratch block.
        g["cached"][n:size] = 0
        g["block_table"][n:size, 0] = self.scratch_block
        graph, out = self.graphs[size]
        graph.replay()
        return out[:n]
