"""`LLMEngine`: requests in, `RequestOutput`s out. It keeps the requests, asks the `Scheduler` for
each step's batch, has the `ModelRunner` compute it, samples, appends tokens (with the constraint's
jump-forward) and has the `OutputProcessor` turn tokens into text. `AsyncLLMEngine`
(engine.async_engine) runs its step loop in a thread."""
from __future__ import annotations

import logging
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any, Sequence as Seq

import torch

from .config import EngineConfig, SamplingParams
from .constraint import TokenConstraint
from .kv_cache import BlockManager
from .heap import cap_mmap_threshold, release_free_heap
from .model_runner import ModelRunner
from .output_processor import OutputProcessor, RequestMetrics, RequestOutput
from .prompt_length import TokenFloor
from .sampling import sample_constrained
from .scheduler import Scheduler
from .sequence import Sequence
from .speculation import draft_for

__all__ = ["ContextOverflowError", "EngineStats", "LLMEngine", "RequestMetrics", "RequestOutput"]

_DEFAULT_MAX_LEN_CAP = 8192
log = logging.getLogger(__name__)


class ContextOverflowError(ValueError):
    """The prompt plus max_tokens cannot fit the context window (or the KV pool)."""


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
    kv_blocks_pinned: int = 0  # held for the next request of a cache key (an agent run's next step)
    # prompt-lookup speculation (`engine.speculation`), since the engine started
    draft_tokens_proposed: int = 0  # draft rows run
    draft_tokens_accepted: int = 0  # of them, kept as output
    draft_verify_steps: int = 0  # sequence-steps that verified a draft

    @property
    def draft_acceptance_rate(self) -> float:
        return self.draft_tokens_accepted / max(1, self.draft_tokens_proposed)

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hit_tokens / max(1, self.prefix_cache_queried_tokens)


class LLMEngine:
    """The synchronous engine: one `step()` computes one batch (decodes plus prefill chunks).

    Pass ``loaded`` (an `engine.loader.LoadedModel`) to reuse weights already in memory;
    otherwise ``config.model`` is loaded with `engine.loader.load_model`.
    """

    def __init__(self, config: EngineConfig, loaded: Any = None):
        cap_mmap_threshold()
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        if loaded is None:
            from .loader import load_model

            loaded = load_model(config.model)
        self.config, why_not_fused = config.resolved(loaded.quant_type)
        if why_not_fused:
            log.warning("%s: running the torch path, unquantized: %s", loaded.name, why_not_fused)
        config = self.config
        self.tokenizer = loaded.tokenizer
        self._token_floor = TokenFloor(self.tokenizer)
        self.eos_token_ids: list[int] = list(loaded.eos_token_ids)
        self.model_name: str = loaded.name
        hf_max = int(loaded.config.get("max_position_embeddings") or _DEFAULT_MAX_LEN_CAP)
        self.max_model_len: int = config.max_model_len or min(hf_max, _DEFAULT_MAX_LEN_CAP)
        self.runner = ModelRunner(config, loaded, self.max_model_len)
        self.model, self.kv, self.device = self.runner.model, self.runner.kv, self.runner.device
        self.vocab_size: int = self.model.args.vocab_size
        self.block_manager = BlockManager(self.kv.num_blocks, config.block_size, config.enable_prefix_caching,
                                          copy_kv=self.kv.copy_block_prefix, pin_ttl_s=config.kv_pin_ttl_s)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        self.outputs = OutputProcessor(self.tokenizer)
        # drafts are verified in multi-row chunks, which only the fused step computes exactly like the
        # single rows a request would otherwise run: elsewhere speculation could change greedy output
        fused_everywhere = self.runner.fused is not None and self.runner.fused.prefill
        # the live setting (a benchmark may turn it off and on between requests)
        self.num_speculative_tokens: int = config.num_speculative_tokens if fused_everywhere else 0
        self._draft_counts = [0, 0, 0]  # proposed, accepted, verify steps
        self._seqs: dict[str, Sequence] = {}
        self._pending: list[RequestOutput] = []  # outputs produced outside a step (aborts, instant finishes)
        self.last_step_decode_only = False  # whether the last step computed one token per sequence (for timing)
        del loaded  # the checkpoint's tensors (unless the caller keeps them), then the heap they leave behind
        release_free_heap()

    # ---- requests -------------------------------------------------------------------------------
    def make_sequence(self, prompt: str | list[int], params: SamplingParams,
                      constraint: TokenConstraint | None = None, request_id: str | None = None,
                      priority: float | None = None) -> Sequence:
        """Validate and tokenize a request (no engine state is touched). Raises ContextOverflowError
        if the prompt plus ``params.max_tokens`` does not fit.

        ``priority``: scheduling order, lower first, on the `time.perf_counter` clock (None = the
        arrival time, i.e. FIFO); e.g. an agent run's start time, so its later steps go ahead of
        work that arrived after the run started."""
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        if priority is not None and not math.isfinite(priority):
            raise ValueError(f"priority must be a finite number, got {priority!r}")
        if isinstance(prompt, str):
            self.check_prompt_text(prompt)
        ids = _prompt_ids(self.tokenizer, prompt, self.vocab_size)
        total = len(ids) + params.max_tokens
        if total > self.max_model_len:
            raise ContextOverflowError(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) = {total} exceeds the "
                f"context window of {self.max_model_len} tokens; shorten the prompt or lower max_tokens")
        if self.block_manager.blocks_needed(total) > self.block_manager.num_blocks:
            raise ContextOverflowError(
                f"prompt + max_tokens = {total} tokens exceeds the KV pool "
                f"({self.block_manager.num_blocks} blocks of {self.block_manager.block_size}); raise num_kv_blocks")
        gen = None if params.seed is None else torch.Generator(device=self.device).manual_seed(params.seed)
        return Sequence(request_id=request_id or uuid.uuid4().hex, token_ids=ids, num_prompt_tokens=len(ids),
                        params=params, constraint=constraint, generator=gen, priority=priority)

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
                self.outputs.discard(seq.request_id)
                raise
            if done:
                self._pending.append(self._finish(seq))
                return seq.request_id
        self.scheduler.add(seq)
        return seq.request_id

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    constraint: TokenConstraint | None = None, request_id: str | None = None,
                    priority: float | None = None) -> str:
        """Queue a request; returns its id. Raises ContextOverflowError before any work if it cannot fit."""
        return self.add_sequence(self.make_sequence(prompt, params or SamplingParams(), constraint, request_id,
                                                    priority))

    def abort_request(self, request_id: str) -> None:
        """Stop a request and free its KV blocks (its last output has finish_reason "abort")."""
        seq = self._seqs.get(request_id)
        if seq is None or seq.finished:
            return
        seq.finish_reason = "abort"
        self._pending.append(self._finish(seq))

    def abort_all(self) -> list[str]:
        """Abort every unfinished request (their last outputs come from the next `step`); returns their ids."""
        ids = list(self._seqs)
        for rid in ids:
            self.abort_request(rid)
        return ids

    def fail_all(self) -> list[str]:
        """After a step raised: end every request, drop their outputs and release all finishing
        tails, so the engine is idle and consistent; returns the ids that were unfinished."""
        ids = self.abort_all()
        self.scheduler.release_finishing(all_=True)
        self._pending.clear()
        return ids

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._pending)

    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(waiting=len(self.scheduler.waiting), running=len(self.scheduler.running),
                           kv_blocks_total=bm.num_blocks, kv_blocks_used=bm.num_used,
                           kv_blocks_cached=bm.num_cached, prefix_cache_hit_tokens=bm.hit_tokens,
                           prefix_cache_queried_tokens=bm.queried_tokens, finishing=len(self.scheduler.finishing),
                           kv_blocks_pinned=bm.num_pinned, draft_tokens_proposed=self._draft_counts[0],
                           draft_tokens_accepted=self._draft_counts[1], draft_verify_steps=self._draft_counts[2])

    def release_cache_key(self, key: str) -> None:
        """Unpin ``key``'s blocks, and let none of its sequences still in flight pin again (the run that
        used the key is over; its last step may still be computing its tail for the cache)."""
        sched = self.scheduler
        for seq in (*sched.waiting, *sched.running, *sched.finishing):
            if seq.cache_key == key:
                seq.cache_key = None
        self.block_manager.unpin(key)

    def check_prompt_text(self, text: str) -> None:
        """Raise `ContextOverflowError` for a prompt text that cannot fit the context window whatever
        its tokens, without tokenizing it (see `engine.prompt_length`)."""
        floor = self._token_floor(text)
        if floor >= self.max_model_len:
            raise ContextOverflowError(
                f"the prompt has at least {floor} tokens ({len(text)} characters; no token of this model spells "
                f"more than {self._token_floor.max_token_chars}): over the context window of {self.max_model_len} "
                "tokens; shorten the prompt")

    def describe(self) -> str:
        """Which path runs the steps (`ModelRunner.describe`) and whether greedy requests speculate."""
        n = self.num_speculative_tokens
        return self.runner.describe() + (f", prompt-lookup speculation (up to {n} draft tokens)" if n else "")

    def decode_weight_bytes(self) -> int:
        """See `ModelRunner.decode_weight_bytes`."""
        return self.runner.decode_weight_bytes()

    # ---- the step -------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Run one batch; return an output for every request that produced text or finished.

        Finished requests' uncomputed tails (see `Scheduler.finish`) ride along in the batch; their
        rows are not sampled, and their blocks are released into the prefix cache after it."""
        with self.runner.threads_for_step():
            return self._step()

    def _step(self) -> list[RequestOutput]:
        outputs, self._pending = self._pending, []
        if self.num_speculative_tokens:
            self._propose_drafts()
        plan = self.scheduler.schedule()
        if plan is None or not plan.entries:
            self.last_step_decode_only = False
            return outputs
        inputs = self.runner.prepare(plan.entries)
        self.last_step_decode_only = inputs.decode_only
        hidden = self.runner.execute(inputs)  # [N, H], N = len(inputs.sample_rows)
        logits = self.runner.compute_logits(hidden) if inputs.sample_seqs else None  # [N, V] float32
        for seq, n in plan.entries:
            seq.num_computed_tokens += min(n, seq.num_uncomputed)  # draft rows count once verified
            self.block_manager.commit_full_blocks(seq)
        self.scheduler.release_finishing()
        if logits is not None:
            outputs.extend(self._append_sampled(inputs.sample_seqs, logits))
        return outputs

    def _propose_drafts(self) -> None:
        """Give each greedy running sequence that is past its prompt a draft to verify this step,
        while the batch is small enough for draft rows to be cheap."""
        c, running = self.config, self.scheduler.running
        small_batch = len(running) <= c.speculation_max_batch
        for seq in running:
            if small_batch and seq.params.greedy and seq.num_computed_tokens >= seq.num_prompt_tokens:
                limit = min(self.num_speculative_tokens, seq.draft_limit or self.num_speculative_tokens)
                seq.draft_token_ids = draft_for(seq, limit, c.prompt_lookup_min, c.prompt_lookup_max,
                                                self.max_model_len)
            else:
                seq.draft_token_ids = []

    def _append_sampled(self, seqs: list[Sequence], logits: torch.Tensor) -> list[RequestOutput]:
        """Sample the rows of ``logits`` (one per entry of ``seqs``; a sequence verifying a draft has
        consecutive rows) and append the tokens; returns one output per sequence."""
        now = time.perf_counter()
        spans = _row_spans(seqs)  # (sequence, first row, rows)
        single_rows = [row for _, row, k in spans if k == 1]
        rows = logits if len(single_rows) == len(seqs) else logits[single_rows]  # no [N, V] copy without drafts
        picked = {single_rows[i]: t for i, t in sample_constrained([seqs[r] for r in single_rows], rows).items()}
        outputs = []
        for seq, row, k in spans:
            if seq.first_token_time is None:
                seq.first_token_time = now
            if k > 1:
                self._verify_draft(seq, logits[row:row + k])
            elif row in picked and not seq.finished:
                self._append_sampled_token(seq, picked[row])
            outputs.append(self._finish(seq) if seq.finished else self.outputs.output(seq))
        return outputs

    def _verify_draft(self, seq: Sequence, logits: torch.Tensor) -> None:
        """Greedy verification. logits: [d + 1, V], the rows after ``seq``'s tokens and after each
        of its d draft tokens. Samples row by row as decoding alone would (mask, argmax, append,
        jump-forward), going on while the tokens appended equal the draft's start, so the output is
        the same as without the draft; the K/V of the draft tokens kept become computed."""
        draft, seq.draft_token_ids = seq.draft_token_ids, []
        start, row = len(seq.token_ids), 0
        while True:
            picked = sample_constrained([seq], logits[row:row + 1])
            if not picked or seq.finished:
                break
            self._append_sampled_token(seq, picked[0])
            new = seq.token_ids[start:]
            if seq.finished or len(new) > len(draft) or new != draft[:len(new)]:
                break
            row = len(new)
        new = seq.token_ids[start:]
        kept = next((i for i, (a, b) in enumerate(zip(new, draft)) if a != b), min(len(new), len(draft)))
        seq.num_computed_tokens += kept
        seq.draft_tokens_accepted += kept
        seq.draft_limit = kept + 1
        self.block_manager.commit_full_blocks(seq)
        counts = self._draft_counts
        counts[0], counts[1], counts[2] = counts[0] + len(draft), counts[1] + kept, counts[2] + 1

    def _append_sampled_token(self, seq: Sequence, token: int) -> None:
        """Append a sampled token and what the constraint forces after it; a refused token or a
        failing constraint ends this sequence alone."""
        try:
            if self._append(seq, token, forced=False) is None:
                self._after_tokens(seq)
        except Exception as exc:  # noqa: BLE001 - the constraint refused a token or failed
            seq.error, seq.finish_reason = exc, "abort"

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
        self.outputs.update(seq)  # a stop string may end it too
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

    def _finish(self, seq: Sequence) -> RequestOutput:
        """Retire a finished sequence; returns its final output."""
        seq.finish_time = time.perf_counter()
        self.scheduler.finish(seq)  # an abort frees now; a stop/length may keep its tail for one more step
        self._seqs.pop(seq.request_id, None)
        return self.outputs.output(seq)

    def prompt_logits(self, token_ids: list[int], chunk_size: int | list[int] | None = None) -> torch.Tensor:
        """Logits [T, vocab] (float32) at every position of ``token_ids`` (for tests and accuracy
        benches), computed ``chunk_size`` tokens per step (default max_num_batched_tokens; a list gives
        the first chunks' sizes, its last one repeating) through the backend `step` would take (see
        `ModelRunner.prompt_logits`). Uses free KV blocks temporarily, no prefix cache; call only
        while no other thread is stepping the engine."""
        sizes = list(chunk_size) if isinstance(chunk_size, (list, tuple)) else [chunk_size]
        seq = self.make_sequence(list(token_ids), SamplingParams(max_tokens=1))
        if not self.block_manager.can_grow(seq, len(seq.token_ids)):
            raise RuntimeError("not enough free KV blocks for prompt_logits; let running requests finish")
        self.block_manager.grow(seq, len(seq.token_ids))
        try:
            return self.runner.prompt_logits(seq, [n or self.config.max_num_batched_tokens for n in sizes])
        finally:
            self.block_manager.free(seq)

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


def _row_spans(seqs: list[Sequence]) -> list[tuple[Sequence, int, int]]:
    """(sequence, first row, number of rows) for each run of the same sequence in ``seqs``."""
    spans: list[tuple[Sequence, int, int]] = []
    for row, seq in enumerate(seqs):
        if spans and spans[-1][0] is seq:
            spans[-1] = (seq, spans[-1][1], spans[-1][2] + 1)
        else:
            spans.append((seq, row, 1))
    return spans


def _prompt_ids(tokenizer: Any, prompt: str | list[int], vocab_size: int) -> list[int]:
    """A prompt's token ids, checked: a text is tokenized; ids must be in the vocabulary."""
    if isinstance(prompt, str):
        ids = list(tokenizer(prompt).input_ids)
    else:
        ids = [int(t) for t in prompt]
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompt token ids out of range [0, {vocab_size}): {bad[:5]}")
    if not ids:
        raise ValueError("empty prompt: give at least one token")
    return ids
