"""Grammar-constrained decoding: JSON Schema -> regex (our own, exact, see schema_regex) ->
token automaton (outlines-core ``Index``) -> per-request matcher (the engine's TokenConstraint).

    compiler = GrammarCompiler.from_tokenizer(tokenizer, vocab_size=engine.vocab_size)
    grammar = compiler.compile_json_schema(schema)        # cached in memory and on disk
    engine.add_request(prompt, params, constraint=GrammarMatcher(grammar, max_tokens=params.max_tokens))
"""
from .automaton import ByteAutomaton, configure_compiles
from .budget import TokenDistances, distances, min_tokens
from .compiler import CompiledGrammar, GrammarCompiler, default_cache_dir
from .errors import BudgetError, GrammarBusyError, GrammarCompileError, UnsupportedSchemaError
from .matcher import GrammarMatcher
from .schema_regex import schema_to_regex
from .vocab import TokenVocab, vocab_from_tokenizer

__all__ = [
    "BudgetError", "ByteAutomaton", "CompiledGrammar", "GrammarBusyError", "GrammarCompileError", "GrammarCompiler",
    "GrammarMatcher", "configure_compiles", "distances", "min_tokens",
    "TokenDistances", "TokenVocab", "UnsupportedSchemaError", "default_cache_dir", "schema_to_regex",
    "vocab_from_tokenizer",
]
