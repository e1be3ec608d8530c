"""`engine.prompt_length.TokenFloor`: a true lower bound on a text's token count, from its length."""
from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from agentrt.engine import ContextOverflowError, EngineConfig, LLMEngine
from agentrt.engine.prompt_length import TokenFloor
from tests.helpers.engine import smollm_loaded


@pytest.fixture(scope="module")
def tokenizer():
    return smollm_loaded().tokenizer


def test_floor_never_exceeds_the_token_count(tokenizer):
    floor = TokenFloor(tokenizer)
    assert floor.max_token_chars == max(map(len, tokenizer.get_vocab()))
    rng = random.Random(0)
    vocab = list(tokenizer.get_vocab())
    longest = max(vocab, key=len)
    texts = ["word " * 5000, "=" * 20000, "\n" + " " * 80, "é日本語🙂" * 500, "<|im_start|>" * 300,
             tokenizer.convert_tokens_to_string([longest]) * 200,
             "".join(chr(rng.randrange(32, 0x3000)) for _ in range(5000)),
             tokenizer.convert_tokens_to_string([rng.choice(vocab) for _ in range(3000)])]
    for text in texts:
        n = len(tokenizer.encode(text, add_special_tokens=False))
        assert floor(text) <= n, (text[:40], floor(text), n)
    assert floor("=" * 20000) > 0


def test_no_floor_where_the_pre_tokenizer_drops_characters():
    tok = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # spaces are dropped, not spelled by any token
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    assert TokenFloor(fast).max_token_chars is None and TokenFloor(fast)("a " * 1000) == 0


def test_engine_refuses_a_text_far_beyond_the_window_before_tokenizing():
    eng = LLMEngine(EngineConfig(num_kv_blocks=64, max_model_len=256), loaded=smollm_loaded())
    floor = eng._token_floor
    text = "=" * (floor.max_token_chars * 256)
    with pytest.raises(ContextOverflowError, match="at least 256 tokens"):
        eng.check_prompt_text(text)
    eng.check_prompt_text("=" * (floor.max_token_chars * 255))  # might fit: left to the tokenizer
