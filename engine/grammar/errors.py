"""Errors raised while turning a JSON Schema into a token automaton."""
from __future__ import annotations


class UnsupportedSchemaError(ValueError):
    """The schema uses keywords the grammar cannot enforce exactly.

    ``keywords`` lists every offending keyword (with its JSON pointer), so the caller can
    fix them all at once, or compile with ``lenient=True`` to enforce the rest and have the
    final output validated afterwards.
    """

    def __reduce__(self):
        return (type(self), (self.keywords,))

    def __init__(self, keywords: list[str]):
        self.keywords = list(keywords)
        super().__init__(
            "JSON Schema uses keywords that cannot be enforced by the grammar: "
            + "; ".join(self.keywords)
            + " (remove them, or compile with lenient=True to check them only after generation)"
        )


class GrammarCompileError(ValueError):
    """The schema could not be compiled (invalid schema, regex too large, or time limit hit)."""


class AutomatonTooLargeError(GrammarCompileError):
    """The schema's automaton passes the DFA builder's size limits; the message names the deepest part of
    the schema that passes them on its own, where one does."""


class UnsatisfiableSchemaError(GrammarCompileError):
    """No JSON value satisfies the schema (e.g. ``required`` lists every property while a
    ``oneOf`` demands exactly one of them): there is nothing a grammar could let the model write."""


class BudgetError(GrammarCompileError):
    """max_tokens is too small for the shortest complete value of the schema (a request
    error: callers that map GrammarCompileError to "bad request" cover it too)."""


class GrammarBusyError(GrammarCompileError):
    """Every compile slot is taken and the wait queue is full (or the wait ran past the time limit):
    nothing is wrong with the schema; try again in ``retry_after_s`` seconds."""

    def __init__(self, message: str, retry_after_s: int = 2):
        super().__init__(message, retry_after_s)
        self.retry_after_s = retry_after_s

    def __str__(self) -> str:
        return str(self.args[0])
