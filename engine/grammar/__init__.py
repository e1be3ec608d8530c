"""Grammar-constrained decoding: JSON Schema -> regex (our own, exact, see schema_regex) -> byte DFA
(our C++ builder, native_dfa; outlines-core where that is unavailable) -> per-request matcher (the
engine's TokenConstraint); a state's allowed tokens are computed when a matcher first reaches it
(token_walk).

    compiler = GrammarCompiler.from_tokenizer(tokenizer, vocab_size=engine.vocab_size)
    grammar = compiler.compile_json_schema(schema)        # cached in memory and on disk
    engine.add_request(prompt, params, constraint=GrammarMatcher(grammar, max_tokens=params.max_tokens))
"""
# Imported on first use (PEP 562), so a compile worker that needs only the schema -> DFA chain
# (compile_job) never imports torch: see compile_job.py.
_EXPORTS = {
    ".automaton": ["configure_compiles"],
    ".budget": ["TokenDistances", "distances", "min_tokens"],
    ".byte_dfa": ["ByteAutomaton", "ByteDFA"],
    ".compiler": ["CompiledGrammar", "GrammarCompiler"],
    ".disk_cache": ["default_cache_dir"],
    ".errors": ["BudgetError", "GrammarBusyError", "GrammarCompileError", "UnsupportedSchemaError"],
    ".matcher": ["GrammarMatcher"],
    ".schema_regex": ["schema_to_regex"],
    ".vocab": ["TokenVocab", "vocab_from_tokenizer"],
}
__all__ = [name for names in _EXPORTS.values() for name in names]

def __getattr__(name: str):
    from ..lazy_exports import export

    return export(globals(), _EXPORTS, name)
