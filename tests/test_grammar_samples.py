"""`bench grammar`'s sampled soundness (grammar_samples): values drawn from a grammar and checked with
jsonschema, so an engine that drops a keyword is caught on schemas the data has no instances for."""
from __future__ import annotations

import json

import numpy as np

from agentrt.benchmarks import grammar as bench
from agentrt.benchmarks.grammar_samples import TokenSampler, case_rng, invalid_samples, sample_dfa
from agentrt.engine.grammar.compile_job import schema_to_dfa

SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 3}, "n": {"type": "integer"}},
          "required": ["city"], "additionalProperties": False}


def _dfa(schema):
    return schema_to_dfa(schema)[2]


def test_values_drawn_from_an_exact_grammar_are_all_valid_and_varied():
    samples = sample_dfa(_dfa(SCHEMA), case_rng("s"), 40)
    assert len(samples) >= 30  # walks finish
    assert invalid_samples(SCHEMA, samples) == []
    values = [json.loads(s) for s in samples]
    assert any("n" in v for v in values) and any("n" not in v for v in values)
    assert len({s for s in samples}) > 10
    assert sample_dfa(_dfa(SCHEMA), case_rng("s"), 40) == samples  # the same draws every run


def test_a_grammar_that_drops_a_keyword_generates_what_the_schema_rejects():
    loose = {**SCHEMA, "properties": {**SCHEMA["properties"], "city": {"type": "string"}}}  # maxLength dropped
    case = {"id": "loose", "schema": SCHEMA, "tests": []}
    res = bench.score_samples(case, bench.SchemaResult("loose", "exact"), sample_dfa(_dfa(loose), case_rng("x"), 40))
    assert res.status == "inexact" and res.generated_invalid > 0 and res.samples == 40
    assert res.examples[0].startswith("generated invalid {")
    not_json = bench.score_samples(case, bench.SchemaResult("x", "exact"), [b'{"city":"a"', b'{"city":"ab"}'])
    assert (not_json.status, not_json.generated_invalid) == ("inexact", 1)
    unreadable = {"type": "string", "pattern": "(?<=x"}  # jsonschema cannot check it: no verdict
    assert invalid_samples(unreadable, [b'"a"']) is None


def test_check_schema_samples_our_own_grammar():
    case = {"id": "c", "schema": SCHEMA, "tests": []}
    res = bench.check_schema(case, 20.0, samples=8)
    assert (res.status, res.generated_invalid) == ("exact", 0) and res.samples > 0
    row = bench._subset_row([res])
    assert row["samples"] == res.samples and row["schemas_generating_invalid"] == 0


class _ByteWalk:
    """A TokenWalk over a byte DFA whose tokens are single bytes (token id = byte value + 1; 0 is the stop token)."""

    def __init__(self, dfa):
        self.dfa, self.state = dfa, dfa.initial

    def allowed(self) -> np.ndarray:
        return self.dfa.live_bytes(self.state).astype(np.int64) + 1

    def can_stop(self) -> bool:
        return bool(self.dfa.final[self.state])

    def accept(self, token_id: int) -> bool:
        self.state = self.dfa.next(self.state, token_id - 1)
        return self.state != self.dfa.dead


def test_token_sampler_walks_a_peer_matcher_to_complete_values():
    dfa = _dfa(SCHEMA)
    sampler = TokenSampler({b + 1: bytes([b]) for b in range(256)}, 257)
    samples = sampler.sample(lambda: _ByteWalk(dfa), case_rng("t"), 20)
    assert len(samples) >= 15 and invalid_samples(SCHEMA, samples) == []
    assert all(dfa.fullmatch(s) for s in samples)
