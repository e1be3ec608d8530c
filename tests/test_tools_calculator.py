"""The calculator tool: arithmetic by AST, refusals of everything else and of huge results."""
from __future__ import annotations

import math

import pytest

from agentrt.registry import ToolRegistry
from agentrt.tools.calculator import CalculatorError, calculate, evaluate
from agentrt.types import ToolCall


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("1 + 2 * 3", 7),
        ("(1 + 2) * 3", 9),
        ("7 / 2", 3.5),
        ("7 // 2", 3),
        ("-7 // 2", -4),
        ("17 % 5", 2),
        ("2 ** 10", 1024),
        ("2^10", 1024),  # ^ is power here, as people write it
        ("-3 ** 2", -9),
        ("+-+4", -4),
        ("0.1 + 0.2", 0.3),
        ("sqrt(16)", 4),
        ("sqrt(2)", 1.41421356237),
        ("log(100, 10)", 2),
        ("ln(e)", 1),
        ("log10(1000) + log2(8)", 6),
        ("sin(pi / 2) + cos(0)", 2),
        ("round(2.675, 2)", 2.67),
        ("max(3, 9, 4) - min(2, 8)", 7),
        ("factorial(10)", 3628800),
        ("abs(-2.5) * 2", 5),
        ("floor(2.7) + ceil(2.1)", 5),
        ("hypot(3, 4)", 5),
        ("cbrt(-27)", -3),
        ("2 ** -1", 0.5),
        ("1e3 * 3", 3000),
        ("12 × 3 ÷ 4", 9),
        ("12 x 7", 84),
        ("(2)X(3) =", 6),
        ("1200/8?", 150),
        ("0x10", 16),  # hex literals stay hex
        ("10x3", 30),
        ("0 x 5", 0),
        ("2 ** 0.5 ** 2", 2 ** 0.25),
        ("10 ** 300 // 10 ** 299", 10),
    ],
)
def test_evaluates(expression: str, expected: float) -> None:
    result = evaluate(expression)
    assert result == pytest.approx(expected, rel=1e-10)
    if isinstance(expected, int):
        assert isinstance(result, int)


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("__import__('os').system('echo hi')", "unknown function"),
        ("open('/etc/passwd')", "unknown function 'open'"),
        ("(1).__class__", "Attribute is not allowed"),
        ("x + 1", "unknown name 'x'"),
        ("[1, 2]", "List is not allowed"),
        ("'a' * 3", "only numbers are allowed"),
        ("True + 1", "only numbers are allowed"),
        ("1 if 1 else 2", "IfExp is not allowed"),
        ("lambda: 1", "Lambda is not allowed"),
        ("1 << 5", "operator LShift is not allowed"),
        ("1 < 2", "Compare is not allowed"),
        ("~1", "operator Invert is not allowed"),
        ("1 / 0", "division by zero"),
        ("5 % 0", "division by zero"),
        ("sqrt(-1)", "math domain error"),
        ("(-8) ** 0.5", "not a real number"),
        ("9 ** 9 ** 9", "result too large"),
        ("10.0 ** 400", "result too large"),
        ("2 ** 5000", "result too large"),
        ("factorial(100000)", "factorial is limited"),
        ("factorial(-1)", "non-negative integer"),
        ("(10 ** 1000) * (10 ** 1000) * 10 ** 100", "result too large"),
        ("exp(1000)", "result too large"),
        ("sqrt(x=4)", "positional arguments only"),
        ("1 +", "not a valid expression"),
        ("", "empty expression"),
        ("1+" * 300 + "1", "longer than 500"),
        ("+".join(["1"] * 150), "more than 200 parts"),
        ("sqrt(1, 2)", "argument"),
    ],
)
def test_refuses(expression: str, message: str) -> None:
    with pytest.raises(CalculatorError, match=message.replace("(", r"\(").replace(")", r"\)")):
        evaluate(expression)


def test_no_eval_side_effects(tmp_path) -> None:
    target = tmp_path / "pwned"
    with pytest.raises(CalculatorError):
        evaluate(f"__import__('pathlib').Path({str(target)!r}).touch()")
    assert not target.exists()


async def test_as_a_tool() -> None:
    reg = ToolRegistry([calculate])
    ok = await reg.call(ToolCall(id="1", name="calculate", arguments={"expression": "(3 + 4) * 6"}))
    assert (ok.is_error, ok.content) == (False, "42")
    bad = await reg.call(ToolCall(id="2", name="calculate", arguments={"expression": "1/0"}))
    assert (bad.is_error, bad.content) == (True, "CalculatorError: division by zero")
    assert calculate.spec.parameters["required"] == ["expression"]
    assert calculate("2*pi") == pytest.approx(2 * math.pi)
