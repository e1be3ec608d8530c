"""Keys an object may have beyond the ones it names: JSON Schema lets any other key through
(valued by ``additionalProperties``) unless the schema closes the object. The grammar writes
them after the named properties, so what it needs is a regex for "a JSON string that is none
of these names" (the named keys have their own entries and value schemas).
"""
from __future__ import annotations

from .regex_util import STRING_CHAR, alt, complement, json_chars, json_literal_text, lit, seq


def other_key(names: list[str]) -> str:
    """Regex for a compact JSON string (quotes included) whose value is not in ``names``.

    Strings have one canonical encoding (regex_util.STRING), so excluding each name's canonical
    text excludes the name. On the trie of the names' code points, such a string either stops at
    a trie node where no name ends, or leaves the trie (a node's path, then a character none of
    its children has) and goes on freely. The free part is factored out so ``STRING_CHAR*``
    occurs once: every copy of that wide class costs the DFA construction dearly.
    """
    trie: dict = {}
    for name in names:
        node = trie
        for ch in name:
            node = node.setdefault(ch, {})
        node[None] = True  # a name ends here

    def walk(node: dict) -> tuple[str | None, str | None]:
        """(strings that stop inside this subtrie, prefixes that leave it), relative to ``node``."""
        children = sorted(c for c in node if c is not None)
        stops: list[str | None] = [] if None in node else [""]
        leaves: list[str | None] = [json_chars(complement([(ord(c), ord(c)) for c in children]))]
        for ch in children:
            sub_stop, sub_leave = walk(node[ch])
            head = lit(json_literal_text(ch)[1:-1])
            stops.append(seq(head, sub_stop))
            leaves.append(seq(head, sub_leave))
        return _alt_opt(stops), _alt_opt(leaves)

    stop, leave = walk(trie)
    return '"' + alt([seq(leave, f"{STRING_CHAR}*"), stop]) + '"'  # type: ignore[operator]


def _alt_opt(parts: list[str | None]) -> str | None:
    """Alternation where an empty-string part makes the rest optional."""
    nonempty = [p for p in parts if p]
    if not nonempty:
        return "" if "" in parts else None
    body = alt(nonempty)
    return body if "" not in parts else f"(?:{body})?"


def extras_tail(pair: str, started: bool) -> str:
    """Zero or more extra ``"key":value`` pairs after the named properties (``started``: a
    property was already written, so each pair is preceded by a comma)."""
    if started:
        return f"(?:,{pair})*"
    return f"(?:{pair}(?:,{pair})*)?"
