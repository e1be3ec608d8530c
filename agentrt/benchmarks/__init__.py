"""`agentrt bench ...` and `agentrt eval ...` implementations, one module each."""
