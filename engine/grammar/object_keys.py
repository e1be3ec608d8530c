"""Keys an object may have beyond the ones it names: JSON Schema lets any other key through
(valued by ``additionalProperties``) unless the schema closes the object. The grammar writes
them after the named properties, so what it needs is a regex for "a JSON string that is none
of these names" (the named keys have their own entries and value schemas).
"""
from __future__ import annotations

import functools

from .regex_util import STRING_CHAR, alt, char_class, complement, intersect, json_chars, json_literal_text, lit, seq


# characters written as themselves in one byte: the trie exclusion is spelled out for these only
_SIMPLE = [(0x20, 0x21), (0x23, 0x5B), (0x5D, 0x7E)]
_OTHER = json_chars(complement(_SIMPLE))  # multi-byte and escaped characters


def other_key(names: list[str], max_nodes: int = 4_000) -> str:
    """Regex for a compact JSON string (quotes included) whose value is not in ``names``.

    Strings have one canonical encoding (regex_util.STRING), so excluding each name's canonical
    text excludes the name. On the trie of the names' code points, such a string either stops at
    a trie node where no name ends, or leaves the trie (a node's path, then a character none of
    its children has) and goes on freely. The wide parts occur once, so that the automaton has
    about one state per trie node: the free rest ``STRING_CHAR*`` is factored out, and leaving by
    a multi-byte or escaped character is one shared class after the set of node paths (per node
    only where a child is such a character). A trie of more than ``max_nodes`` nodes is cut at
    the depth that keeps it within: keys sharing a cut prefix with a name are then not generated
    (narrower, never wider).
    """
    trie: dict = {}
    for name in names:
        node = trie
        for ch in name:
            node = node.setdefault(ch, {})
        node[None] = True  # a name ends here

    cut = _cut_depth(trie, max_nodes)

    def walk(node: dict, depth: int = 0) -> tuple[str | None, str | None, str | None]:
        """(strings that stop in this subtrie, prefixes leaving it by a one-byte character or a
        special child's sibling, paths to nodes whose children are all one-byte), from ``node``."""
        if depth == cut:
            return (None if None in node else ""), None, None
        children = sorted(c for c in node if c is not None)
        special = tuple(ord(c) for c in children if not _is_simple(c))
        stops: list[str | None] = [] if None in node else [""]
        leaves: list[str | None] = [_simple_except(tuple(ord(c) for c in children if _is_simple(c)))]
        if special:
            leaves.append(_others_except(special))
        paths: list[str | None] = [] if special else [""]
        for ch in children:
            sub_stop, sub_leave, sub_paths = walk(node[ch], depth + 1)
            head = _char_lit(ch)
            stops.append(seq(head, sub_stop))
            leaves.append(seq(head, sub_leave))
            paths.append(seq(head, sub_paths))
        return _alt_opt(stops), _alt_opt(leaves), _alt_opt(paths)

    stop, leave, paths = walk(trie)
    leave = alt([leave, seq(paths, _OTHER)])
    return '"' + alt([seq(leave, f"{STRING_CHAR}*"), stop]) + '"'  # type: ignore[operator]


# a trie's nodes mostly have one child, or a few, among a hundred one-byte characters: the classes
# repeat within a schema and across schemas (range arithmetic per node was most of an open object's cost)
@functools.lru_cache(maxsize=8192)
def _simple_except(points: tuple[int, ...]) -> str:
    """The class of the one-byte characters other than ``points``."""
    return char_class(intersect(_SIMPLE, complement([(p, p) for p in points])))


@functools.lru_cache(maxsize=4096)
def _char_lit(ch: str) -> str:
    """The regex of one character as a JSON string writes it."""
    return lit(json_literal_text(ch)[1:-1])


@functools.lru_cache(maxsize=1024)
def _others_except(points: tuple[int, ...]) -> str:
    """The multi-byte and escaped characters other than ``points``."""
    return json_chars(complement(_SIMPLE + [(p, p) for p in points]))


def _cut_depth(trie: dict, max_nodes: int) -> int:
    """The largest depth whose nodes (counted level by level) stay within ``max_nodes``."""
    level, total, depth = [trie], 1, 0
    while level:
        nxt = [child for node in level for c, child in node.items() if c is not None]
        if not nxt:
            return depth + 1  # the whole trie fits
        total += len(nxt)
        if total > max_nodes:
            return max(depth, 1)
        level, depth = nxt, depth + 1
    return depth + 1


def _is_simple(ch: str) -> bool:
    return any(lo <= ord(ch) <= hi for lo, hi in _SIMPLE)


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
