"""A stdio MCP server that misbehaves on purpose (raw JSON-RPC, no SDK: the SDK would not let it).

    python tests/helpers/mcp_misbehaving.py MODE

MODE: ``malformed`` lists tools that are not valid MCP (no name, a string for a schema);
``silent`` never answers the handshake; ``hang`` answers ``slow`` calls never (and ``echo`` ones at
once); ``unsupported`` lists one tool whose schema the grammar cannot enforce beside a good one.
"""
from __future__ import annotations

import json
import sys

GOOD_TOOL = {"name": "echo", "description": "Echo the text back.",
             "inputSchema": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}}
TOOLS = {
    "malformed": [{"description": "a tool without a name", "inputSchema": "not a schema"}],
    "hang": [GOOD_TOOL, {"name": "slow", "description": "Never answers.",
                         "inputSchema": {"type": "object", "properties": {}}}],
    "unsupported": [GOOD_TOOL, {"name": "scale", "description": "Scale by a multiple of 0.3.",
                                "inputSchema": {"type": "object", "required": ["factor"],
                                                "properties": {"factor": {"type": "number", "multipleOf": 0.3}}}}],
}


def answer(request_id: object, result: dict) -> None:
    sys.stdout.write(json.dumps({"jsonrpc": "2.0", "id": request_id, "result": result}) + "\n")
    sys.stdout.flush()


def main(mode: str) -> None:
    for line in sys.stdin:
        message = json.loads(line)
        method, request_id = message.get("method"), message.get("id")
        if request_id is None or mode == "silent":  # notifications; or play dead
            continue
        if method == "initialize":
            answer(request_id, {"protocolVersion": message["params"]["protocolVersion"],
                                "capabilities": {"tools": {}}, "serverInfo": {"name": mode, "version": "0"}})
        elif method == "tools/list":
            answer(request_id, {"tools": TOOLS[mode]})
        elif method == "tools/call" and message["params"]["name"] == "echo":
            text = message["params"]["arguments"]["text"]
            answer(request_id, {"content": [{"type": "text", "text": text}]})
        # tools/call of "slow": no answer, ever


if __name__ == "__main__":
    main(sys.argv[1])
