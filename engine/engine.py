"""`LLMEngine` (add_request / step / generate) and `AsyncLLMEngine` (a background step loop
with one async token stream per request)."""
from __future__ import annotations

import asyncio
import atexit
import math
import queue
import threading
import time
import uuid
import weakref
from dataclasses import dataclass
from typing import Any, AsyncIterator, Sequence as Seq

import torch
from torch import nn

from .config import EngineConfig, SamplingParams
from .detokenize import IncrementalDetokenizer
from .kv_cache import BlockManager, KVCache
from .model import AttnMetadata, DecodeQuantLinear, LlamaModel
from .sampling import apply_mask, sample
from .scheduler import Scheduler, Sequence
from .threads import ThreadTuner

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Default KV pool budget when num_kv_blocks is None (at least one max_model_len sequence).
_KV_BUDGET_BYTES = 1 << 30
_DEFAULT_MAX_LEN_CAP = 8192
# the compiled decode step attends to contexts padded to a multiple of this many tokens
_GRAPH_BUCKET = 128


def _consecutive(block_table: list[int], num_tokens: int, block_size: int) -> bool:
    """Whether the blocks holding tokens 0..num_tokens-1 are consecutive in the pool (so their
    slots form one range and attention can read them as a view)."""
    nb = -(-num_tokens // block_size)
    first = block_table[0]
    return block_table[:nb] == list(range(first, first + nb))


class ContextOverflowError(ValueError):
    """The prompt plus max_tokens cannot fit the context window (or the KV pool)."""


@dataclass
class RequestMetrics:
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    forced_tokens: int
    ttft_s: float | None
    decode_s: float
    queue_s: float | None


@dataclass
class RequestOutput:
    """A request's state after a step: all tokens and text so far, plus the new text."""

    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    text: str
    delta_text: str
    finished: bool
    finish_reason: str | None
    metrics: RequestMetrics
    error: BaseException | None = None  # set (finish_reason "abort") when the request's constraint failed


@dataclass
class EngineStats:
    waiting: int
    running: int
    kv_blocks_total: int
    kv_blocks_used: int
    kv_blocks_cached: int
    prefix_cache_hit_tokens: int
    prefix_cache_queried_tokens: int
    finishing: int = 0  # finished requests whose last tokens' K/V the next step computes for the cache

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hit_tokens / max(1, self.prefix_cache_queried_tokens)


class LLMEngine:
    """The synchronous engine: one `step()` computes one batch (decodes plus prefill chunks).

    Pass ``loaded`` (an `engine.loader.LoadedModel`) to reuse weights already in memory;
    otherwise ``config.model`` is loaded with `engine.loader.load_model`.
    """

    def __init__(self, config: EngineConfig, loaded: Any = None):
        self.config = config
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        if loaded is None:
            from .loader import load_model

            loaded = load_model(config.model)
        self.tokenizer = loaded.tokenizer
        self.eos_token_ids: list[int] = list(loaded.eos_token_ids)
        self.model_name: str = loaded.name
        self.device = torch.device(config.device)
        self.dtype = _DTYPES[config.resolved_dtype()]
        hf_max = int(loaded.config.get("max_position_embeddings") or _DEFAULT_MAX_LEN_CAP)
        self.max_model_len: int = config.max_model_len or min(hf_max, _DEFAULT_MAX_LEN_CAP)

        self.model = LlamaModel.from_weights(loaded.config, loaded.weights, self.dtype, self.device,
                                             max_len=self.max_model_len)
        if config.quantization is not None:
            self._quantize(config.quantization)
        a = self.model.args
        self.vocab_size: int = a.vocab_size

        bs = config.block_size
        num_blocks = config.num_kv_blocks
        if num_blocks is None:
            per_token = KVCache.bytes_per_token(a.num_layers, a.num_kv_heads, a.head_dim, self.dtype)
            budget_tokens = max(self.max_model_len, min(_KV_BUDGET_BYTES // per_token,
                                                         config.max_num_seqs * self.max_model_len))
            num_blocks = -(-budget_tokens // bs)
        self.kv = KVCache(a.num_layers, num_blocks, bs, a.num_kv_heads, a.head_dim, self.dtype, self.device)
        self.block_manager = BlockManager(num_blocks, bs, config.enable_prefix_caching,
                                          copy_kv=self.kv.copy_block_prefix)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        self._seqs: dict[str, Sequence] = {}
        self.last_step_decode_only = False  # whether the last step computed one token per sequence (for timing)
        self._pending: list[RequestOutput] = []  # outputs produced outside a step (aborts, instant finishes)
        self._detok: dict[str, IncrementalDetokenizer] = {}  # request id -> its output text so far
        self._arange_bs = torch.arange(bs, device=self.device)
        self._forward = self.model.forward
        self._kv_views = True  # attention reads consecutive slots as views of the cache
        self._decode_graph = None
        if config.compile:
            # only decode-only steps are compiled (prefill chunks run eager): a pure function of the
            # batch and the bucketed context length, so a few compiled shapes serve every step
            self._decode_graph = torch.compile(self.model.decode_graph, dynamic=True)
        self._fused = None
        if config.fused_decode:  # decode-only steps as one C++ call (None if it cannot build: torch path)
            from .decode_fused import build_fused_decoder

            self._fused = build_fused_decoder(self.model, config.quantization, config.fused_activations)
        # every step (prefill chunks too) runs the C++ step, except with prefill_int8, whose W8A8 prefill
        # linears are torch's (the C++ step then runs the decode-only steps)
        self._fused_prefill = self._fused is not None and not config.prefill_int8

    def _quantize(self, mode: str) -> None:
        """Weight-only quantize the decoder linears (``mode``) and the lm_head (int8).

        On CPU the dense weights are kept for prefill chunks (see `DecodeQuantLinear`): decode reads
        the small quantized weights, prefill keeps the dense matmul's speed. On CUDA the torch
        kernels used do not apply: refuse clearly."""
        from .quant import Int8WeightOnlyLinear, quantize_

        if self.device.type != "cpu":
            raise ValueError(f"quantization={mode!r} uses torch's CPU kernels; use quantization=None on {self.device}")
        layers = self.model.layers
        dense = {name: mod for name, mod in layers.named_modules() if isinstance(mod, nn.Linear)}
        if self.config.prefill_int8:  # prefill chunks through dynamic int8 (W8A8), SmoothQuant-calibrated
            from .dynamic_int8 import CALIBRATION_TEXT, DynamicInt8Linear, calibrate_llama

            absmax = calibrate_llama(self.model, list(self.tokenizer(CALIBRATION_TEXT).input_ids)[: self.max_model_len])
            dense = {name: DynamicInt8Linear(lin.weight, lin.bias, act_absmax=absmax[name]) for name, lin in dense.items()}
        quantize_(layers, mode)  # replaces every nn.Linear under layers in place
        for name, lin in dense.items():
            parent_name, _, attr = name.rpartition(".")
            parent = layers.get_submodule(parent_name)
            setattr(parent, attr, DecodeQuantLinear(lin, getattr(parent, attr)))
        # the lm_head is a fifth of the weight bytes of a small model: int8 per-row keeps its logits close;
        # it only ever sees the rows being sampled, so no dense copy is needed
        self.model.lm_head = Int8WeightOnlyLinear(self.model.lm_head.weight, None)

    # ---- requests -------------------------------------------------------------------------------
    def make_sequence(self, prompt: str | list[int], params: SamplingParams, constraint: Any = None,
                      request_id: str | None = None, priority: float | None = None) -> Sequence:
        """Validate and tokenize a request (no engine state is touched). Raises ContextOverflowError
        if the prompt plus ``params.max_tokens`` does not fit.

        ``priority``: scheduling order, lower first, on the `time.perf_counter` clock (None = the
        arrival time, i.e. FIFO); e.g. an agent run's start time, so its later steps go ahead of
        work that arrived after the run started."""
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        if isinstance(prompt, str):
            ids = list(self.tokenizer(prompt).input_ids)
        else:
            ids = [int(t) for t in prompt]
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"prompt token ids out of range [0, {self.vocab_size}): {bad[:5]}")
        if not ids:
            raise ValueError("empty prompt: give at least one token")
        total = len(ids) + params.max_tokens
        if total > self.max_model_len:
            raise ContextOverflowError(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) = {total} exceeds the "
                f"context window of {self.max_model_len} tokens; shorten the prompt or lower max_tokens")
        if self.block_manager.blocks_needed(total) > self.block_manager.num_blocks:
            raise ContextOverflowError(
                f"prompt + max_tokens = {total} tokens exceeds the KV pool "
                f"({self.block_manager.num_blocks} blocks of {self.block_manager.block_size}); raise num_kv_blocks")
        rid = request_id or uuid.uuid4().hex
        gen = None
        if params.seed is not None:
            gen = torch.Generator(device=self.device).manual_seed(params.seed)
        if priority is not None and not math.isfinite(priority):
            raise ValueError(f"priority must be a finite number, got {priority!r}")
        return Sequence(request_id=rid, token_ids=ids, num_prompt_tokens=len(ids), params=params,
                        constraint=constraint, generator=gen, priority=priority)

    def add_sequence(self, seq: Sequence) -> str:
        """Queue a sequence made by `make_sequence`."""
        if seq.request_id in self._seqs:
            raise ValueError(f"request id {seq.request_id!r} is already in use")
        self._seqs[seq.request_id] = seq
        if seq.constraint is not None:
            # the constraint may already be done or force the first tokens (jump-forward into the prefill)
            try:
                done = self._after_tokens(seq) is not None
            except Exception:
                self._seqs.pop(seq.request_id, None)
                self._detok.pop(seq.request_id, None)
                raise
            if done:
                self._finish(seq)
                self._pending.append(self._output(seq))
                return seq.request_id
        self.scheduler.add(seq)
        return seq.request_id

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None, constraint: Any = None,
                    request_id: str | None = None, priority: float | None = None) -> str:
        """Queue a request; returns its id. Raises ContextOverflowError before any work if it cannot fit."""
        return self.add_sequence(self.make_sequence(prompt, params or SamplingParams(), constraint, request_id,
                                                    priority))

    def abort_request(self, request_id: str) -> None:
        """Stop a request and free its KV blocks (its last output has finish_reason "abort")."""
        seq = self._seqs.get(request_id)
        if seq is None or seq.finished:
            return
        seq.finish_reason = "abort"
        self._finish(seq)
        self._pending.append(self._output(seq))

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._pending)

    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(waiting=len(self.scheduler.waiting), running=len(self.scheduler.running),
                           kv_blocks_total=bm.num_blocks, kv_blocks_used=bm.num_used,
                           kv_blocks_cached=bm.num_cached, prefix_cache_hit_tokens=bm.hit_tokens,
                           prefix_cache_queried_tokens=bm.queried_tokens, finishing=len(self.scheduler.finishing))

    def decode_weight_bytes(self) -> int:
        """Bytes of weights one decode step reads: the quantized copies when quantized (not the dense
        prefill copies), the lm_head, not the embedding table (one row per token) nor RoPE tables.
        Divided by the memory bandwidth, this is the floor of decode time per step."""
        seen: set[int] = set()
        total = 0

        def walk(mod: nn.Module) -> None:
            nonlocal total
            if isinstance(mod, DecodeQuantLinear):
                walk(mod.quantized)
                return
            for t in list(mod.parameters(recurse=False)) + list(mod.buffers(recurse=False)):
                if t is not None and id(t) not in seen:
                    seen.add(id(t))
                    total += t.numel() * t.element_size()
            for child in mod.children():
                if child is not self.model.embed_tokens:
                    walk(child)

        for layer in self.model.layers:
            walk(layer)
        walk(self.model.lm_head)
        total += self.model.norm.numel() * self.model.norm.element_size()
        return total

    # ---- the step -------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Run one batch; return an output for every request that produced text or finished.

        Finished requests' uncomputed tails (see `Scheduler.finish`) ride along in the batch; their
        rows are not sampled, and their blocks are released into the prefix cache after it."""
        outputs, self._pending = self._pending, []
        plan = self.scheduler.schedule()
        self.last_step_decode_only = plan is not None and bool(plan.entries) and all(n == 1 for _, n in plan.entries)
        if plan is None or not plan.entries:
            return outputs
        if self._fused is not None and (self._fused_prefill or all(n == 1 for _, n in plan.entries)):
            hidden, to_sample = self._fused_step(plan.entries)  # [len(to_sample), H]
            rows = None
        elif self._decode_graph is not None and all(n == 1 for _, n in plan.entries):
            input_ids, positions, slot_mapping, kv_slots, kv_mask, to_sample = self._prepare_graph(plan.entries)
            hidden, k_new, v_new = self._decode_graph(input_ids, positions, kv_slots, kv_mask,
                                                      self.kv.k, self.kv.v)  # [B, H], [layers, B, nkv, hd]
            self.kv.k[:, slot_mapping] = k_new  # every layer's new K/V in one write each
            self.kv.v[:, slot_mapping] = v_new
            rows = None
        else:
            input_ids, positions, meta, rows, to_sample = self._prepare(plan.entries)
            hidden = self._forward(input_ids, positions, meta, self.kv.k, self.kv.v)  # [T, H]
        if any(seq.finished for seq in to_sample):  # finishing tails: K/V only, nothing to sample
            keep = [i for i, seq in enumerate(to_sample) if not seq.finished]
            rows = torch.tensor(keep, device=self.device) if rows is None else rows[keep]
            to_sample = [to_sample[i] for i in keep]
        if to_sample:
            logits = self.model.compute_logits(hidden if rows is None else hidden[rows])  # [N, V] float32
        for seq, n in plan.entries:
            seq.num_computed_tokens += n
            self.block_manager.commit_full_blocks(seq)
        self.scheduler.release_finishing()
        if to_sample:
            outputs.extend(self._sample_and_update(to_sample, logits))
        return outputs

    def _prepare(self, entries: list[tuple[Sequence, int]]):
        """The step's flat inputs: input_ids [T], positions [T], AttnMetadata, rows (the tokens whose
        logits are sampled; None = all T in order, as in a decode-only step) and their sequences.

        Slots are computed arithmetically from the block tables; a sequence whose blocks are
        consecutive in the pool attends through a slice (a view of the cache) instead of a gather."""
        bs = self.config.block_size
        dev = self.device
        views = self._kv_views
        ids: list[int] = []
        pos: list[int] = []
        decode_slot_ids: list[int] = []  # new-token slots of the one-token entries (they come first)
        prefill_slot_parts: list[torch.Tensor] = []
        decode_seqs: list[tuple[Sequence, int]] = []
        prefills = []
        rows: list[int] = []
        to_sample: list[Sequence] = []
        t = 0
        for seq, n in entries:
            nc = seq.num_computed_tokens
            end = nc + n
            table = seq.block_table
            ids.extend(seq.token_ids[nc:end])
            if n == 1:
                pos.append(nc)
                decode_slot_ids.append(table[nc // bs] * bs + nc % bs)
                decode_seqs.append((seq, end))
            else:
                pos.extend(range(nc, end))
                if views and _consecutive(table, end, bs):
                    first = table[0]
                    slots: torch.Tensor | slice = slice(first * bs, first * bs + end)
                    prefill_slot_parts.append(torch.arange(first * bs + nc, first * bs + end, device=dev))
                else:
                    slots = self._slots(table, end)  # [end]
                    prefill_slot_parts.append(slots[nc:end])
                mask = None
                if nc:
                    # query i (position nc+i) sees keys 0..nc+i
                    mask = torch.arange(end, device=dev)[None, :] <= torch.arange(nc, end, device=dev)[:, None]
                prefills.append((t, t + n, slots, mask))
            t += n
            if end == len(seq.token_ids):
                rows.append(t - 1)
                to_sample.append(seq)
        slot_mapping = torch.tensor(decode_slot_ids, dtype=torch.long, device=dev)
        if prefill_slot_parts:
            slot_mapping = torch.cat([slot_mapping, *prefill_slot_parts])
        meta = AttnMetadata(slot_mapping=slot_mapping, num_decode=len(decode_seqs), prefills=prefills)
        if len(decode_seqs) == 1 and views:
            seq, end = decode_seqs[0]
            if _consecutive(seq.block_table, end, bs):
                first = seq.block_table[0]
                meta.decode_slots = slice(first * bs, first * bs + end)
        if decode_seqs and meta.decode_slots is None:
            lens = [end for _, end in decode_seqs]
            meta.decode_slots = torch.nn.utils.rnn.pad_sequence(
                [self._slots(seq.block_table, end) for seq, end in decode_seqs], batch_first=True)  # [B, Lmax]
            if min(lens) != max(lens):
                lt = torch.tensor(lens, device=dev)
                meta.decode_mask = (torch.arange(max(lens), device=dev)[None, :] < lt[:, None])[:, None, None, :]
        input_ids = torch.tensor(ids, device=dev)
        positions = torch.tensor(pos, device=dev)
        row_t = None if rows == list(range(t)) else torch.tensor(rows, device=dev)
        return input_ids, positions, meta, row_t, to_sample

    def _fused_step(self, entries: list[tuple[Sequence, int]], all_rows: bool = False
                    ) -> tuple[torch.Tensor, list[Sequence]]:
        """Run ``entries`` (decode rows and prefill chunks) as one C++ step (`decode_fused.FusedDecoder`).
        Returns the final hidden states of the rows to sample [N, H] and their sequences (one row per
        sequence whose prompt or output is complete after the step, finishing tails excluded); with
        ``all_rows`` every row's [T, H] and no sequences."""
        ids: list[int] = []
        starts = [0]
        ctx: list[int] = []
        tables: list[list[int]] = []
        rows: list[int] = []
        to_sample: list[Sequence] = []
        for seq, n in entries:
            nc = seq.num_computed_tokens
            end = nc + n
            ids.extend(seq.token_ids[nc:end])
            starts.append(starts[-1] + n)
            ctx.append(end)
            tables.append(seq.block_table)
            if end == len(seq.token_ids) and not seq.finished:
                rows.append(starts[-1] - 1)
                to_sample.append(seq)
        width = max(len(t) for t in tables)
        dev = self.device
        hidden = self._fused(torch.tensor(ids, device=dev), torch.tensor(starts, device=dev),
                             torch.tensor(ctx, device=dev),
                             torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long, device=dev),
                             self.config.block_size, None if all_rows else torch.tensor(rows, dtype=torch.long),
                             self.kv.k, self.kv.v)
        return hidden, ([] if all_rows else to_sample)

    def _prepare_graph(self, entries: list[tuple[Sequence, int]]):
        """Inputs of the compiled decode step (`LlamaModel.decode_graph`) for one-token entries:
        input_ids, positions, slot_mapping [B], kv_slots [B, Lp] (each sequence's earlier tokens,
        Lp rounded up to a multiple of ``_GRAPH_BUCKET`` so compiled shapes repeat),
        kv_mask [B, 1, 1, Lp + 1] and the sequences (all sampled)."""
        bs, dev = self.config.block_size, self.device
        seqs = [seq for seq, _ in entries]
        pos = [seq.num_computed_tokens for seq in seqs]  # = earlier tokens of each
        lp = -(-max(max(pos), 1) // _GRAPH_BUCKET) * _GRAPH_BUCKET
        kv_slots = torch.zeros(len(seqs), lp, dtype=torch.long, device=dev)
        for b, (seq, p) in enumerate(zip(seqs, pos)):
            if p:
                kv_slots[b, :p] = self._slots(seq.block_table, p)
        p_t = torch.tensor(pos, device=dev)
        kv_mask = torch.arange(lp + 1, device=dev)[None, :] < p_t[:, None]  # [B, Lp + 1]
        kv_mask[:, lp] = True  # the new token itself
        slot_mapping = torch.tensor([s.block_table[p // bs] * bs + p % bs for s, p in zip(seqs, pos)], device=dev)
        input_ids = torch.tensor([s.token_ids[p] for s, p in zip(seqs, pos)], device=dev)
        return input_ids, p_t, slot_mapping, kv_slots, kv_mask[:, None, None, :], seqs

    def _slots(self, block_table: list[int], end: int) -> torch.Tensor:
        """[end] cache slots of a sequence's tokens 0..end-1."""
        table = torch.tensor(block_table, device=self.device)
        return (table[:, None] * self.config.block_size + self._arange_bs).view(-1)[:end]

    def _sample_and_update(self, seqs: list[Sequence], logits: torch.Tensor) -> list[RequestOutput]:
        now = time.perf_counter()
        live: list[int] = []
        outputs: list[RequestOutput] = []
        for i, seq in enumerate(seqs):
            c = seq.constraint
            if c is not None:
                try:
                    if c.is_terminated():
                        seq.finish_reason = "stop"
                        continue
                    apply_mask(logits[i], c.next_token_mask())
                except Exception as exc:  # noqa: BLE001 - a broken constraint fails its own request only
                    seq.error, seq.finish_reason = exc, "abort"
                    continue
            live.append(i)
        picked = self._sample_rows(seqs, live, logits)
        for i, seq in enumerate(seqs):
            if seq.first_token_time is None:
                seq.first_token_time = now
            if i in picked and not seq.finished:
                try:
                    if self._append(seq, picked[i], forced=False) is None:
                        self._after_tokens(seq)
                except Exception as exc:  # noqa: BLE001 - the constraint refused a token or failed
                    seq.error, seq.finish_reason = exc, "abort"
            if seq.finished:
                self._finish(seq)
            outputs.append(self._output(seq))
        return outputs

    @staticmethod
    def _sample_rows(seqs: list[Sequence], live: list[int], logits: torch.Tensor) -> dict[int, int]:
        """{row: token} for the ``live`` rows of ``logits``. Should the batch's sampling raise, each row is
        sampled alone, so a failure ends its own request (error set) and never the others'."""
        if not live:
            return {}
        rows = logits if len(live) == len(seqs) else logits[live]  # no [N, V] copy in the common case
        try:
            return dict(zip(live, sample(rows, [seqs[i].params for i in live], [seqs[i].generator for i in live])))
        except Exception:  # noqa: BLE001 - resampled row by row below, where each failure is its row's
            picked = {}
            for i in live:
                try:
                    picked[i] = sample(logits[i:i + 1], [seqs[i].params], [seqs[i].generator])[0]
                except Exception as exc:  # noqa: BLE001 - this row's sampling failed: its request alone ends
                    seqs[i].error, seqs[i].finish_reason = exc, "abort"
            return picked

    def _append(self, seq: Sequence, token: int, forced: bool) -> str | None:
        """Add one output token; returns (and sets) the finish reason if it ends the request."""
        seq.token_ids.append(token)
        if forced:
            seq.forced_tokens += 1
        p = seq.params
        if seq.constraint is not None:
            seq.constraint.accept_token(token)
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids):
            seq.stop_token_at_end = True
            seq.finish_reason = "stop"
        elif seq.constraint is not None and seq.constraint.is_terminated():
            seq.finish_reason = "stop"
        elif seq.num_output_tokens >= p.max_tokens or len(seq.token_ids) >= self.max_model_len:
            seq.finish_reason = "length"
        self._detokenize(seq)
        return seq.finish_reason

    def _after_tokens(self, seq: Sequence) -> str | None:
        """Apply the constraint's forced tokens (jump-forward) after a sampled token or at admission."""
        c = seq.constraint
        if c is None or seq.finished:
            return seq.finish_reason
        if c.is_terminated():
            seq.finish_reason = "stop"
            return "stop"
        for tok in c.forced_tokens():
            if self._append(seq, int(tok), forced=True) is not None:
                break
        return seq.finish_reason

    def _detokenize(self, seq: Sequence) -> None:
        out = seq.output_token_ids
        if seq.stop_token_at_end:
            out = out[:-1]
        detok = self._detok.get(seq.request_id)
        if detok is None:
            detok = self._detok[seq.request_id] = IncrementalDetokenizer(self.tokenizer)
        # while running, text holds complete characters only (a partial one waits for its next bytes)
        text = detok.flush(out) if seq.finished else detok.update(out)
        stops = seq.params.stop
        if stops:
            start = max(0, len(seq.text) - max(len(s) for s in stops))
            cut = min((i for i in (text.find(s, start) for s in stops) if i >= 0), default=-1)
            if cut >= 0:
                text = text[:cut]
                seq.finish_reason = "stop"
        seq.text = text

    def _finish(self, seq: Sequence) -> None:
        seq.finish_time = time.perf_counter()
        self._detok.pop(seq.request_id, None)
        self.scheduler.finish(seq)  # an abort frees now; a stop/length may keep its tail for one more step
        self._seqs.pop(seq.request_id, None)

    def _output(self, seq: Sequence) -> RequestOutput:
        text = seq.text
        if seq.finished:
            safe = len(text)
        else:
            # hold back a trailing partial character or a possible beginning of a stop string
            safe = len(text.rstrip("\ufffd"))
            for s in seq.params.stop:
                for k in range(min(len(s) - 1, safe), 0, -1):
                    if text[:safe].endswith(s[:k]):
                        safe -= k
                        break
            safe = max(safe, seq.sent_text_len)
        delta = text[seq.sent_text_len:safe]
        seq.sent_text_len = safe
        t0 = seq.arrival_time
        ttft = seq.first_token_time - t0 if seq.first_token_time else None
        end = seq.finish_time or time.perf_counter()
        metrics = RequestMetrics(
            prompt_tokens=seq.num_prompt_tokens, cached_tokens=seq.cached_tokens,
            completion_tokens=seq.num_output_tokens, forced_tokens=seq.forced_tokens, ttft_s=ttft,
            decode_s=(end - seq.first_token_time) if seq.first_token_time else 0.0,
            queue_s=(seq.first_scheduled_time - t0) if seq.first_scheduled_time else None)
        return RequestOutput(request_id=seq.request_id, prompt_token_ids=seq.token_ids[:seq.num_prompt_tokens],
                             output_token_ids=list(seq.output_token_ids), text=text[:safe], delta_text=delta,
                             finished=seq.finished, finish_reason=seq.finish_reason, metrics=metrics,
                             error=seq.error)

    @torch.inference_mode()
    def prompt_logits(self, token_ids: list[int], chunk_size: int | list[int] | None = None) -> torch.Tensor:
        """Logits [T, vocab] (float32) at every position of ``token_ids`` (for tests and accuracy
        benches), computed ``chunk_size`` tokens per step (default max_num_batched_tokens; a list gives
        the first chunks' sizes, its last one repeating) through the path `step` takes: the C++ step for
        a fused engine (`EngineConfig.fused_decode`), else the torch forward (with quantization, chunks
        of <= 16 rows run the quantized decode kernels, larger ones the dense weights). Uses free KV
        blocks temporarily, no prefix cache; call only while no other thread is stepping the engine."""
        sizes = list(chunk_size) if isinstance(chunk_size, (list, tuple)) else [chunk_size]
        seq = self.make_sequence(list(token_ids), SamplingParams(max_tokens=1))
        if not self.block_manager.can_grow(seq, len(seq.token_ids)):
            raise RuntimeError("not enough free KV blocks for prompt_logits; let running requests finish")
        self.block_manager.grow(seq, len(seq.token_ids))
        rows = []
        try:
            while seq.num_uncomputed:
                size = sizes[min(len(rows), len(sizes) - 1)] or self.config.max_num_batched_tokens
                n = min(seq.num_uncomputed, size)
                if self._fused is not None and (self._fused_prefill or n == 1):
                    hidden, _ = self._fused_step([(seq, n)], all_rows=True)
                else:
                    input_ids, positions, meta, _, _ = self._prepare([(seq, n)])
                    hidden = self._forward(input_ids, positions, meta, self.kv.k, self.kv.v)
                rows.append(self.model.compute_logits(hidden))
                seq.num_computed_tokens += n
        finally:
            self.block_manager.free(seq)
        return torch.cat(rows)

    # ---- blocking convenience ---------------------------------------------------------------------
    def generate(self, prompts: Seq[str | list[int]] | str, params: SamplingParams | Seq[SamplingParams] | None = None,
                 constraints: Seq[Any] | None = None) -> list[RequestOutput]:
        """Run ``prompts`` to completion (batched together); return their final outputs in order.

        Returns once their finished tails are in the prefix cache too (at most one more step), so
        no block is referenced afterwards unless other requests are still running."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        n = len(prompts)
        plist = list(params) if isinstance(params, (list, tuple)) else [params or SamplingParams()] * n
        clist = list(constraints) if constraints is not None else [None] * n
        if len(plist) != n or len(clist) != n:
            raise ValueError(f"got {n} prompts, {len(plist)} params and {len(clist)} constraints")
        seqs = [self.make_sequence(p, sp, c) for p, sp, c in zip(prompts, plist, clist)]  # validate all first
        ids = [self.add_sequence(s) for s in seqs]
        final: dict[str, RequestOutput] = {}
        while len(final) < n:
            for out in self.step():
                if out.finished and out.request_id in ids:
                    if out.error is not None:
                        for rid in ids:
                            self.abort_request(rid)
                        self._pending = [o for o in self._pending if o.request_id not in ids]
                        raise out.error
                    final[out.request_id] = out
            if len(final) < n and not self.has_unfinished_requests():
                raise RuntimeError("engine went idle with requests unfinished")
        mine = set(ids)
        while any(s.request_id in mine for s in self.scheduler.finishing):
            self._pending.extend(self.step())  # other requests' outputs are kept for the next step()
        return [final[i] for i in ids]


class _Sink:
    """Delivers outputs from the engine thread to one consumer's event loop."""

    def __init__(self, send: Any):
        import sniffio

        self.send = send
        self.loop = None
        self.token = None
        if sniffio.current_async_library() == "asyncio":
            self.loop = asyncio.get_running_loop()
        else:
            import anyio.lowlevel

            self.token = anyio.lowlevel.current_token()

    def put(self, item: Any) -> bool:
        try:
            if self.loop is not None:
                self.loop.call_soon_threadsafe(self._send, item)
            else:
                import anyio.from_thread

                anyio.from_thread.run_sync(self._send, item, token=self.token)
            return True
        except RuntimeError:  # the consumer's loop is gone
            return False

    def _send(self, item: Any) -> None:
        try:
            self.send.send_nowait(item)
        except Exception:  # noqa: BLE001 - receiver closed: the consumer stopped listening
            pass


# A loop thread still alive when the interpreter finalizes is torn down mid-wait, and the process
# then aborts in torch's thread-pool destructors ("terminate called without an active exception",
# exit code 134), so every engine still running at exit is shut down first.
_live_engines: weakref.WeakSet[AsyncLLMEngine] = weakref.WeakSet()


@atexit.register
def _shutdown_live_engines() -> None:
    for engine in list(_live_engines):
        engine.shutdown()


class AsyncLLMEngine:
    """Runs an `LLMEngine`'s step loop in a background thread; async streams per request.

    Usage: ``async for out in aengine.generate_stream(prompt, params): ...``. Leaving the loop
    early (break, cancellation) aborts the request and frees its blocks.

    ``tune_threads``: let the loop pick 1 or torch's thread count by measuring step times (see
    `engine.threads`); None = on for a CPU engine whose ``num_threads`` is not set explicitly.
    """

    def __init__(self, engine: LLMEngine, tune_threads: bool | None = None):
        self.engine = engine
        if tune_threads is None:
            tune_threads = engine.device.type == "cpu" and engine.config.num_threads is None
        self.thread_tuner = ThreadTuner(torch.get_num_threads(), torch.set_num_threads) if tune_threads else None
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._sinks: dict[str, _Sink] = {}
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="agentrt-engine", daemon=True)
        self._thread.start()
        _live_engines.add(self)

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def generate_stream(self, prompt: str | list[int], params: SamplingParams | None = None, constraint: Any = None,
                        request_id: str | None = None, priority: float | None = None
                        ) -> AsyncIterator[RequestOutput]:
        """Validate now (ContextOverflowError raises here), then stream the request's outputs
        (``priority``: see `LLMEngine.make_sequence`)."""
        if self._stop:
            raise RuntimeError("the engine is shut down")
        if request_id is not None and request_id in self._sinks:
            raise ValueError(f"request id {request_id!r} is already streaming")
        seq = self.engine.make_sequence(prompt, params or SamplingParams(), constraint, request_id, priority)
        return self._stream(seq)

    async def _stream(self, seq: Sequence) -> AsyncIterator[RequestOutput]:
        import anyio

        send, recv = anyio.create_memory_object_stream(math.inf)
        rid = seq.request_id
        self._sinks[rid] = _Sink(send)
        self._submit(("add", seq))
        done = False
        try:
            async with recv:
                async for item in recv:
                    if isinstance(item, BaseException):
                        done = True
                        raise item
                    if item.error is not None:
                        done = True
                        raise item.error
                    if item.finished:
                        done = True
                    yield item
                    if done:
                        return
        finally:
            self._sinks.pop(rid, None)
            if not done:
                self._submit(("abort", rid))

    async def generate(self, prompt: str | list[int], params: SamplingParams | None = None,
                       constraint: Any = None, request_id: str | None = None,
                       priority: float | None = None) -> RequestOutput:
        """Run one request to completion and return its final output."""
        last = None
        async for out in self.generate_stream(prompt, params, constraint, request_id, priority):
            last = out
        assert last is not None
        return last

    def abort(self, request_id: str) -> None:
        self._submit(("abort", request_id))

    def shutdown(self) -> None:
        """Stop the loop thread; unfinished streams end with finish_reason "abort"."""
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=30)

    def __del__(self) -> None:
        self._stop = True
        self._wake.set()

    # ---- the loop thread -------------------------------------------------------------------------
    def _submit(self, cmd: tuple) -> None:
        self._cmds.put(cmd)
        self._wake.set()

    def _drain(self) -> None:
        eng = self.engine
        while True:
            try:
                op, arg = self._cmds.get_nowait()
            except queue.Empty:
                return
            if op == "add":
                try:
                    eng.add_sequence(arg)
                except Exception as exc:  # noqa: BLE001 - e.g. duplicate id
                    self._deliver_error(arg.request_id, exc)
            elif op == "abort":
                eng.abort_request(arg)

    def _deliver_error(self, rid: str, exc: BaseException) -> None:
        sink = self._sinks.get(rid)
        if sink is not None:
            sink.put(exc)

    def _run(self) -> None:
        eng = self.engine
        while not self._stop:
            self._wake.clear()
            self._drain()
            if not eng.has_unfinished_requests():
                self._wake.wait()
                continue
            tuner = self.thread_tuner
            if tuner is not None:
                tuner.before_step()
            t0 = time.perf_counter()
            try:
                outs = eng.step()
                if tuner is not None:
                    tuner.after_step(time.perf_counter() - t0, comparable=eng.last_step_decode_only)
            except Exception as exc:  # noqa: BLE001 - a failed step fails the requests in flight, not the loop
                for rid in list(eng._seqs):
                    eng.abort_request(rid)
                    self._deliver_error(rid, exc)
                eng.scheduler.release_finishing(all_=True)
                eng._pending.clear()
                continue
            for out in outs:
                sink = self._sinks.get(out.request_id)
                if sink is not None and not sink.put(out):
                    eng.abort_request(out.request_id)
        # shutting down: end every open stream
        self._drain()
        for rid in list(eng._seqs):
            eng.abort_request(rid)
        for out in eng.step():
            sink = self._sinks.get(out.request_id)
            if sink is not None:
                sink.put(out)
        if self.thread_tuner is not None:
            self.thread_tuner.restore()
