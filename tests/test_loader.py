"""engine/loader.py: HF folders, single safetensors, GGUF (tiny and embedded), cache, errors."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from agentrt import cli
from agentrt.engine.loader import (
    LoadedModel,
    ModelNotFoundError,
    UnsupportedModelError,
    convert_gguf,
    embedded_model_path,
    gguf_header_folder,
    gguf_to_hf_name,
    load_model,
    unpermute_qk,
)
from tests.helpers.loader import llamacpp_permute, tiny_tokenizer, write_tiny_gguf, write_tiny_hf_folder

CONFIG_KEYS = {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "rope_scaling",
               "max_position_embeddings", "tie_word_embeddings", "attention_bias", "bos_token_id",
               "eos_token_id", "model_type"}


def _assert_same_weights(loaded: LoadedModel, model, atol: float = 0.0, skip: tuple[str, ...] = ()) -> None:
    sd = {k: v for k, v in model.state_dict().items() if not (model.config.tie_word_embeddings and k == "lm_head.weight")}
    assert set(loaded.weights) == set(sd)
    for k, v in loaded.weights.items():
        assert v.dtype == torch.float32, k
        if k not in skip:
            torch.testing.assert_close(v, sd[k], atol=atol, rtol=0, msg=k)


def test_hf_folder(tmp_path):
    model = write_tiny_hf_folder(tmp_path / "m")
    loaded = load_model(str(tmp_path / "m"), progress=False)
    assert CONFIG_KEYS <= set(loaded.config)
    assert loaded.config["head_dim"] == 16 and loaded.config["num_key_value_heads"] == 2
    assert loaded.config["rope_theta"] == 10000.0 and loaded.config["tie_word_embeddings"] is True
    _assert_same_weights(loaded, model)
    assert "lm_head.weight" not in loaded.weights
    assert loaded.eos_token_ids == [2]
    assert loaded.tokenizer.is_fast and "<|im_start|>" in loaded.tokenizer.chat_template
    assert loaded.name == "m" and loaded.source == str((tmp_path / "m").resolve())


def test_untied_with_bias_and_single_safetensors_file(tmp_path):
    model = write_tiny_hf_folder(tmp_path / "m", tie=False, bias=True)
    loaded = load_model(tmp_path / "m" / "model.safetensors", progress=False)
    assert loaded.config["tie_word_embeddings"] is False and loaded.config["attention_bias"] is True
    assert "lm_head.weight" in loaded.weights and "model.layers.1.self_attn.k_proj.bias" in loaded.weights
    _assert_same_weights(loaded, model)


def test_unpermute_inverts_llamacpp_permute():
    w = np.arange(4 * 16 * 3, dtype=np.float32).reshape(4 * 16, 3)
    np.testing.assert_array_equal(unpermute_qk(llamacpp_permute(w, 4), 4), w)
    b = np.arange(2 * 16, dtype=np.float32)
    np.testing.assert_array_equal(unpermute_qk(llamacpp_permute(b, 2), 2), b)
    assert not np.array_equal(llamacpp_permute(w, 4), w)  # the permutation is not the identity


def test_gguf_name_mapping():
    assert gguf_to_hf_name("blk.12.attn_q.weight") == "model.layers.12.self_attn.q_proj.weight"
    assert gguf_to_hf_name("blk.0.ffn_down.weight") == "model.layers.0.mlp.down_proj.weight"
    assert gguf_to_hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert gguf_to_hf_name("output.weight") == "lm_head.weight"
    with pytest.raises(UnsupportedModelError, match="blk.0.ssm_x"):
        gguf_to_hf_name("blk.0.ssm_x.weight")


def test_tiny_gguf_roundtrip_matches_original_and_transformers(tmp_path):
    """A GGUF written the way llama.cpp writes it (permuted q/k, one Q8_0 tensor) loads back to the
    original HF weights (F32 tensors exactly; the Q8_0 one within its quantization step), the same
    weights transformers' own GGUF loader produces (exactly), and the same tokenizer."""
    from transformers import AutoModelForCausalLM

    model = write_tiny_hf_folder(tmp_path / "hf")
    tok = tiny_tokenizer()
    q8 = "model.layers.0.mlp.up_proj.weight"
    gguf_path = write_tiny_gguf(tmp_path / "tiny.gguf", model, tok, q8_names=("blk.0.ffn_up.weight",))
    loaded = load_model(str(gguf_path), cache_dir=tmp_path / "cache", progress=False)

    _assert_same_weights(loaded, model, skip=(q8,))
    # Q8_0: per-32 scale <= row max / 127, stored in fp16 (rel. error 2^-11 on up to 127 steps)
    step = model.state_dict()[q8].abs().amax(dim=1, keepdim=True) / 127
    assert ((loaded.weights[q8] - model.state_dict()[q8]).abs() <= step * (0.5 + 127 / 2048) + 1e-7).all()

    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="tiny.gguf")
    for k, v in loaded.weights.items():
        torch.testing.assert_close(v, ref.state_dict()[k], atol=0, rtol=0, msg=k)

    text = "Hello world! <|im_start|>user\nCall the weather tool"
    assert loaded.tokenizer(text).input_ids == tok(text).input_ids
    assert loaded.tokenizer.chat_template == tok.chat_template
    assert loaded.eos_token_ids == [2] and loaded.config["bos_token_id"] == 1
    assert loaded.name == "tiny" and loaded.source == str(gguf_path.resolve())
    assert CONFIG_KEYS <= set(loaded.config)


def test_gguf_cache_reused_and_respects_env(tmp_path, monkeypatch):
    model = write_tiny_hf_folder(tmp_path / "hf")
    gguf_path = write_tiny_gguf(tmp_path / "t.gguf", model, tiny_tokenizer())
    monkeypatch.setenv("AGENTRT_CACHE", str(tmp_path / "envcache"))
    folder = convert_gguf(gguf_path, progress=False)
    assert folder.parent == tmp_path / "envcache"
    st = (folder / "model.safetensors").stat().st_mtime_ns
    loaded = load_model(str(gguf_path), progress=False)
    assert loaded.cache_dir == str(folder)
    assert (folder / "model.safetensors").stat().st_mtime_ns == st  # not rewritten
    assert [p.name for p in (tmp_path / "envcache").iterdir()] == [folder.name]  # no leftover temp dirs
    # A changed file gets a new cache entry.
    time.sleep(0.01)
    gguf_path.touch()
    assert convert_gguf(gguf_path, progress=False) != folder


def test_a_new_cache_entry_removes_those_no_load_can_use_again(tmp_path):
    """Each reinstall to a new place makes a new entry (the key has the path): the entries whose GGUF is
    gone or changed are removed when the next one is made, the live ones kept."""
    import json
    import shutil

    model = write_tiny_hf_folder(tmp_path / "hf")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = write_tiny_gguf(tmp_path / "a" / "t.gguf", model, tiny_tokenizer())
    kept = write_tiny_gguf(tmp_path / "b" / "t.gguf", model, tiny_tokenizer())
    cache = tmp_path / "cache"
    gone = gguf_header_folder(first, cache_dir=cache)
    live = gguf_header_folder(kept, cache_dir=cache)
    old = cache / "t-0123456789abcdef"  # an older converter version's entry of the live file
    shutil.copytree(live, old)
    shutil.rmtree(first.parent)  # the venv it was installed in is gone
    moved = tmp_path / "c" / "t.gguf"
    moved.parent.mkdir()
    shutil.copy(kept, moved)
    new = gguf_header_folder(moved, cache_dir=cache)
    assert sorted(p.name for p in cache.iterdir()) == sorted([live.name, new.name])
    assert json.loads((live / "agentrt_source.json").read_text())["source"] == str(kept.resolve())
    assert not gone.exists() and not old.exists()


def test_missing_sources_name_what_was_looked_for(tmp_path):
    with pytest.raises(ModelNotFoundError, match="nope"):
        load_model(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="config.json"):
        load_model(str(tmp_path / "empty"))
    write_tiny_hf_folder(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(ModelNotFoundError, match="safetensors"):
        load_model(str(tmp_path / "m"))
    assert issubclass(ModelNotFoundError, FileNotFoundError)


def test_unsupported_models_are_refused_clearly(tmp_path):
    write_tiny_hf_folder(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        load_model(str(tmp_path / "m"), progress=False)
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    with pytest.raises(UnsupportedModelError, match="missing model.layers.2.self_attn.q_proj.weight"):
        load_model(str(tmp_path / "m"), progress=False)
    (tmp_path / "x.bin").write_bytes(b"0")
    with pytest.raises(UnsupportedModelError, match="x.bin"):
        load_model(str(tmp_path / "x.bin"))


@pytest.mark.e2e
def test_embedded_gguf_matches_transformers(tmp_path, monkeypatch):
    """The embedded SmolLM2-135M Q4_1 GGUF: our conversion gives bit-identical weights to transformers'
    GGUF loader, hence identical logits (tolerance 0 on weights, 1e-4 on logits), the same tokens and
    chat template; the second load comes from the cache (nothing is converted again)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from agentrt.engine import loader

    torch.set_num_threads(2)
    path = embedded_model_path()
    loaded = load_model(None, cache_dir=tmp_path, progress=False)

    def converted_again(*args, **kwargs):
        raise AssertionError("the second load converted the GGUF again")

    monkeypatch.setattr(loader, "_write_gguf_header", converted_again)
    monkeypatch.setattr(loader, "_write_dequantized", converted_again)
    again = load_model(None, cache_dir=tmp_path, progress=False)
    assert again.config == loaded.config
    monkeypatch.undo()
    texts = ["Hello, world!", '{"city":"Paris","n":2}', "  spaces\tand\nnewlines ", "émoji 🙂 中文",
             "<|im_start|>user", "x = [1, 22, 333, 4444]; // 12345678"]
    for text in texts:  # the header's tokenizer (built from the GGUF by the fast class) is AutoTokenizer's
        assert loaded.tokenizer.encode(text) == ref_tok(path).encode(text), text

    cfg = loaded.config
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["vocab_size"], cfg["rope_theta"], cfg["tie_word_embeddings"]) == (30, 576, 9, 3, 49152, 100000.0, True)
    assert loaded.eos_token_ids == [2] and loaded.source == str(path)

    ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    ref_sd = ref.state_dict()
    for k, v in loaded.weights.items():
        torch.testing.assert_close(v, ref_sd[k], atol=0, rtol=0, msg=k)

    ours = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in cfg.items() if k != "architectures"})).eval()
    missing, unexpected = ours.load_state_dict(loaded.weights, strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected
    ours.tie_weights()
    msgs = [[{"role": "user", "content": "What is the capital of France?"}],
            [{"role": "system", "content": "Reply in JSON."}, {"role": "user", "content": "Weather in Paris?"}]]
    for m in msgs:
        ids = loaded.tokenizer.apply_chat_template(m, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
        assert ids.tolist() == ref_tok(path).apply_chat_template(m, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"].tolist()
        with torch.no_grad():
            diff = (ours(ids).logits - ref(ids).logits).abs().max().item()
        assert diff <= 1e-4, diff


def test_a_llama_gguf_header_tokenizer_loads_as_autotokenizer_would(tmp_path):
    """The header folder's tokenizer is loaded by the class it names, without AutoTokenizer's detour
    through the model config: the same tokenizer in every respect the engine uses."""
    from transformers import AutoTokenizer

    loaded = load_model(None, cache_dir=tmp_path, progress=False)
    auto = AutoTokenizer.from_pretrained(loaded.cache_dir)
    tok = loaded.tokenizer
    assert type(tok) is type(auto)
    texts = ["Hello, world!", '{"city":"Paris","n":2}', "  spaces\tand\nnewlines ", "émoji 🙂 中文", "<|im_start|>user"]
    for text in texts:
        assert tok.encode(text) == auto.encode(text)
        assert tok.decode(tok.encode(text)) == auto.decode(auto.encode(text))
    assert (tok.eos_token_id, tok.bos_token_id, tok.all_special_ids) == (auto.eos_token_id, auto.bos_token_id,
                                                                         auto.all_special_ids)
    chat = [{"role": "system", "content": "Reply in JSON."}, {"role": "user", "content": "Weather in Paris?"}]
    assert tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
        auto.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert len(tok) == len(auto)


_REF_TOK = {}


def ref_tok(path):
    if path not in _REF_TOK:
        from transformers import AutoTokenizer

        _REF_TOK[path] = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return _REF_TOK[path]


# ---- `agentrt bench engine --quick --json` smoke test (on a tiny random Llama: the JSON has every section
# and positive figures; the numbers themselves are machine-dependent and not asserted)


@pytest.mark.e2e
def test_bench_engine_scale_json(capsys):
    """`--scale` on the embedded GGUF: each figure from its own processes, the default engine's path named
    (a float16 KV pool in the fused step)."""
    from tests.helpers.engine import embedded_gguf

    folder, name = embedded_gguf()
    rc = cli.main(["bench", "engine", "--scale", "--json", "--no-llamacpp", "--model", f"{folder}/{name}",
                   "--threads", "1", "--repeats", "1", "--decode-tokens", "8"])
    assert rc == 0
    (row,) = json.loads(capsys.readouterr().out)["rows"]
    assert row["impl"] == "agentrt default" and "fused C++ step" in row["path"] and "float16" in row["path"]
    for key in ("first_load_s", "second_load_s", "decode_ms_per_token", "decode_ms_per_token_long", "peak_rss_mb",
                "weight_mb", "floor_ms_per_token"):
        assert row[key] > 0, key
    assert set(row["prefill_tokens_per_s"]) == {"512", "2048"} and min(row["prefill_tokens_per_s"].values()) > 0


@pytest.mark.e2e
def test_bench_engine_quick_json(tmp_path, capsys):
    write_tiny_hf_folder(tmp_path / "tiny")
    rc = cli.main(["bench", "engine", "--quick", "--json", "--model", str(tmp_path / "tiny"), "--threads", "1",
                   "--settings", "fp32,int8", "--requests", "40"])
    assert rc == 0
    rep = json.loads(capsys.readouterr().out)
    speed = {(r["impl"], r["setting"]): r for r in rep["speed"]}
    assert {("agentrt", "fp32"), ("agentrt", "int8"), ("transformers", "bf16")} <= set(speed)
    for r in rep["speed"]:
        assert r["decode_ms_per_token"] > 0 and r["prefill_tokens_per_s"] > 0 and r["weight_bytes"] > 0
        assert r["floor_ms_per_token"] > 0
    assert rep["skipped"]["llama.cpp"] == "the model is not a GGUF file"
    pc = rep["prefix_cache"]
    assert pc["ttft_cached_s"] > 0 and pc["ttft_uncached_s"] > 0
    assert 0 < pc["cached_tokens_reported"] <= pc["shared_prefix_tokens"]
    assert rep["batching"]["tokens_per_s_1"] > 0 and rep["batching"]["tokens_per_s_8"] > 0
    (acc,) = rep["accuracy"]
    assert acc["setting"] == "int8" and 0 < acc["max_abs_logit_diff"] and 0 <= acc["top1_agreement"] <= 1
    assert rep["memory"]["requests"] == 40 and rep["memory"]["kv_blocks_referenced_after"] == 0
    assert rep["memory"]["peak_rss_mb_total"] > 0
    assert rep["targets"]["decode_speedup_vs_transformers"] > 0


def test_bench_engine_rejects_unknown_setting(tmp_path):
    write_tiny_hf_folder(tmp_path / "tiny")
    with pytest.raises(SystemExit, match="fp8"):
        cli.main(["bench", "engine", "--quick", "--model", str(tmp_path / "tiny"), "--settings", "fp8"])


def test_pull_converts_and_reports(tmp_path, capsys):
    model = write_tiny_hf_folder(tmp_path / "hf")
    gguf_path = write_tiny_gguf(tmp_path / "t.gguf", model, tiny_tokenizer())
    assert cli.main(["pull", str(gguf_path), "--cache-dir", str(tmp_path / "c"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert Path(info["converted_to"]).parent == tmp_path / "c"
    assert (Path(info["converted_to"]) / "config.json").is_file()
    assert not (Path(info["converted_to"]) / "model.safetensors").exists()  # no float copy: the engine reads the GGUF
    assert info["parameters"] == sum(p.numel() for p in model.parameters())  # tied: counted once
    assert cli.main(["pull", str(tmp_path / "missing.gguf")]) == 1
    assert "missing.gguf" in capsys.readouterr().err


def test_sharded_hf_folder(tmp_path):
    model = write_tiny_hf_folder(tmp_path / "m")
    from safetensors.torch import load_file, save_file

    sd = load_file(str(tmp_path / "m" / "model.safetensors"))
    (tmp_path / "m" / "model.safetensors").unlink()
    keys = sorted(sd)
    halves = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for fname, ks in halves.items():
        save_file({k: sd[k] for k in ks}, str(tmp_path / "m" / fname))
    (tmp_path / "m" / "stray.safetensors").write_bytes(b"not a checkpoint")  # must be ignored
    index = {"weight_map": {k: f for f, ks in halves.items() for k in ks}}
    (tmp_path / "m" / "model.safetensors.index.json").write_text(json.dumps(index))
    _assert_same_weights(load_model(tmp_path / "m", progress=False), model)
    (tmp_path / "m" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelNotFoundError, match="00002"):
        load_model(tmp_path / "m", progress=False)
