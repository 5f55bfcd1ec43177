"""ModelRunner: owns the model and the paged KV cache; turns a scheduled batch into flat
tensors, runs the model and samples; decode-only batches replay a CUDA graph of the whole step
(cuda_graphs.py).

The batch metadata is built on the host from the sequences' block tables with numpy and copied
to the device without waiting for it; the sampled token ids coming back are the one host sync
of a step.
"""

from dataclasses import dataclass

import numpy as np
import torch

from ember.engine.block_manager import block_tables, slot_mapping
from ember.engine.config import EngineConfig
from ember.engine.cuda_graphs import DecodeGraphs
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


def prepare_inputs(batch: ScheduledBatch, block_size: int, device: torch.device) -> StepInputs:
    """The flat tensors of a scheduled batch (see AttentionMetadata)."""
    seqs, counts = batch.seqs, batch.num_new_tokens
    starts = [s.num_computed_tokens for s in seqs]
    input_ids = []
    for seq, start, n in zip(seqs, starts, counts, strict=True):
        input_ids += seq.token_ids[start:start + n]
    n_arr = np.asarray(counts, dtype=np.int64)
    first_row = np.concatenate([[0], np.cumsum(n_arr)[:-1]]).astype(np.int64)
    rows = np.repeat(np.arange(len(seqs)), n_arr)
    positions = (np.arange(int(n_arr.sum()), dtype=np.int64) - first_row[rows]
                 + np.asarray(starts, dtype=np.int64)[rows])
    tables = block_tables(seqs)

    def to_dev(array):
        return torch.from_numpy(np.ascontiguousarray(array)).to(device, non_blocking=True)

    nd = batch.num_decodes
    meta = AttentionMetadata(slot_mapping=to_dev(slot_mapping(tables, rows, positions,
                                                              block_size)),
                             num_decodes=nd)
    if nd:
        meta.decode_seqlens = to_dev(np.asarray(starts[:nd], dtype=np.int32) + 1)
        meta.decode_block_table = to_dev(tables[:nd])
    if nd < len(seqs):
        meta.chunks = [(int(first_row[i]), counts[i], starts[i] + counts[i])
                       for i in range(nd, len(seqs))]
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
    inputs = prepare_inputs(ScheduledBatch(seqs=seqs, num_new_tokens=counts), bs,
                            config.device)
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
        self.kv_caches = allocate_kv_cache(model, num_blocks, config.block_size, self.device)
        self.sampler = Sampler(eos_token_ids, config.kernel_backend)
        self.graphs = None
        if self.device.type == "cuda" and not config.enforce_eager:
            self.graphs = DecodeGraphs(
                model, self.kv_caches, self.sampler, max_num_seqs=config.max_num_seqs,
                max_blocks_per_seq=-(-max_model_len // config.block_size),
                block_size=config.block_size, device=self.device)

    @property
    def graph_batch_sizes(self) -> list:
        return sorted(self.graphs.graphs) if self.graphs else []

    @property
    def graph_capture_seconds(self) -> float:
        return self.graphs.capture_seconds if self.graphs else 0.0

    @staticmethod
    def _all_decodes(batch: ScheduledBatch) -> bool:
        """Every sequence computes exactly its last token (and so samples): a decode step.
        A one-token prompt chunk that is not the prompt's end does not count."""
        return batch.num_decodes == len(batch.seqs) and all(
            s.num_computed_tokens + 1 == len(s) for s in batch.seqs)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> tuple:
        """Run one step; returns ``(sampling sequences, their new token ids)``."""
        if self.graphs and self._all_decodes(batch) and self.graphs.size_for(len(batch.seqs)):
            return batch.seqs, self.graphs.run(batch.seqs)
        inputs = prepare_inputs(batch, self.block_size, self.device)
        hidden = self.model(inputs.input_ids, inputs.positions, inputs.meta, self.kv_caches)
        if not inputs.sampling_seqs:
            return [], []
        logits = self.model.compute_logits(hidden[inputs.logits_rows])
        tokens = self.sampler(logits, inputs.sampling_seqs)
        return inputs.sampling_seqs, tokens.tolist()
