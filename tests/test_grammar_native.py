"""The C++ regex -> byte DFA builder (native_dfa) against outlines-core's: the same language on every
construct the schema compiler writes and on real schemas' regexes; what it does not parse falls back,
what is too large fails with a message and takes nothing down."""
from __future__ import annotations

import numpy as np
import pytest

from agentrt.engine.grammar import GrammarCompileError
from agentrt.engine.grammar import native_dfa
from agentrt.engine.grammar.byte_dfa import ByteDFA, byte_classes, minimized, outlines_regex_to_dfa, regex_to_dfa
from agentrt.engine.grammar.dfa_ops import has_placeholder
from agentrt.engine.grammar.schema_regex import schema_to_parts
from agentrt.benchmarks.grammar import DATA, load_subset

SENTINEL_LEAD = 0xF4  # outlines-core's path keeps this byte for its end sentinel: it allows no text with it


@pytest.fixture(scope="module")
def lib():
    built = native_dfa.library()
    if built is None:
        pytest.skip("no C++ compiler here to build engine/grammar/regex_dfa.cpp (outlines-core is used instead)")
    return built


def native(lib, regex: str) -> ByteDFA:
    got = native_dfa.compile_regex(lib, regex)
    assert got is not None, f"refused: {regex}"
    return ByteDFA.from_columns(got[0], got[2], got[1], 0)


def difference(a: ByteDFA, b: ByteDFA) -> str | None:
    """None when both accept the same texts (texts holding byte 0xF4 aside), else where they part."""
    seen = {(a.initial, b.initial)}
    todo = [(a.initial, b.initial, b"")]
    while todo:
        x, y, text = todo.pop()
        if bool(a.final[x]) != bool(b.final[y]):
            return f"after {text!r}: may end {bool(a.final[x])} vs {bool(b.final[y])}"
        la, lb = a.row(x) != a.dead, b.row(y) != b.dead
        la[SENTINEL_LEAD] = lb[SENTINEL_LEAD] = False
        if not np.array_equal(la, lb):
            return f"after {text!r}: bytes {np.flatnonzero(la ^ lb)[:8].tolist()} allowed by one only"
        for byte in np.flatnonzero(la).tolist():
            key = (a.next(x, byte), b.next(y, byte))
            if key not in seen:
                seen.add(key)
                todo.append((*key, text + bytes([byte])))
    return None


CONSTRUCTS = [
    r"abc", r"", r"a|b|", r"(?:ab|a)(?:bc)?", r"(ab)+c", r"[a-c]*b[a-c]*", r"[a-z]{2,4}", r"x{3}", r"x{2,}",
    r"(?:a|bc){0,3}d", r"(?:a*)*b", r"(?:|a)+", r"\x{20}\x41\.\\\[\]\{\}\(\)\|\*\+\?\-\$\^\#\&\~",
    r"[\x{20}-\x{21}\x{23}-\x{5B}\x{5D}-\x{D7FF}\x{E000}-\x{10FFFF}]*", r"[^a-z\x{100}-\x{FFFF}]{1,2}",
    r"[]a]", r"[a-]", r"[-a]", r"[$&'()*+,;=:@/?\-]+", r"\x{7F}\x{80}\x{7FF}\x{800}\x{FFFF}\x{10000}",
    r'"(?:[\x{20}-\x{21}\x{23}-\x{5B}\x{5D}-\x{D7FF}\x{E000}-\x{10FFFF}]|\\(?:["\\bfnrt]|u00(?:0[0-7bef]|1[0-9a-f])))*"',
    r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?", "é+ü?\u4e2d", r"\n\t\r\x01\x1F",
    # groups met again are looked up by their text: parens inside classes and escapes must not pair up
    r"(?:a[)(]b)x(?:a[)(]b)+(?:a[)(]b){2}", r"(?:\((?:c|d)\))(?:\((?:c|d)\))?(?:c|d)*", r"([]()])([]()])*",
    r"(?:[^)])(?:[^)]|\))", r"(a(b)c)(b)(a(b)c)?",
]


@pytest.mark.parametrize("regex", CONSTRUCTS)
def test_each_construct_builds_the_language_outlines_core_builds(lib, regex):
    assert difference(native(lib, regex), outlines_regex_to_dfa(regex)) is None


def test_real_schemas_regexes_build_the_same_language(lib):
    if not (DATA / "maskbench" / "Glaiveai2K.jsonl").exists():
        pytest.skip("../shared/data (MaskBench schemas) is not here")
    checked = 0
    for subset in ["Glaiveai2K", "BFCL_multiple", "Github_trivial", "Handwritten"]:
        for case in load_subset(subset, DATA)[:12]:
            try:
                regex, _, holes = schema_to_parts(case["schema"], timeout_s=5, split_objects=True)
            except Exception:  # noqa: BLE001 - refused schemas have no regex to compare
                continue
            for r in [regex] + [p for piece in holes.values() for p in piece if isinstance(p, str)]:
                assert difference(native(lib, r), outlines_regex_to_dfa(r)) is None, (case["id"], r[:200])
                checked += 1
    assert checked > 30


def moore_states(dfa: ByteDFA) -> int:
    """States of the minimal DFA of ``dfa`` (the dead one not counted), by Moore's refinement: the
    slow, plain reference for the C++ minimizer."""
    columns = dfa.table[:, np.unique(byte_classes(dfa.table)[0], return_index=True)[1]]  # [S + 1, C]
    block = dfa.final.astype(np.int64)
    count = len(np.unique(block))
    while True:
        _, block = np.unique(np.concatenate([block[:, None], block[columns]], axis=1), axis=0, return_inverse=True)
        block = block.reshape(-1)
        if block.max() + 1 == count:
            return count - 1
        count = block.max() + 1


def test_minimizing_merges_exactly_the_states_no_text_tells_apart(lib):
    """outlines-core's DFAs are not minimal: ``minimized`` keeps their language and reaches the minimal size;
    ours come out of the builder minimal already (equal subexpressions share NFA states, then Hopcroft)."""
    regexes = list(CONSTRUCTS)
    for case in load_subset("Github_easy", DATA)[:8]:
        regex, _, holes = schema_to_parts(case["schema"], timeout_s=5, split_objects=True)
        regexes += [regex] + [p for piece in holes.values() for p in piece if isinstance(p, str)]
    shrunk = 0
    for r in regexes:
        theirs = outlines_regex_to_dfa(r)
        small = minimized(theirs)
        assert difference(small, theirs) is None, r[:200]
        assert small.num_states == moore_states(theirs), r[:200]
        shrunk += small.num_states < theirs.num_states
        ours = native(lib, r)
        assert minimized(ours).num_states == ours.num_states, r[:200]
    assert shrunk >= 5


def test_plane_16_characters_are_text_like_any_other(lib):
    dfa = regex_to_dfa(r'"[\x{20}-\x{10FFFF}]*"')
    assert dfa.fullmatch('"a\U0010FFFD"'.encode()) and dfa.fullmatch('"\U00100000"'.encode())
    assert not dfa.fullmatch(b'"\xf4\x90\x80\x80"')  # past U+10FFFF: not UTF-8


def test_syntax_it_does_not_parse_falls_back_to_outlines_core(lib):
    assert native_dfa.compile_regex(lib, r"a.c") is None
    assert native_dfa.compile_regex(lib, r"a+?") is None
    dfa = regex_to_dfa(r"a.c")
    assert dfa.fullmatch(b"abc") and not dfa.fullmatch(b"a\nc")


def test_a_regex_past_the_size_limits_fails_with_a_message(lib, monkeypatch):
    with pytest.raises(GrammarCompileError, match="too large to compile: its regex passed 2000000 NFA states"):
        regex_to_dfa(r"(?:[a-z]{0,9}x){0,300000}")
    monkeypatch.setattr(native_dfa, "MAX_STATES", 1000)
    with pytest.raises(GrammarCompileError, match="its automaton passed 1000 states"):
        regex_to_dfa(r"[a-z]{0,2000}")
    assert regex_to_dfa(r"[a-z]{0,500}").fullmatch(b"ab")  # below the limit, after the failure


def test_a_schema_too_large_to_compile_names_the_part_that_is_too_large_alone(lib, monkeypatch):
    from agentrt.engine.grammar.compile_job import schema_to_dfa
    from agentrt.engine.grammar.errors import AutomatonTooLargeError

    monkeypatch.setenv("AGENTRT_GRAMMAR_MAX_STATES", "3000")
    schema = {"type": "object", "properties": {
        "ok": {"type": "string"},
        "big": {"type": "object", "properties": {"n": {"type": "integer"}, "text": {"type": "string", "maxLength": 800}}}}}
    with pytest.raises(AutomatonTooLargeError, match="passed 3000 states.*; /properties/big/properties/text is too large"):
        schema_to_dfa(schema, False, 10)
    by_ref = {"$defs": {"T": {"type": "string", "maxLength": 900}}, "type": "array", "items": {"$ref": "#/$defs/T"}}
    with pytest.raises(AutomatonTooLargeError, match="; /items is too large on its own"):
        schema_to_dfa(by_ref, False, 10)
    # too large only together (~1,700 states each): no part to name, the message as it was
    pair = {"type": "object", "properties": {"a": {"type": "string", "maxLength": 120},
                                            "b": {"type": "string", "maxLength": 120}}, "required": ["a", "b"]}
    with pytest.raises(AutomatonTooLargeError) as failed:
        schema_to_dfa(pair, False, 10)
    assert "passed 3000 states" in str(failed.value) and "on its own" not in str(failed.value)


def test_a_dfa_pickles_as_its_byte_classes_and_comes_back_the_same():
    import pickle

    dfa = regex_to_dfa(r'\{"a":"(?:[\x{20}-\x{21}\x{23}-\x{5B}\x{5D}-\x{10FFFF}])*","n":-?[0-9]+\}')
    blob = pickle.dumps(dfa, protocol=pickle.HIGHEST_PROTOCOL)
    back = pickle.loads(blob)
    assert np.array_equal(back.table, dfa.table) and np.array_equal(back.final, dfa.final)
    assert back.initial == dfa.initial and back.columns.dtype == dfa.columns.dtype == np.uint16  # ids < 65,536
    assert dfa.columns.nbytes < dfa.table.nbytes / 4 and len(blob) < dfa.table.nbytes / 4  # ~30 byte classes, not 256


@pytest.mark.parametrize("subset", ["MCPspec", "Github_easy"])
def test_a_dfa_spliced_from_parts_accepts_what_the_whole_regexs_dfa_does(lib, subset):
    """A splice makes its table in byte classes refined from its parts' (each part's columns picked by a
    byte of each class): on real schemas (objects in properties and array items as parts), the spliced DFA
    and the DFA of the same schema as one regex accept the same texts, and a pickle brings it back whole."""
    import pickle

    from agentrt.engine.grammar.compile_job import _to_dfa
    from agentrt.engine.grammar.errors import GrammarCompileError as CompileError, UnsupportedSchemaError

    spliced = 0
    for case in load_subset(subset, DATA)[:40]:
        try:
            regex, _, parts = _to_dfa(case["schema"], False, 10, split_objects=True)
            _, _, whole = _to_dfa(case["schema"], False, 10, split_objects=False)
        except (UnsupportedSchemaError, CompileError):
            continue
        back = pickle.loads(pickle.dumps(parts))
        assert np.array_equal(back.columns, parts.columns) and np.array_equal(back.classes, parts.classes)
        if has_placeholder(regex):
            assert difference(parts, whole) is None, case["id"]
            spliced += 1
    assert spliced >= 5


def test_without_a_working_cxx_compiler_outlines_core_builds_the_dfas(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("AGENTRT_CACHE_DIR", str(tmp_path))  # nothing built there yet
    monkeypatch.setenv("CXX", "/bin/false")
    with caplog.at_level("WARNING", logger="agentrt.grammar"):
        assert native_dfa.library.__wrapped__() is None
    assert "C++ DFA builder is not available" in caplog.text and "using outlines-core" in caplog.text
    assert not list(tmp_path.rglob("*.so"))


def test_the_trie_walk_agrees_with_numpys_on_every_state(lib):
    """A state's allowed tokens walked down the vocabulary's trie in C++ (with whole subtrees taken where
    their bytes loop on a string's body or count its length) equal numpy's token-by-token walk: 16-bit
    and 32-bit columns, tokens of the same bytes, a token that is a prefix of others, bytes past ASCII."""
    from agentrt.engine.grammar.token_walk import TokenTable
    from agentrt.engine.grammar.vocab import TokenVocab

    rng = np.random.default_rng(0)
    alphabet = list(b'ab"\\{}:,0123 ') + [0xC3, 0xA9, 0xE2, 0x9C, 0x93]
    pieces = {bytes(rng.choice(alphabet, size=int(rng.integers(1, 7)))) for _ in range(3000)}
    token_bytes = dict(enumerate(sorted(pieces) + [b"ab", b"ab", b'"', b'a"b']))
    table = TokenTable(TokenVocab(token_bytes, [len(token_bytes)], len(token_bytes) + 1, "plain"))
    assert table.trie.tokens == len(token_bytes)
    small = regex_to_dfa(r'\{"k":"([^"\\]|\\["\\nt])*","n":(0|[1-9][0-9]{0,3})\}')
    wide = regex_to_dfa(r'"[ab]{0,70000}"')  # a counter past 65,536 states: 32-bit columns
    # a length-limited string whose characters fall in several byte classes (digits count like letters here,
    # not after "n")
    counted = regex_to_dfa(r'\{"s":"[ !#-\[\]-~]{0,9}","n":[0-9]+\}')
    assert small.columns.dtype == np.uint16 and wide.columns.dtype == np.int32
    for dfa, states in ((small, small.reachable().tolist()), (counted, counted.reachable().tolist()),
                        (wide, [0, 1, 2, 40_000, 69_999, 70_001])):
        for s in states:
            table._native = lib
            got = table.walk(dfa, s)
            table._native = None
            expect = table.walk(dfa, s)
            assert got[0].tolist() == expect[0].tolist() and got[1].tolist() == expect[1].tolist(), s
