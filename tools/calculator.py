"""A calculator: arithmetic evaluated from the Python AST, never with ``eval``.

Only number literals, the operators ``+ - * / // % **`` (``^`` is read as power,
as people and small models write it), unary signs, parentheses, a few constants and
the math functions in :data:`FUNCTIONS` are allowed. Sizes are bounded so that no
expression can eat the machine (``9**9**9``, ``factorial(10**6)``).
"""
from __future__ import annotations

import ast
import math
import operator
import re
from typing import Any, Callable

from agentrt.registry import ToolRegistry

__all__ = ["CalculatorError", "calculate", "evaluate"]

MAX_EXPRESSION_CHARS = 500
MAX_NODES = 200
MAX_INT_BITS = 4096  # results beyond ~1,200 decimal digits are refused
MAX_FACTORIAL = 500

CONSTANTS: dict[str, float] = {"pi": math.pi, "e": math.e, "tau": math.tau, "inf": math.inf}


class CalculatorError(ValueError):
    """An expression the calculator refuses or cannot evaluate; the message says why."""


def _factorial(n: Any) -> int:
    if isinstance(n, float) and n.is_integer():
        n = int(n)
    if not isinstance(n, int) or n < 0:
        raise CalculatorError("factorial needs a non-negative integer")
    if n > MAX_FACTORIAL:
        raise CalculatorError(f"factorial is limited to n <= {MAX_FACTORIAL}")
    return math.factorial(n)


def _round(x: float, digits: int = 0) -> float:
    return round(x, int(digits))


def _cbrt(x: float) -> float:  # math.cbrt arrived in Python 3.11
    return math.copysign(abs(x) ** (1 / 3), x)


FUNCTIONS: dict[str, Callable[..., Any]] = {
    "sqrt": math.sqrt, "cbrt": getattr(math, "cbrt", _cbrt), "exp": math.exp,
    "log": math.log, "ln": math.log, "log10": math.log10, "log2": math.log2,
    "sin": math.sin, "cos": math.cos, "tan": math.tan,
    "asin": math.asin, "acos": math.acos, "atan": math.atan, "atan2": math.atan2,
    "sinh": math.sinh, "cosh": math.cosh, "tanh": math.tanh,
    "degrees": math.degrees, "radians": math.radians, "hypot": math.hypot,
    "abs": abs, "round": _round, "floor": math.floor, "ceil": math.ceil,
    "min": min, "max": max, "factorial": _factorial, "gcd": math.gcd, "lcm": math.lcm,
}


def _check_int(value: Any) -> Any:
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise CalculatorError(f"result too large (more than {MAX_INT_BITS} bits)")
    return value


def _power(base: Any, exponent: Any) -> Any:
    # Estimate the result's size before computing it: |base|**exponent has about
    # exponent * log2|base| bits.
    if isinstance(exponent, (int, float)) and abs(base) > 1 and exponent > 0:
        if exponent * math.log2(abs(base)) > MAX_INT_BITS:
            if isinstance(base, int) and isinstance(exponent, int):
                raise CalculatorError(f"result too large (more than {MAX_INT_BITS} bits)")
            raise CalculatorError("result too large (float overflow)")
    result = operator.pow(base, exponent)
    if isinstance(result, complex):
        raise CalculatorError("result is not a real number (negative base with a fractional exponent)")
    return result


def _multiply(a: Any, b: Any) -> Any:
    if isinstance(a, int) and isinstance(b, int) and a.bit_length() + b.bit_length() > MAX_INT_BITS + 1:
        raise CalculatorError(f"result too large (more than {MAX_INT_BITS} bits)")
    return a * b


BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: _multiply, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: _power,
}
UNARY: dict[type[ast.unaryop], Callable[[Any], Any]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def _eval(node: ast.AST) -> Any:
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
            raise CalculatorError(f"only numbers are allowed, not {node.value!r}")
        return node.value
    if isinstance(node, ast.BinOp):
        op = BINARY.get(type(node.op))
        if op is None:
            raise CalculatorError(f"operator {type(node.op).__name__} is not allowed; use + - * / // % **")
        return _check_int(op(_eval(node.left), _eval(node.right)))
    if isinstance(node, ast.UnaryOp):
        uop = UNARY.get(type(node.op))
        if uop is None:
            raise CalculatorError(f"operator {type(node.op).__name__} is not allowed")
        return uop(_eval(node.operand))
    if isinstance(node, ast.Name):
        if node.id in CONSTANTS:
            return CONSTANTS[node.id]
        raise CalculatorError(f"unknown name {node.id!r}; constants: {', '.join(CONSTANTS)}")
    if isinstance(node, ast.Call):
        if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS:
            shown = node.func.id if isinstance(node.func, ast.Name) else ast.unparse(node.func)
            raise CalculatorError(f"unknown function {shown!r}; functions: {', '.join(FUNCTIONS)}")
        if node.keywords:
            raise CalculatorError("functions take positional arguments only")
        args = [_eval(a) for a in node.args]
        return _check_int(FUNCTIONS[node.func.id](*args))
    raise CalculatorError(f"{type(node).__name__} is not allowed in an arithmetic expression")


def _tidy(value: Any) -> int | float:
    """Integral floats become ints and floats lose binary noise (0.1+0.2 -> 0.3)."""
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            raise CalculatorError("result is not a finite number")
        tidy = float(f"{value:.12g}")
        return int(tidy) if tidy.is_integer() and abs(tidy) < 1e15 else tidy
    return value


# "x" between operands means times, except in a hex literal ("0x10": a lone 0 before x).
_TIMES_X = re.compile(r"(?<=[\d)])(?:\s+[xX]\s+|(?<!\b0)\s*[xX]\s*)(?=[\d(])")


def evaluate(expression: str) -> int | float:
    """Evaluate an arithmetic expression safely; raises :class:`CalculatorError`."""
    # Forgive what people and small models write: "12 x 7", "2^10", "3 × 4 =".
    text = expression.strip().rstrip("=?").strip()
    text = text.replace("^", "**").replace("×", "*").replace("÷", "/")
    text = _TIMES_X.sub("*", text)
    if not text:
        raise CalculatorError("empty expression")
    if len(text) > MAX_EXPRESSION_CHARS:
        raise CalculatorError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as exc:
        raise CalculatorError(f"not a valid expression: {exc.msg}") from None
    if sum(1 for _ in ast.walk(tree)) > MAX_NODES:
        raise CalculatorError(f"expression has more than {MAX_NODES} parts")
    try:
        return _tidy(_eval(tree))
    except CalculatorError:
        raise
    except ZeroDivisionError:
        raise CalculatorError("division by zero") from None
    except OverflowError:
        raise CalculatorError("result too large (beyond the float range)") from None
    except (ValueError, TypeError) as exc:  # math domain errors, wrong arities
        raise CalculatorError(str(exc)) from None


_tools = ToolRegistry()


@_tools.tool
def calculate(expression: str) -> int | float:
    """Evaluate an arithmetic expression and return the number.

    Args:
        expression: Math like "2*(3+4)", "17 % 5", "2**10", "sqrt(2)", "log(100, 10)".
    """
    return evaluate(expression)
