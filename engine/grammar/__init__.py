"""Grammar-constrained decoding: JSON Schema -> token automaton (outlines-core) -> per-request matcher."""
