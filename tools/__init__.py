"""Built-in tools, each an ordinary @tool function."""
