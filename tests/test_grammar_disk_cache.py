"""The compiled grammars' disk cache: a size cap with least-recently-used eviction, shared safely by
concurrent writers (engine/grammar/disk_cache.py)."""
from __future__ import annotations

import threading
import time

import pytest

from agentrt.engine.grammar import GrammarCompiler, GrammarMatcher
from agentrt.engine.grammar.disk_cache import DiskCache, max_bytes_from_env
from tests.helpers.grammar import sentencepiece_tokenizer

BLOB = b"x" * 10_000


def test_writes_past_the_cap_evict_the_least_recently_used(tmp_path):
    cache = DiskCache(tmp_path, "vocab-a", max_bytes=35_000)
    for key in "abc":
        cache.save(key, BLOB)
        time.sleep(0.01)  # distinct mtimes
    assert cache.load("a") == BLOB  # "a" is now the most recently used
    time.sleep(0.01)
    cache.save("d", BLOB)
    other = DiskCache(tmp_path, "vocab-b", max_bytes=35_000)  # another tokenizer, the same cap
    time.sleep(0.01)
    other.save("e", BLOB)
    kept = {p.stem for _, _, p in cache.entries()}
    assert kept == {"a", "d", "e"}, kept
    assert cache.size_bytes() <= 35_000
    assert cache.load("b") is None and cache.load("c") is None


def test_a_writer_far_below_the_cap_does_not_list_the_folder_each_time(tmp_path, monkeypatch):
    cache = DiskCache(tmp_path, "v", max_bytes=450_000)
    listings = []
    real = cache.entries
    monkeypatch.setattr(cache, "entries", lambda: listings.append(1) or real())
    for i in range(20):
        cache.save(f"k{i}", BLOB)  # 200 KB in all: below half the cap
        time.sleep(0.002)  # distinct mtimes
    assert len(listings) == 1  # the first write learns the folder's size
    for i in range(20, 50):
        cache.save(f"k{i}", BLOB)
        time.sleep(0.002)
    assert len(listings) > 20  # past half the cap: every write checks
    assert cache.size_bytes() <= 450_000 and len(cache.entries()) == 45
    assert cache.load("k0") is None and cache.load("k49") == BLOB


def test_an_entry_larger_than_the_cap_is_not_written(tmp_path):
    cache = DiskCache(tmp_path, "v", max_bytes=5_000)
    cache.save("small", b"y")
    cache.save("big", BLOB)
    assert cache.load("big") is None and cache.load("small") == b"y"


def test_concurrent_writers_leave_whole_entries_within_the_cap(tmp_path):
    caches = [DiskCache(tmp_path, "v", max_bytes=100_000) for _ in range(4)]  # as separate processes would
    errors: list[BaseException] = []

    def writer(i: int) -> None:
        try:
            for j in range(30):
                caches[i].save(f"k{j % 12}", bytes([i]) * 10_000)
                caches[(i + 1) % 4].load(f"k{(j + 5) % 12}")
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert caches[0].size_bytes() <= 100_000
    for _, _, path in caches[0].entries():
        value = caches[0].load(path.stem)
        assert value is None or (len(value) == 10_000 and len(set(value)) == 1)  # never a torn write
    assert not list((tmp_path / "v").glob("*.tmp"))


def test_a_corrupt_entry_is_a_miss(tmp_path):
    tok = sentencepiece_tokenizer()
    comp = GrammarCompiler.from_tokenizer(tok, vocab_size=len(tok) + 3, cache_dir=str(tmp_path))
    schema = {"type": "integer"}
    comp.compile_json_schema(schema)
    (path,) = [p for _, _, p in comp.disk_cache.entries()]
    path.write_bytes(b"not a pickle")
    fresh = GrammarCompiler(comp.vocab, comp._encode, cache_dir=str(tmp_path))
    assert fresh.compile_json_schema(schema).from_cache == ""  # rebuilt
    assert fresh.compile_json_schema(schema).from_cache == "memory"


def test_size_cap_from_the_environment(monkeypatch):
    monkeypatch.setenv("AGENTRT_GRAMMAR_CACHE_MB", "1.5")
    assert max_bytes_from_env() == 1.5 * (1 << 20)
    monkeypatch.setenv("AGENTRT_GRAMMAR_CACHE_MB", "lots")
    with pytest.raises(ValueError, match="size cap in MB"):
        max_bytes_from_env()
    monkeypatch.delenv("AGENTRT_GRAMMAR_CACHE_MB")
    assert max_bytes_from_env() == 256 << 20


def test_compiler_keeps_its_disk_cache_under_the_cap(tmp_path):
    tok = sentencepiece_tokenizer()
    probe = GrammarCompiler.from_tokenizer(tok, vocab_size=len(tok) + 3, cache_dir=str(tmp_path / "probe"))
    probe.compile_json_schema({"type": "object", "properties": {"p0": {"type": "integer"}}})
    one = probe.disk_cache.size_bytes()
    comp = GrammarCompiler(probe.vocab, probe._encode, cache_dir=str(tmp_path / "capped"),
                           cache_max_bytes=int(2.5 * one))
    for i in range(6):
        comp.compile_json_schema({"type": "object", "properties": {f"p{i}": {"type": "integer"}}})
    assert 0 < comp.disk_cache.size_bytes() <= 2.5 * one
    assert len(comp.disk_cache.entries()) == 2


def test_the_memory_cache_is_bounded_in_bytes(tmp_path):
    tok = sentencepiece_tokenizer()
    probe = GrammarCompiler.from_tokenizer(tok, vocab_size=len(tok) + 3, cache_dir=str(tmp_path))
    one = probe.compile_json_schema({"type": "object", "properties": {"p0": {"type": "integer"}}}).nbytes
    comp = GrammarCompiler(probe.vocab, probe._encode, cache_dir=str(tmp_path), memory_cache_bytes=int(3.5 * one))
    for i in range(8):
        comp.compile_json_schema({"type": "object", "properties": {f"p{i}": {"type": "integer"}}})
    assert comp.memory_cache_bytes() <= 3.5 * one and len(comp._memory) == 3


def test_masks_a_grammar_builds_count_against_the_memory_cache(tmp_path):
    # a grammar's automaton is small; the masks and allowed-token arrays its requests build are not, so
    # they are counted too, and a grammar grown by use makes room at the next compile, a cache hit included
    tok = sentencepiece_tokenizer()
    probe = GrammarCompiler.from_tokenizer(tok, vocab_size=len(tok) + 3, cache_dir=str(tmp_path))
    schema = {"type": "object", "properties": {"p": {"type": "string"}}}
    other = {"type": "object", "properties": {"q": {"type": "integer"}}}
    both = probe.compile_json_schema(schema).nbytes + probe.compile_json_schema(other).nbytes
    comp = GrammarCompiler(probe.vocab, probe._encode, cache_dir=str(tmp_path), memory_cache_bytes=both)
    used = comp.compile_json_schema(schema)
    comp.compile_json_schema(other)
    assert len(comp._memory) == 2 and used.nbytes == used.automaton_bytes  # both fit, exactly
    matcher = GrammarMatcher(used)
    for _ in range(6):  # states visited: each builds its mask and allowed ids
        matcher.next_token_mask()
        ids, ends = used.successors(matcher.state)
        going_on = [t for t, s in zip(ids.tolist(), ends.tolist()) if used.may_continue(s)]  # not into the end
        matcher.accept_token(going_on[0])
    grown = used.nbytes - used.automaton_bytes
    held = sum(ids.nbytes + ends.nbytes for ids, ends in used._successors.values())
    assert grown >= len(used._masks) * probe.vocab.vocab_size + held > 0
    assert comp.memory_cache_bytes() == both + grown
    kept = comp.compile_json_schema(other)  # a hit: the grown grammar (least recently used) is dropped now
    assert list(comp._memory.values()) == [kept] and comp.memory_cache_bytes() == kept.nbytes
