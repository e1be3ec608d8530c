"""agentrt.engine: a compact local LLM engine (paged KV cache, prefix caching,
continuous batching, grammar-constrained decoding). Knows nothing of agents or tools."""
# Imported on first use (PEP 562): the grammar's compile workers import agentrt.engine.grammar
# without torch (see grammar/compile_job.py).
_EXPORTS = {
    ".async_engine": ["AsyncLLMEngine"],
    ".config": ["EngineConfig", "SamplingParams"],
    ".constraint": ["TokenConstraint"],
    ".engine": ["ContextOverflowError", "EngineStats", "LLMEngine", "RequestMetrics", "RequestOutput"],
}
__all__ = [name for names in _EXPORTS.values() for name in names]


def __getattr__(name: str):
    from .lazy_exports import export

    return export(globals(), _EXPORTS, name)
