"""agentrt.engine: a compact local LLM engine (paged KV cache, prefix caching,
continuous batching, grammar-constrained decoding). Knows nothing of agents or tools."""
from .config import EngineConfig, SamplingParams
from .constraint import TokenConstraint
from .async_engine import AsyncLLMEngine
from .engine import ContextOverflowError, EngineStats, LLMEngine, RequestMetrics, RequestOutput

__all__ = ["AsyncLLMEngine", "ContextOverflowError", "EngineConfig", "EngineStats", "LLMEngine",
           "RequestMetrics", "RequestOutput", "SamplingParams", "TokenConstraint"]
