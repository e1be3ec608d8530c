"""The HTTP server: ``/agent/run``, OpenAI-compatible ``/v1/chat/completions`` and ``/v1/responses``, metrics.

`create_app` builds a FastAPI app around one `LLM` (built once, in ``lifespan``, when none
is given: `LocalLLM` on the embedded model) and one `ToolRegistry`, both shared by every
request through ``Depends``. The chat API follows OpenAI's wire format (tools,
tool_choice, parallel_tool_calls, response_format, streaming tool-call deltas, usage with
``prompt_tokens_details.cached_tokens``), so the ``openai`` client, LangChain's
``ChatOpenAI`` and `agentrt.remote.RemoteLLM` talk to it unchanged. Tool-call arguments
are produced under a grammar built from the tools' JSON Schemas, never parsed after the
fact. Every error is an OpenAI-style ``{"error": {...}}`` body with a 4xx status saying
what to fix; a bounded admission queue answers 429 with ``Retry-After`` when full.

The server never runs anything but the registry's tools, and only in ``/agent/run``:
``/v1/chat/completions`` and ``/v1/responses`` return tool calls to the client, as OpenAI does.

Modules, one job each: `app` (create_app, lifespan, /health, /metrics), `openai_api`
(/v1/chat/completions, /v1/models), `responses_api` (/v1/responses, stateless) and
`responses_request` (a Responses request -> the chat request it amounts to), `agent_api`
(/agent/run, /tools), `request_models`
(the request bodies), `chat_request` (a request -> prompt plan and sampling settings,
checked), `streams` (generations held for a client, SSE), `errors` (OpenAI-style error
bodies and handlers), `limits` (API keys, body size, the admission queue), `metrics`
(Prometheus), `state` (what the routes share).
"""
from agentrt.server.app import create_app, default_server_registry
from agentrt.server.errors import APIError
from agentrt.server.limits import AdmissionQueue
from agentrt.server.metrics import ServerMetrics
from agentrt.server.request_models import AgentRunRequest, ChatCompletionRequest
from agentrt.server.state import ServerState

__all__ = ["APIError", "AdmissionQueue", "AgentRunRequest", "ChatCompletionRequest", "ServerMetrics",
           "ServerState", "create_app", "default_server_registry"]
