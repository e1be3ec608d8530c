"""Function -> pydantic model -> grammar-friendly JSON Schema.

One pure module: it inspects a Python function (signature, type hints, docstring)
and produces

* an arguments model (``pydantic.BaseModel``) used to validate and convert the
  model's arguments before the call, and
* a self-contained JSON Schema of those arguments that the grammar compiler can
  enforce: every object closed (``additionalProperties: false``), ``$ref``s inlined
  (no ``$defs``: the planner nests tool schemas inside a larger schema, where a
  ``#/$defs/...`` pointer would no longer resolve), no ``title`` noise, property
  order = parameter order (the grammar forces keys in schema order), ``Optional[X]``
  as ``anyOf [X, null]``, parameters with a default left out of ``required``.

Every problem in a definition is collected and raised once as a
:class:`ToolDefinitionError`, so a user fixes them all in one go.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import re
import types
import typing
from typing import Any, Callable

import docstring_parser
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, create_model
from pydantic.fields import FieldInfo

__all__ = [
    "FunctionSchema",
    "ParamInfo",
    "ToolDefinitionError",
    "clean_json_schema",
    "function_schema",
    "name_problem",
]

# OpenAI's rule for function names (so tools pass through /v1/chat/completions unchanged),
# starting with a letter or '_' so every model reads it as an identifier.
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")


class ToolDefinitionError(TypeError):
    """A function cannot become a tool; ``problems`` lists every reason found."""

    def __init__(self, name: str, problems: list[str]):
        self.tool_name = name
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"cannot make a tool of {name!r} ({len(self.problems)} problem(s)):\n{lines}")


@dataclasses.dataclass(frozen=True)
class ParamInfo:
    """How one schema property maps back onto the function's parameter."""

    name: str  # the parameter's (and the JSON property's) name
    field_name: str  # the attribute name on the arguments model (differs only for reserved names)
    positional_only: bool


@dataclasses.dataclass(frozen=True)
class FunctionSchema:
    """Everything the registry needs to present and call a function as a tool."""

    name: str
    description: str
    args_model: type[BaseModel]
    json_schema: dict[str, Any]
    params: tuple[ParamInfo, ...]
    context_param: str | None  # the injected RunContext parameter, if any
    is_async: bool


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a tool name, or None when it can."""
    if isinstance(name, str) and _NAME_RE.match(name):
        return None
    return f"tool name {name!r} must start with a letter or '_' and use only letters, digits, '_' and '-' (max 64)"


def _is_context(annotation: Any, context_types: tuple[type, ...]) -> bool:
    """True for ``RunContext``, ``RunContext[Deps]``, subclasses, ``Optional[...]`` of them
    and any of these inside ``Annotated``."""
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        return len(members) == 1 and _is_context(members[0], context_types)
    origin = typing.get_origin(annotation) or annotation
    return inspect.isclass(origin) and bool(context_types) and issubclass(origin, context_types)


def _annotated_description(annotation: Any) -> str | None:
    """The description set by ``Annotated[X, Field(description=...)]``, if any."""
    if typing.get_origin(annotation) is not typing.Annotated:
        return None
    for meta in typing.get_args(annotation)[1:]:
        if isinstance(meta, FieldInfo) and meta.description:
            return meta.description
    return None


def _describe(doc: docstring_parser.Docstring) -> str:
    """The tool description: the docstring's summary and body, without its sections."""
    parts = [p.strip() for p in (doc.short_description, doc.long_description) if p and p.strip()]
    return "\n\n".join(parts)


def _unpartial(fn: Callable[..., Any]) -> Callable[..., Any]:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return fn


def _docstring(fn: Callable[..., Any]) -> str:
    """The docstring of a function, or of a callable object's class or ``__call__``."""
    doc = inspect.getdoc(fn)
    if not doc and not (inspect.isfunction(fn) or inspect.ismethod(fn)) and hasattr(fn, "__call__"):
        doc = inspect.getdoc(type(fn).__call__)
    return doc or ""


def _is_async(fn: Callable[..., Any]) -> bool:
    target = _unpartial(fn)
    if inspect.iscoroutinefunction(target):
        return True
    call = getattr(target, "__call__", None)  # callable objects with an async __call__
    return call is not None and not inspect.isfunction(target) and inspect.iscoroutinefunction(call)


def function_schema(
    fn: Callable[..., Any],
    *,
    name: str | None = None,
    description: str | None = None,
    context_types: tuple[type, ...] = (),
    localns: dict[str, Any] | None = None,
) -> FunctionSchema:
    """Inspect ``fn`` and build its arguments model and JSON Schema.

    Args:
        fn: a sync or async function (or callable object) with type hints on every
            parameter that the model must fill.
        name: the tool name; defaults to ``fn.__name__``.
        description: the tool description; defaults to the docstring's summary and body.
        context_types: classes whose parameters are injected by the runtime (the
            registry passes ``RunContext``) and kept out of the schema.
        localns: extra names for resolving string annotations (``from __future__
            import annotations``) of types defined inside a function: the registry
            passes the decorating frame's locals.

    Raises:
        ToolDefinitionError: listing every problem found (missing hints, unsupported
            types, ``*args``/``**kwargs``, bad names, undocumented docstring params...).
    """
    inner = _unpartial(fn)
    tool_name = name or getattr(inner, "__name__", None) or type(inner).__name__
    problems: list[str] = [p for p in [name_problem(tool_name)] if p]
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError) as exc:
        raise ToolDefinitionError(tool_name, [f"cannot read its signature: {exc}"]) from exc
    hints, hint_problems = _resolve_hints(fn, signature, localns or {})
    problems.extend(hint_problems)
    doc = docstring_parser.parse(_docstring(inner))
    doc_params = _documented_params(doc)

    fields: dict[str, Any] = {}
    params: list[ParamInfo] = []
    context_param: str | None = None
    for pname, param in signature.parameters.items():
        annotation = hints.get(pname, inspect.Parameter.empty)
        variadic = param.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        if not variadic and annotation is not inspect.Parameter.empty and _is_context(annotation, context_types):
            if context_param is not None:
                problems.append(f"parameter {pname!r}: only one run-context parameter is allowed")
            context_param = pname
            continue
        field = _param_field(pname, param, annotation, doc_params.get(pname))
        if isinstance(field, str):
            problems.append(field)
        elif field is not None:
            fields[field[0]] = field[1]
            params.append(ParamInfo(pname, field[0], param.kind is inspect.Parameter.POSITIONAL_ONLY))
    problems += _stray_doc_params(doc_params, inner, signature)
    if not problems:
        args_model, schema = _args_model(tool_name, fields, problems)
    if problems:
        raise ToolDefinitionError(tool_name, problems)
    return FunctionSchema(
        name=tool_name,
        description=description if description is not None else _describe(doc),
        args_model=args_model,
        json_schema=schema,
        params=tuple(params),
        context_param=context_param,
        is_async=_is_async(fn),
    )


def _documented_params(doc: docstring_parser.Docstring) -> dict[str, str]:
    """{parameter: its docstring description}."""
    out: dict[str, str] = {}
    for entry in doc.params:  # NumPy style may document several at once: "x, y : int"
        for arg in entry.arg_name.split(","):
            out[arg.strip().lstrip("*")] = (entry.description or "").strip()
    return out


def _param_field(pname: str, param: inspect.Parameter, annotation: Any, doc: str | None
                 ) -> tuple[str, tuple[Any, Any]] | str | None:
    """(field name, (annotation, FieldInfo)) of one parameter the model fills, the problem with it
    (a str), or None (its hint did not resolve: reported already)."""
    if param.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
        star = "*" if param.kind is inspect.Parameter.VAR_POSITIONAL else "**"
        return f"parameter {star}{pname}: variadic parameters cannot be described by a schema"
    if annotation is _UNRESOLVED:
        return None
    if annotation is inspect.Parameter.empty:
        return f"parameter {pname!r} has no type hint"
    if pname.startswith("_"):
        return f"parameter {pname!r}: names starting with '_' cannot be schema properties"
    try:
        adapter = TypeAdapter(annotation)
        adapter.json_schema()
    except Exception as exc:  # noqa: BLE001 - pydantic's reasons vary by type; each becomes a named problem
        return (f"parameter {pname!r}: unsupported type {_type_name(annotation)} ({_first_sentence(exc)}); "
                "use JSON-describable types: str, int, float, bool, list, dict, Literal, Enum, "
                "Optional, pydantic models, dataclasses, TypedDict")
    # Parameters that shadow BaseModel attributes (json, copy, schema...) get an internal
    # field name and keep their real name as the alias the model and the schema use.
    field_name = pname if not hasattr(BaseModel, pname) else f"{pname}_param_"
    info_kwargs: dict[str, Any] = {}
    if field_name != pname:
        info_kwargs["alias"] = pname
    if not _annotated_description(annotation) and doc:
        info_kwargs["description"] = doc
    default = ... if param.default is inspect.Parameter.empty else param.default
    if default is not ... and not _default_fits(adapter, default):
        fix = f"; annotate it Optional[{_type_name(annotation)}]" if default is None else ""
        return f"parameter {pname!r}: its default {default!r} is not a valid {_type_name(annotation)}{fix}"
    return field_name, (annotation, Field(default, **info_kwargs))


def _stray_doc_params(doc_params: dict[str, str], inner: Callable[..., Any], signature: inspect.Signature
                      ) -> list[str]:
    """Docstring entries for parameters the function does not have."""
    try:  # a partial's docstring documents the wrapped function's parameters
        documentable = set(inspect.signature(inner).parameters) | set(signature.parameters)
    except (TypeError, ValueError):
        documentable = set(signature.parameters)
    return [f"the docstring documents {d!r}, which is not a parameter" for d in doc_params if d not in documentable]


def _args_model(tool_name: str, fields: dict[str, Any], problems: list[str]
                ) -> tuple[type[BaseModel] | None, dict[str, Any]]:
    """The arguments model and its cleaned JSON Schema (a failure is appended to ``problems``)."""
    model_name = "".join(part.capitalize() for part in re.split(r"[^A-Za-z0-9]+", tool_name) if part) + "Args"
    try:
        args_model = create_model(  # type: ignore[call-overload]
            model_name or "ToolArgs",
            __config__=ConfigDict(extra="forbid", populate_by_name=True, arbitrary_types_allowed=False),
            **fields,
        )
        return args_model, clean_json_schema(args_model.model_json_schema(mode="validation"))
    except Exception as exc:  # noqa: BLE001 - collected with the other problems, raised once
        problems.append(f"cannot build its schema: {type(exc).__name__}: {_first_line(exc)}")
        return None, {}


def _resolve_hints(
    fn: Callable[..., Any], signature: inspect.Signature, localns: dict[str, Any]
) -> tuple[dict[str, Any], list[str]]:
    """Each parameter's evaluated annotation, one at a time so a bad one names itself."""
    target = fn if inspect.isfunction(fn) or inspect.ismethod(fn) else getattr(fn, "__call__", fn)
    target = inspect.unwrap(getattr(target, "__func__", target))
    globalns = dict(getattr(target, "__globals__", {}))
    try:
        nonlocals = dict(inspect.getclosurevars(target).nonlocals)
    except (TypeError, ValueError):
        nonlocals = {}
    namespace = {**localns, **nonlocals}
    hints: dict[str, Any] = {}
    problems: list[str] = []
    for pname, param in signature.parameters.items():
        if param.annotation is inspect.Parameter.empty:
            continue

        class _Holder:  # get_type_hints evaluates string annotations of any object carrying them
            __annotations__ = {pname: param.annotation}

        try:
            hints[pname] = typing.get_type_hints(_Holder, globalns=globalns, localns=namespace,
                                                 include_extras=True)[pname]
        except Exception as exc:  # noqa: BLE001 - typos and names defined nowhere we can see
            shown = param.annotation.strip("'\"") if isinstance(param.annotation, str) else _type_name(param.annotation)
            problems.append(f"parameter {pname!r}: cannot resolve its type hint '{shown}': "
                            f"{type(exc).__name__}: {exc}")
            hints[pname] = _UNRESOLVED
    return hints, problems


_UNRESOLVED = object()


def _default_fits(adapter: TypeAdapter[Any], default: Any) -> bool:
    """Whether a default passes validation (the model is shown it, and may repeat it)."""
    try:
        adapter.validate_python(default)
        return True
    except Exception:  # noqa: BLE001 - any failure means the default does not validate
        return False


def _first_sentence(exc: BaseException) -> str:
    return _first_line(exc).split(". ")[0].rstrip(".")


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or repr(annotation)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# Keys whose values are maps from names to schemas (their keys are NOT keywords, so a
# property called "title" or "default" survives the cleaning).
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_SINGLE = ("items", "additionalProperties", "not", "contains", "propertyNames", "if", "then", "else")


# keywords beside which an object is left as it is: it says what other keys do, or a combinator
# may add keys of its own that closing would refuse
_OPENS_OR_COMBINES = ("additionalProperties", "unevaluatedProperties", "allOf", "anyOf", "oneOf", "$ref", "if", "then",
                      "else", "dependentSchemas", "dependencies")


def close_objects(schema: Any) -> Any:
    """``schema`` with its objects closed where that can only narrow it: a subschema that lists
    ``properties`` and says nothing of other keys gets ``additionalProperties: false``.

    JSON Schema lets such an object have any other key, and an exact grammar generates them (after
    the named ones); a tool's arguments want the named keys only (small models invent keys). Only
    subschemas in positive places are closed (property and item values, anyOf branches beside no
    properties of their own): closing a member of allOf (or an anyOf branch beside properties)
    would refuse its siblings' keys, and one under oneOf / not / if / contains, or a definition a
    ``$ref`` may reach from there, would admit values the original refuses."""
    if isinstance(schema, list):  # draft 4's tuple form of items
        return [close_objects(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in ("properties", "patternProperties"):
        if isinstance(out.get(key), dict):
            out[key] = {name: close_objects(sub) for name, sub in out[key].items()}
    for key in ("items", "prefixItems", "additionalProperties"):
        if key in out:
            out[key] = close_objects(out[key])
    if isinstance(out.get("anyOf"), list) and not any(k in out for k in ("properties", "patternProperties")):
        out["anyOf"] = close_objects(out["anyOf"])
    if isinstance(out.get("properties"), dict) and not any(k in out for k in _OPENS_OR_COMBINES):
        out["additionalProperties"] = False
    return out


# String formats that grammar backends (outlines-core and agentrt's own) can enforce;
# other formats are dropped from the schema rather than left to block compilation.
GRAMMAR_FORMATS = frozenset({"date", "time", "date-time", "uuid", "email"})

_SHAPE_KEYS = ("type", "enum", "const", "anyOf", "oneOf", "allOf", "not", "properties", "items", "prefixItems",
               "additionalProperties", "$ref")


def clean_json_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """Make a pydantic JSON Schema self-contained and grammar-friendly.

    Inlines every ``$ref`` (raising ``ValueError`` for recursive types, which a finite
    grammar cannot inline), drops ``title`` keywords and ``uniqueItems`` (sets dedupe
    on validation; a regex grammar cannot enforce it), closes objects that list
    properties, turns ``allOf: [one]`` wrappers into their one member, spells
    ``Any`` out as an ``anyOf`` of every JSON type, and keeps only the string formats
    in :data:`GRAMMAR_FORMATS`.
    """
    defs = schema.get("$defs", {})

    def resolve(node: Any, stack: tuple[str, ...]) -> Any:
        if isinstance(node, list):
            return [resolve(n, stack) for n in node]
        if not isinstance(node, dict):
            return node
        node = dict(node)
        ref = node.pop("$ref", None)
        if ref is not None:
            if not ref.startswith("#/$defs/"):
                raise ValueError(f"unsupported $ref {ref!r}")
            key = ref[len("#/$defs/"):]
            if key in stack:
                raise ValueError(f"recursive type {key!r} cannot be inlined into a finite grammar")
            target = resolve(copy.deepcopy(defs[key]), stack + (key,))
            target.update({k: resolve(v, stack) for k, v in node.items()})  # siblings (description) win
            return target
        out: dict[str, Any] = {}
        if "discriminator" in node and "oneOf" in node:
            # pydantic's discriminated union: the branches differ in a const tag, so they are
            # exclusive and anyOf says the same thing in the form every grammar supports.
            node["anyOf"] = node.pop("oneOf")
        for key, value in node.items():
            if key == "discriminator":  # an OpenAPI annotation whose mapping points into $defs
                continue
            if key == "format" and value not in GRAMMAR_FORMATS:
                continue  # e.g. path, binary, duration, uri: pydantic still validates the value
            if key in ("title", "$defs", "definitions", "uniqueItems"):
                # uniqueItems comes from set[...] parameters, which validation dedupes anyway;
                # a regex grammar cannot enforce it, so it would only block compilation.
                continue
            if key in _SCHEMA_MAPS and isinstance(value, dict):
                out[key] = {name: resolve(sub, stack) for name, sub in value.items()}
            elif key in _SCHEMA_LISTS or key in _SCHEMA_SINGLE:
                out[key] = resolve(value, stack)
            else:
                out[key] = value  # enum, const, default, examples: data, kept verbatim
        all_of = out.get("allOf")
        if isinstance(all_of, list) and len(all_of) == 1 and isinstance(all_of[0], dict):
            inner = out.pop("allOf")[0]
            out = {**inner, **out}
        if not any(k in out for k in _SHAPE_KEYS):
            # ``Any``: a schema with only annotations (description, default) names no shape, and
            # grammar backends (outlines-core) refuse it; spell "any JSON value" out instead.
            out["anyOf"] = [{"type": t} for t in ("string", "number", "boolean", "null", "object", "array")]
        if out.get("type") == "object" and "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return _ordered(out)

    return resolve(schema, ())


# Readers (people, and small models shown a schema in a prompt) take in a schema best
# in this order; JSON Schema semantics do not depend on it.
_KEY_ORDER = ("type", "description", "enum", "const", "format", "pattern", "properties", "required",
              "additionalProperties", "items", "prefixItems", "anyOf", "oneOf", "allOf")


def _ordered(node: dict[str, Any]) -> dict[str, Any]:
    first = {k: node[k] for k in _KEY_ORDER if k in node}
    return {**first, **{k: v for k, v in node.items() if k not in first}}
