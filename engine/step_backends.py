"""The model step behind one interface: `StepInputs` (what the scheduler planned, as flat lists)
in, final hidden states out. Three backends: the torch forward (every step), the compiled pure
decode step (decode-only steps, with ``EngineConfig.compile``) and the fused C++ step
(``EngineConfig.fused_decode``). A new backend (another CPU kernel set, a CUDA one) implements
`StepBackend` and joins `ModelRunner`'s list."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch

from .kv_cache import KVCache
from .model import AttnMetadata, LlamaModel
from .sequence import Sequence

# the compiled decode step attends to contexts padded to a multiple of this many tokens
GRAPH_BUCKET = 128


@dataclass
class StepInputs:
    """One step's batch: B sequences' new tokens laid end to end (T rows); one-token entries first.

    token_ids: [T] the tokens to run; starts: [B + 1] each sequence's first row (and T at the end);
    context_lens: [B] tokens each sequence has in the cache after the step (earlier ones + its rows);
    block_tables: [B] each sequence's KV blocks; sample_rows / sample_seqs: the rows whose logits are
    sampled (a sequence's last row once its prompt or output is complete, and its draft rows;
    finishing tails excluded) and their sequences (a sequence with a draft appears once per row)."""

    token_ids: list[int]
    starts: list[int]
    context_lens: list[int]
    block_tables: list[list[int]]
    sample_rows: list[int]
    sample_seqs: list[Sequence]

    @property
    def num_rows(self) -> int:
        return self.starts[-1]

    @property
    def decode_only(self) -> bool:
        """Every sequence runs one row (T == B)."""
        return self.starts[-1] == len(self.starts) - 1

    @classmethod
    def from_entries(cls, entries: list[tuple[Sequence, int]]) -> StepInputs:
        """``entries``: (sequence, rows to compute from its first uncomputed token), as scheduled;
        rows past the sequence's tokens run its draft (`Sequence.draft_token_ids`), and each of
        them is sampled too (the draft's verification)."""
        inputs = cls([], [0], [], [], [], [])
        for seq, n in entries:
            nc = seq.num_computed_tokens
            end = nc + n
            drafted = max(0, end - len(seq.token_ids))
            inputs.token_ids.extend(seq.token_ids[nc:end])
            inputs.token_ids.extend(seq.draft_token_ids[:drafted])
            inputs.starts.append(inputs.starts[-1] + n)
            inputs.context_lens.append(end)
            inputs.block_tables.append(seq.block_table)
            if end - drafted == len(seq.token_ids) and not seq.finished:
                last = inputs.starts[-1] - 1
                inputs.sample_rows.extend(range(last - drafted, last + 1))
                inputs.sample_seqs.extend([seq] * (drafted + 1))
        return inputs


class StepBackend(Protocol):
    def supports(self, inputs: StepInputs) -> bool:
        """Whether this backend runs ``inputs``."""
        ...

    def run(self, inputs: StepInputs, all_rows: bool = False) -> torch.Tensor:
        """Write the rows' K/V to the cache; return the final hidden states of the sample rows
        [len(sample_rows), H] (``all_rows``: of every row, [T, H])."""
        ...


def block_slots(block_table: list[int], end: int, offsets: torch.Tensor) -> torch.Tensor:
    """[end] cache slots of a sequence's tokens 0..end-1; ``offsets`` is arange(block_size) (made once
    per backend: this runs per sequence per step)."""
    table = torch.tensor(block_table, device=offsets.device)
    return (table[:, None] * len(offsets) + offsets).view(-1)[:end]


def consecutive(block_table: list[int], num_tokens: int, block_size: int) -> bool:
    """Whether the blocks holding tokens 0..num_tokens-1 are consecutive in the pool (so their
    slots form one range and attention can read them as a view)."""
    nb = -(-num_tokens // block_size)
    first = block_table[0]
    return block_table[:nb] == list(range(first, first + nb))


def _select(hidden: torch.Tensor, inputs: StepInputs, all_rows: bool) -> torch.Tensor:
    if all_rows or inputs.sample_rows == list(range(inputs.num_rows)):
        return hidden
    return hidden[torch.tensor(inputs.sample_rows, dtype=torch.long, device=hidden.device)]


class EagerBackend:
    """`LlamaModel.forward`, any mix of decode rows and prefill chunks. Slots are computed
    arithmetically from the block tables; a sequence whose blocks are consecutive in the pool
    attends through a slice (a view of the cache) instead of a gather (``kv_views``)."""

    def __init__(self, model: LlamaModel, kv: KVCache, block_size: int):
        self.model, self.kv, self.block_size = model, kv, block_size
        self.device = kv.k.device
        self.offsets = torch.arange(block_size, device=self.device)
        self.kv_views = True

    def supports(self, inputs: StepInputs) -> bool:
        return True

    def run(self, inputs: StepInputs, all_rows: bool = False) -> torch.Tensor:
        input_ids, positions, meta = self.metadata(inputs)
        hidden = self.model.forward(input_ids, positions, meta, self.kv.k, self.kv.v)  # [T, H]
        return _select(hidden, inputs, all_rows)

    def metadata(self, inputs: StepInputs) -> tuple[torch.Tensor, torch.Tensor, AttnMetadata]:
        """input_ids [T], positions [T] and the `AttnMetadata` of ``inputs``."""
        bs, dev, views = self.block_size, self.device, self.kv_views
        pos: list[int] = []
        decode_slot_ids: list[int] = []  # new-token slots of the one-token entries (they come first)
        prefill_slot_parts: list[torch.Tensor] = []
        decodes: list[tuple[list[int], int]] = []  # (block table, context length)
        prefills = []
        for b, end in enumerate(inputs.context_lens):
            t, t_end = inputs.starts[b], inputs.starts[b + 1]
            nc = end - (t_end - t)
            table = inputs.block_tables[b]
            if t_end - t == 1:
                pos.append(nc)
                decode_slot_ids.append(table[nc // bs] * bs + nc % bs)
                decodes.append((table, end))
                continue
            pos.extend(range(nc, end))
            if views and consecutive(table, end, bs):
                first = table[0]
                slots: torch.Tensor | slice = slice(first * bs, first * bs + end)
                prefill_slot_parts.append(torch.arange(first * bs + nc, first * bs + end, device=dev))
            else:
                slots = block_slots(table, end, self.offsets)  # [end]
                prefill_slot_parts.append(slots[nc:end])
            mask = None
            if nc:  # query i (position nc+i) sees keys 0..nc+i
                mask = torch.arange(end, device=dev)[None, :] <= torch.arange(nc, end, device=dev)[:, None]
            prefills.append((t, t_end, slots, mask))
        slot_mapping = torch.tensor(decode_slot_ids, dtype=torch.long, device=dev)
        if prefill_slot_parts:
            slot_mapping = torch.cat([slot_mapping, *prefill_slot_parts])
        meta = AttnMetadata(slot_mapping=slot_mapping, num_decode=len(decodes), prefills=prefills)
        if decodes:
            meta.decode_slots, meta.decode_mask = self._decode_slots(decodes)
        return torch.tensor(inputs.token_ids, device=dev), torch.tensor(pos, device=dev), meta

    def _decode_slots(self, decodes: list[tuple[list[int], int]]
                      ) -> tuple[torch.Tensor | slice, torch.Tensor | None]:
        """What the one-token rows attend to: a slice when there is one and its blocks are
        consecutive, else the padded slots [B, Lmax] and, for unequal lengths, their mask."""
        bs, dev = self.block_size, self.device
        if len(decodes) == 1 and self.kv_views and consecutive(*decodes[0], bs):
            table, end = decodes[0]
            return slice(table[0] * bs, table[0] * bs + end), None
        lens = [end for _, end in decodes]
        slots = torch.nn.utils.rnn.pad_sequence([block_slots(t, end, self.offsets) for t, end in decodes],
                                                batch_first=True)  # [B, Lmax]
        if min(lens) == max(lens):
            return slots, None
        lt = torch.tensor(lens, device=dev)
        return slots, (torch.arange(max(lens), device=dev)[None, :] < lt[:, None])[:, None, None, :]


class CompiledDecodeBackend:
    """Decode-only steps through ``graph`` (``torch.compile`` of `LlamaModel.decode_graph`, a pure
    function of the batch and the bucketed context length, so a few compiled shapes serve every
    step); it returns the new K/V, written here in one op per cache for all layers."""

    def __init__(self, model: LlamaModel, kv: KVCache, block_size: int, graph: Callable[..., Any] | None = None):
        self.kv, self.block_size = kv, block_size
        self.offsets = torch.arange(block_size, device=kv.k.device)
        self.graph = graph or torch.compile(model.decode_graph, dynamic=True)

    def supports(self, inputs: StepInputs) -> bool:
        return inputs.decode_only

    def run(self, inputs: StepInputs, all_rows: bool = False) -> torch.Tensor:
        input_ids, positions, slot_mapping, kv_slots, kv_mask = self.prepare(inputs)
        hidden, k_new, v_new = self.graph(input_ids, positions, kv_slots, kv_mask,
                                          self.kv.k, self.kv.v)  # [B, H], [layers, B, nkv, hd]
        self.kv.k[:, slot_mapping] = k_new
        self.kv.v[:, slot_mapping] = v_new
        return _select(hidden, inputs, all_rows)

    def prepare(self, inputs: StepInputs) -> tuple[torch.Tensor, ...]:
        """input_ids [B], positions [B], slot_mapping [B], kv_slots [B, Lp] (each sequence's earlier
        tokens, Lp rounded up to a multiple of ``GRAPH_BUCKET`` so compiled shapes repeat) and
        kv_mask [B, 1, 1, Lp + 1]."""
        bs, dev = self.block_size, self.kv.k.device
        pos = [n - 1 for n in inputs.context_lens]  # = earlier tokens of each
        lp = -(-max(max(pos), 1) // GRAPH_BUCKET) * GRAPH_BUCKET
        kv_slots = torch.zeros(len(pos), lp, dtype=torch.long, device=dev)
        for b, (table, p) in enumerate(zip(inputs.block_tables, pos)):
            if p:
                kv_slots[b, :p] = block_slots(table, p, self.offsets)
        p_t = torch.tensor(pos, device=dev)
        kv_mask = torch.arange(lp + 1, device=dev)[None, :] < p_t[:, None]  # [B, Lp + 1]
        kv_mask[:, lp] = True  # the new token itself
        slot_mapping = torch.tensor([t[p // bs] * bs + p % bs for t, p in zip(inputs.block_tables, pos)], device=dev)
        return torch.tensor(inputs.token_ids, device=dev), p_t, slot_mapping, kv_slots, kv_mask[:, None, None, :]


class FusedBackend:
    """The C++ step (`decode_fused.FusedDecoder`): decode rows and prefill chunks in one call
    (``prefill``), or decode-only steps (with W8A8 prefill linears, which are torch's)."""

    def __init__(self, decoder: Any, kv: KVCache, block_size: int, prefill: bool):
        self.decoder, self.kv, self.block_size, self.prefill = decoder, kv, block_size, prefill

    def supports(self, inputs: StepInputs) -> bool:
        return self.prefill or inputs.decode_only

    def run(self, inputs: StepInputs, all_rows: bool = False) -> torch.Tensor:
        tables = inputs.block_tables
        width = max(len(t) for t in tables)
        dev = self.kv.k.device
        return self.decoder(torch.tensor(inputs.token_ids, device=dev), torch.tensor(inputs.starts, device=dev),
                            torch.tensor(inputs.context_lens, device=dev),
                            torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long, device=dev),
                            self.block_size, None if all_rows else torch.tensor(inputs.sample_rows, dtype=torch.long),
                            self.kv.k, self.kv.v)
