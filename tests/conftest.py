"""Fixtures shared by the test modules."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ext():
    """The compiled C++ extension (engine/*.cpp), or a skip naming why it cannot build here (it needs a
    C++ compiler, ninja and torch's headers: the optional part of the engine)."""
    from agentrt.engine import decode_fused

    e = decode_fused.load_extension()
    if e is None:
        pytest.skip(f"the C++ extension cannot build here: {decode_fused.unavailable_reason()}")
    return e
