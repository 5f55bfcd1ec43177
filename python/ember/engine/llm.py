"""LLM: the engine's front door, in vLLM's shape.

A request's path: ``add_request`` tokenizes the prompt into a Sequence and queues it in the
Scheduler; each ``step`` asks the Scheduler for a batch (which asks the BlockManager for KV
blocks), has the ModelRunner compute it (model -> ``ember.ops`` kernels) and sample, then
appends the new tokens, detokenizes them and checks the stop conditions. ``generate`` and
``stream`` loop over ``step`` until their requests finish. With async scheduling, a step of
decodes that needs nothing from the host is launched before the previous step's tokens are
read, so the host's work hides behind the GPU's. With speculative decoding, each decoding
sequence proposes draft tokens before the step (speculative.py), the step verifies them, and
the accepted ones are appended with the token sampled after them.
"""

import random
import time
from collections.abc import Iterator

import torch
from tqdm.auto import tqdm

from ember.engine.block_manager import BlockManager
from ember.engine.config import EngineConfig
from ember.engine.detokenizer import IncrementalDetokenizer, find_stop_string
from ember.engine.draft_model import DraftModelProposer
from ember.engine.model_runner import (
    ModelRunner,
    allocate_kv_cache,
    count_kv_blocks,
    kv_block_bytes,
)
from ember.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from ember.engine.sampling_params import SamplingParams
from ember.engine.scheduler import Scheduler
from ember.engine.sequence import Sequence
from ember.engine.speculative import NgramProposer, accepted_path
from ember.models.loader import Checkpoint, load_model

# The token id of a sequence's last position while the step that samples it is still running
# (async scheduling); never a real id.
PENDING_TOKEN = -1


class LLM:
    """Load a model and generate from it.

    ``model`` is a Hugging Face folder, a ``.gguf`` file or a built-in alias
    ("smollm2-135m"); the keyword arguments are EngineConfig's (dtype, device, max_num_seqs,
    max_num_batched_tokens, max_model_len, block_size, enable_prefix_caching,
    enable_chunked_prefill, enforce_eager, async_scheduling, kernel_backend,
    gpu_memory_utilization, num_kv_blocks, kv_cache_memory_cpu, load_format, seed,
    quantization, speculative, kv_cache_dtype).

    Example::

        llm = ember.LLM("smollm2-135m")
        out = llm.generate(["The capital of France is"], ember.SamplingParams(temperature=0))
        print(out[0].outputs[0].text)
    """

    def __init__(self, model, **engine_args):
        self.config = config = EngineConfig(model=model, **engine_args)
        checkpoint = Checkpoint(model)
        self.model_config = mc = checkpoint.config
        spec = config.speculative
        if spec is not None and spec.num_candidates > 1 and any(mc.layer_windows):
            raise ValueError("speculative num_candidates > 1 (tree drafts) needs a model "
                             "without sliding-window attention: a draft node's window would "
                             "be counted in cache slots, not in its tree position")
        self.tokenizer = checkpoint.tokenizer()
        self.eos_token_ids = list(mc.eos_token_ids)
        if not self.eos_token_ids and getattr(self.tokenizer, "eos_token_id", None) is not None:
            self.eos_token_ids = [self.tokenizer.eos_token_id]

        max_len = self._requested_max_model_len()
        dtype = config.torch_dtype(mc.torch_dtype)
        self.model = load_model(checkpoint, dtype=dtype, device=config.device,
                                max_positions=max_len, backend=config.kernel_backend,
                                load_format=config.load_format,
                                quantization=config.quantization)
        draft_model = None
        if spec is not None and spec.method == "draft_model":
            draft_checkpoint = checkpoint if spec.model is None else Checkpoint(spec.model)
            draft_vocab = draft_checkpoint.config.vocab_size
            if draft_vocab != mc.vocab_size:
                raise ValueError(f"the draft model's vocabulary ({draft_vocab} tokens) is not "
                                 f"the target's ({mc.vocab_size})")
            draft_model = load_model(draft_checkpoint, dtype=dtype, device=config.device,
                                     max_positions=max_len, backend=config.kernel_backend,
                                     load_format=config.load_format,
                                     quantization=spec.quantization)
        # The draft model's KV cache shares the target's block tables: a block holds both.
        num_blocks = count_kv_blocks(config, self.model, max_len, extra_block_bytes=(
            kv_block_bytes(draft_model, config.block_size, config.kv_cache_dtype)
            if draft_model else 0))
        capacity = num_blocks * config.block_size
        if capacity < max_len:
            if config.max_model_len is not None or capacity < config.block_size:
                raise ValueError(
                    f"the KV cache holds {capacity} tokens ({num_blocks} blocks of "
                    f"{config.block_size}), less than max_model_len = {max_len}; lower "
                    f"max_model_len or give the cache more memory (num_kv_blocks, "
                    f"gpu_memory_utilization, kv_cache_memory_cpu)")
            max_len = capacity
        self.max_model_len = max_len
        self.runner = ModelRunner(config, self.model, num_blocks, max_len, self.eos_token_ids)
        self.block_manager = BlockManager(num_blocks, config.block_size,
                                          config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs=config.max_num_seqs,
                                   max_num_batched_tokens=config.max_num_batched_tokens,
                                   enable_chunked_prefill=config.enable_chunked_prefill)
        self._requests: dict = {}  # request_id -> (Sequence, RequestMetrics), until finished
        self._seed_rng = random.Random(config.seed)
        self._next_id = 0
        self._in_flight = None  # a launched step whose tokens are not read yet (StepOutput)
        self.proposer = None
        if draft_model is not None:
            self.proposer = DraftModelProposer(
                spec, draft_model, allocate_kv_cache(draft_model, num_blocks, config.block_size,
                                                     config.device, config.kv_cache_dtype),
                config.block_size)
        elif spec is not None:
            self.proposer = NgramProposer(spec)
        self.num_draft_tokens = 0  # drafts verified so far, and how many were accepted
        self.num_accepted_tokens = 0
        self.num_recomputed_tokens = 0  # accepted off the first chain: computed again

    def _requested_max_model_len(self) -> int:
        config, context = self.config, self.model_config.max_position_embeddings
        if config.max_model_len is not None and config.max_model_len > context:
            raise ValueError(f"max_model_len ({config.max_model_len}) exceeds the model's "
                             f"context length ({context})")
        max_len = config.max_model_len or context
        if not config.enable_chunked_prefill and max_len > config.max_num_batched_tokens:
            if config.max_model_len is not None:
                raise ValueError(
                    f"without chunked prefill a whole prompt must fit in one step: "
                    f"max_num_batched_tokens ({config.max_num_batched_tokens}) must be >= "
                    f"max_model_len ({max_len})")
            max_len = config.max_num_batched_tokens
        return max_len

    # ------------------------------------------------------------------------------------------
    # Requests
    # ------------------------------------------------------------------------------------------

    def encode(self, prompt) -> tuple:
        """``(text or None, token ids)`` of a prompt: a string, a list of token ids or a dict
        with "prompt" or "prompt_token_ids"."""
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                prompt = list(prompt["prompt_token_ids"])
            elif "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass prompts as token ids")
            return prompt, self.tokenizer(prompt).input_ids
        if not isinstance(prompt, (list, tuple)) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise ValueError(f"a prompt must be a string, a list of token ids or a dict, got "
                             f"{type(prompt).__name__}")
        return None, list(prompt)

    def _new_sequence(self, prompt, params, request_id) -> Sequence:
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling params must be a SamplingParams, got "
                             f"{type(params).__name__}")
        text, token_ids = self.encode(prompt)
        if not token_ids:
            raise ValueError("the prompt is empty")
        vocab = self.model_config.vocab_size
        if min(token_ids) < 0 or max(token_ids) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab}), got "
                             f"[{min(token_ids)}, {max(token_ids)}]")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(token_ids)} tokens; max_model_len is "
                             f"{self.max_model_len}, which leaves no room to generate")
        if request_id is None:
            request_id = str(self._next_id)
            self._next_id += 1
        elif request_id in self._requests:
            raise ValueError(f"request_id {request_id!r} is already running")
        seed = params.seed if params.seed is not None else self._seed_rng.getrandbits(63)
        seq = Sequence(request_id, token_ids, params, prompt=text, seed=seed,
                       max_model_len=self.max_model_len)
        if self.tokenizer is not None:
            seq.detokenizer = IncrementalDetokenizer(self.tokenizer, token_ids,
                                                     params.skip_special_tokens)
        return seq

    def _submit(self, seq: Sequence) -> None:
        self._requests[seq.request_id] = (seq, RequestMetrics(arrival_time=time.perf_counter()))
        self.scheduler.add(seq)

    def add_request(self, prompt, params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        """Queue a request; returns its id. ``step()`` then advances it."""
        seq = self._new_sequence(prompt, params, request_id)
        self._submit(seq)
        return seq.request_id

    def abort(self, request_id: str) -> None:
        """Stop a request and free its KV blocks (unknown or finished ids are ignored)."""
        entry = self._requests.pop(request_id, None)
        if entry is not None:
            self.scheduler.finish(entry[0], "abort")

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    # ------------------------------------------------------------------------------------------
    # The step
    # ------------------------------------------------------------------------------------------

    def step(self) -> list:
        """Run one engine step; returns a RequestOutput (cumulative) for every request that
        produced a token."""
        return [self._output(seq, metrics) for seq, metrics in self._advance()]

    def _advance(self) -> list:
        """Run one engine step; returns ``(sequence, metrics)`` of every request that produced
        a token (outputs are built only for the requests a caller needs).

        With async scheduling the step whose tokens this returns may already be running (it
        was launched by the previous call); before waiting for it, the step after it is
        launched when that needs none of its tokens on the host (``_rows_to_run_ahead``).
        """
        if not self._requests:
            if self._in_flight is not None:
                # Only rows of finished or aborted requests; wait for it all the same, so its
                # pinned buffers are free when they come round again.
                self._in_flight.token_ids()
                self._in_flight = None
            return []
        if self._in_flight is None:
            self._propose_drafts()
        step = self._in_flight or self._launch(self.scheduler.schedule())
        self._in_flight = None
        next_batch = None
        rows = self._rows_to_run_ahead(step)
        if rows is not None:
            seqs = [step.seqs[i] for i in rows]
            for seq in seqs:
                seq.token_ids.append(PENDING_TOKEN)
            next_batch = self.scheduler.schedule()
            if next_batch.seqs != seqs:
                raise RuntimeError("async scheduling: the step scheduled ahead is not the "
                                   "running sequences' decodes")
            input_ids = step.device_tokens
            if len(rows) < len(step.seqs):
                input_ids = input_ids[torch.tensor(rows, device=input_ids.device)]
            self._in_flight = self.runner.launch(next_batch, input_ids=input_ids)
        advanced = self._finish(step)
        if next_batch is not None:
            # After _finish: its blocks can enter the prefix cache once their tokens are known.
            self.scheduler.complete(next_batch)
        return advanced

    def _propose_drafts(self) -> None:
        """Speculative decoding: draft tokens for every running sequence about to decode."""
        if self.proposer is None:
            return
        for seq in self.scheduler.running:
            decoding = seq.num_computed_tokens == len(seq) - 1
            seq.draft_token_ids, seq.draft_parents = (self.proposer.propose(seq) if decoding
                                                      else ([], []))

    def _launch(self, batch):
        if not batch:  # the scheduler guarantees progress; never spin silently
            raise RuntimeError(f"the scheduler found nothing to run for "
                               f"{len(self._requests)} unfinished requests")
        if self.proposer is not None:
            self.proposer.fill(batch)
        step = self.runner.launch(batch)
        self.scheduler.complete(batch)
        return step

    def _rows_to_run_ahead(self, step) -> list | None:
        """The rows of ``step`` whose sequences can decode again before ``step``'s tokens are
        known, or None. The next step is known without those tokens when it is a decode of
        each running sequence, whatever its token: every running sequence samples in ``step``
        (those finished since are left out), nothing waits to be admitted, no sequence can
        reach its length limit or still be below min_tokens with that token (both change what
        the next step does), and the blocks it needs are free (no preemption).
        """
        if not (self.config.async_scheduling and step.seqs) or self.scheduler.waiting:
            return None
        rows = [i for i, seq in enumerate(step.seqs) if not seq.is_finished]
        running = self.scheduler.running
        if len(running) != len(rows) or any(seq is not step.seqs[i]
                                            for seq, i in zip(running, rows, strict=True)):
            return None
        if not rows:  # (the config keeps max_num_batched_tokens >= max_num_seqs >= rows)
            return None
        bs, new_blocks = self.config.block_size, 0
        for seq in running:
            generated = seq.num_output_tokens + 1  # with the token ``step`` samples
            if generated >= seq.max_tokens or generated < seq.params.min_tokens:
                return None
            new_blocks += -(-(len(seq) + 1) // bs) > len(seq.block_table)
        return rows if new_blocks <= self.block_manager.num_free_blocks else None

    def _finish(self, step) -> list:
        """Wait for ``step``'s tokens, append them (filling the placeholders of a step run
        ahead), detokenize and check the stop conditions. A sequence that verified draft
        tokens gets the accepted path's (see speculative.py), then the token sampled at its
        end; it stops early if one of them ends it."""
        token_lists = step.token_lists()
        now = time.perf_counter()
        advanced = []
        for seq, sampled in zip(step.seqs, token_lists, strict=True):
            if seq.is_finished:  # aborted while the step ran
                continue
            drafts, parents = seq.draft_token_ids[:len(sampled) - 1], seq.draft_parents
            seq.draft_token_ids, seq.draft_parents = [], []
            path = accepted_path(drafts, parents[:len(drafts)], sampled)
            self.num_draft_tokens += len(drafts)
            self.num_accepted_tokens += len(path)
            # The path's K/V are in place as far as it follows nodes 0, 1, 2, ...; the rest is
            # computed again by the next step.
            in_place = next((j for j, node in enumerate(path) if node != j), len(path))
            self.num_recomputed_tokens += len(path) - in_place
            if drafts:
                self.proposer.verified(seq, in_place)
            metrics = self._requests[seq.request_id][1]
            if metrics.first_token_time is None:
                metrics.first_token_time = now
            emitted = [drafts[node] for node in path] + [sampled[path[-1] + 1 if path else 0]]
            for token in emitted:
                if seq.token_ids[-1] == PENDING_TOKEN:
                    seq.token_ids[-1] = token
                else:
                    seq.token_ids.append(token)
                self._check_stop(seq, token)
                if seq.is_finished:
                    break
            if seq.is_finished:
                metrics.finished_time = now
                del self._requests[seq.request_id]
            elif in_place:
                self.scheduler.accept_drafts(seq, in_place)
            advanced.append((seq, metrics))
        return advanced

    def _check_stop(self, seq: Sequence, token: int) -> None:
        p = seq.params
        new_text = seq.detokenizer.step(seq.token_ids) if seq.detokenizer else ""
        seq.output_text += new_text
        if seq.num_output_tokens >= p.min_tokens:
            stop_token = (not p.ignore_eos and token in self.eos_token_ids) or \
                token in p.stop_token_ids
            if stop_token:
                if new_text and not p.include_stop_str_in_output:
                    seq.output_text = seq.output_text[:-len(new_text)]
                reason = token if token in p.stop_token_ids else None
                self.scheduler.finish(seq, "stop", reason)
                return
            if p.stop_strings and new_text:
                at, stop = find_stop_string(seq.output_text, len(new_text), p.stop_strings)
                if stop is not None:
                    end = at + len(stop) if p.include_stop_str_in_output else at
                    seq.output_text = seq.output_text[:end]
                    self.scheduler.finish(seq, "stop", stop)
                    return
        if seq.num_output_tokens >= seq.max_tokens:
            self.scheduler.finish(seq, "length")

    def _output(self, seq: Sequence, metrics: RequestMetrics) -> RequestOutput:
        completion = CompletionOutput(0, seq.output_text, seq.output_token_ids,
                                      seq.finish_reason, seq.stop_reason)
        return RequestOutput(seq.request_id, seq.prompt, seq.token_ids[:seq.num_prompt_tokens],
                             [completion], seq.is_finished, seq.num_cached_tokens, metrics)

    # ------------------------------------------------------------------------------------------
    # Offline APIs
    # ------------------------------------------------------------------------------------------

    def _check_idle(self, api: str) -> None:
        if self._requests:
            raise RuntimeError(f"{api}() needs an idle engine, but requests added with "
                               f"add_request() are unfinished: step() or abort() them first")

    def generate(self, prompts, sampling_params=None, use_tqdm: bool = True) -> list:
        """Generate for every prompt; returns finished RequestOutputs in the prompts' order.

        ``prompts``: a string, a list of token ids, a dict, or a list of those.
        ``sampling_params``: one SamplingParams for all, or a list with one per prompt.
        """
        self._check_idle("generate")
        prompts = _as_prompt_list(prompts)
        if isinstance(sampling_params, (list, tuple)):
            if len(sampling_params) != len(prompts):
                raise ValueError(f"got {len(sampling_params)} sampling params for "
                                 f"{len(prompts)} prompts")
            params = list(sampling_params)
        else:
            params = [sampling_params] * len(prompts)
        # Build every sequence before queueing any, so a bad prompt leaves the engine idle.
        seqs = [self._new_sequence(p, sp, None) for p, sp in zip(prompts, params, strict=True)]
        for seq in seqs:
            self._submit(seq)
        finished = {}
        bar = tqdm(total=len(seqs), desc="Generating", unit="req", disable=not use_tqdm)
        start, generated = time.perf_counter(), 0
        try:
            while self._requests:
                for seq, metrics in self._advance():
                    generated += 1
                    if seq.is_finished:
                        finished[seq.request_id] = self._output(seq, metrics)
                        bar.update(1)
                bar.set_postfix(tok_s=f"{generated / (time.perf_counter() - start):.1f}",
                                refresh=False)
        except BaseException:
            for seq in seqs:
                self.abort(seq.request_id)
            raise
        finally:
            bar.close()
        return [finished[seq.request_id] for seq in seqs]

    def chat(self, messages, sampling_params=None, use_tqdm: bool = True) -> list:
        """``generate`` on conversations (a list of {"role", "content"} dicts, or a list of
        such lists) rendered by the model's chat template."""
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        return self.generate([self.apply_chat_template(c) for c in conversations],
                             sampling_params, use_tqdm)

    def apply_chat_template(self, conversation: list) -> list:
        """Token ids of a conversation, ending with the assistant's turn prompt."""
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this model has no chat template")
        text = self.tokenizer.apply_chat_template(conversation, tokenize=False,
                                                  add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def stream(self, prompt, sampling_params: SamplingParams | None = None) -> Iterator:
        """Generate for one prompt, yielding CompletionOutput deltas (new text and token ids)
        as they are produced; the last delta carries the finish_reason."""
        self._check_idle("stream")
        seq = self._new_sequence(prompt, sampling_params, None)
        self._submit(seq)
        text_len = tokens_len = 0
        try:
            while self._requests:
                for out in self.step():
                    done = out.outputs[0]
                    yield CompletionOutput(0, done.text[text_len:], done.token_ids[tokens_len:],
                                           done.finish_reason, done.stop_reason)
                    text_len, tokens_len = len(done.text), len(done.token_ids)
        finally:
            self.abort(seq.request_id)  # a no-op once finished; frees blocks if abandoned

    # ------------------------------------------------------------------------------------------
    # Introspection
    # ------------------------------------------------------------------------------------------

    def stats(self) -> dict:
        """KV cache size, prefix-cache hits, preemptions, CUDA graph capture time and the
        speculative drafts verified and accepted."""
        bm = self.block_manager
        return {
            "num_kv_blocks": bm.num_blocks,
            "block_size": bm.block_size,
            "kv_cache_bytes": bm.num_blocks * kv_block_bytes(self.model, bm.block_size,
                                                             self.config.kv_cache_dtype),
            "max_model_len": self.max_model_len,
            "prefix_cache_query_tokens": bm.prefix_query_tokens,
            "prefix_cache_hit_tokens": bm.prefix_hit_tokens,
            "prefix_cache_hit_rate": bm.prefix_hit_tokens / max(bm.prefix_query_tokens, 1),
            "num_preemptions": self.scheduler.num_preemptions,
            "cuda_graph_batch_sizes": self.runner.graph_batch_sizes,
            "graph_capture_seconds": self.runner.graph_capture_seconds,
            "spec_draft_tokens": self.num_draft_tokens,
            "spec_accepted_tokens": self.num_accepted_tokens,
            "spec_acceptance_rate": self.num_accepted_tokens / max(self.num_draft_tokens, 1),
            "spec_recomputed_tokens": self.num_recomputed_tokens,
        }


def _as_prompt_list(prompts) -> list:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if isinstance(prompts, (list, tuple)) and prompts and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompts):
        return [list(prompts)]  # one prompt given as token ids
    if isinstance(prompts, (list, tuple)):
        return list(prompts)
    raise ValueError(f"prompts must be a string, token ids, a dict or a list of them, got "
                     f"{type(prompts).__name__}")
