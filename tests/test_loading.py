"""Loading never fails open and always fails in one line (issue 13, items 2b and 7): adapter
configs and tensors are validated, LoRA weights come only from safetensors, a broken model
file is named, and --device / --kernel are checked against the machine before any weights
load. Everything runs through the CLI on the tiny llama, each failure as exit 2 with exactly
one stderr line."""
import json
import math
import pickle
import shutil

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

import casa_cli
import casa_cli.pipeline
from casa_cli.adapter import init_adapter, save_adapter
from casa_cli.backbone import load_backbone
from casa_cli.inputs import InputError
from casa_cli.lora import LORA_TARGETS


def usage_error(result, *needles) -> str:
    """Exit 2 and the whole of stderr one `casa: error:` line containing every needle."""
    assert result.code == 2, (result.code, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("casa: error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def llama(tiny_model):
    return tiny_model("llama")


@pytest.fixture(scope="module")
def saved_adapters(llama, tmp_path_factory):
    """A trained head-only adapter and a trained LoRA adapter of the tiny llama, made once;
    tests change copies of them."""
    root = tmp_path_factory.mktemp("adapters")
    backbone = load_backbone(str(llama))
    config, head = init_adapter(backbone)
    config.trained = True
    save_adapter(root / "head", config, head)
    peft = get_peft_model(backbone.model, LoraConfig(r=2, lora_alpha=4, target_modules=LORA_TARGETS))
    config.mode = "lora"
    save_adapter(root / "lora", config, head, peft)
    return root


@pytest.fixture
def adapter(saved_adapters, tmp_path):
    """adapter("head" | "lora") -> a fresh copy of that adapter to tamper with."""
    def copy(kind: str):
        return shutil.copytree(saved_adapters / kind, tmp_path / kind)
    return copy


def classify(casa, model, adapter_dir):
    return casa("classify", "hi", "--model", model, "--adapter", adapter_dir)


# --- adapter config ------------------------------------------------------------------------
@pytest.mark.parametrize("field, value", [
    ("threshold", math.nan),  # written as the JSON extension NaN, which Python reads
    ("threshold", 1.5),
    ("threshold", "0.5"),
    ("threshold", None),  # what a NaN threshold used to be saved as
    ("heads", "four"),
    ("heads", 0),
    ("gate", "max"),
    ("layer", "3"),
    ("mode", "full"),
    ("tokens", {"safe": 1}),
    ("refusal", 5),
    ("trained", "yes"),
])
def test_wrongly_typed_adapter_field_is_one_line_naming_file_and_field(
        casa, llama, adapter, field, value):
    directory = adapter("head")
    path = directory / "casa_config.json"
    config = json.loads(path.read_text())
    config[field] = value
    path.write_text(json.dumps(config))
    usage_error(classify(casa, llama, directory), str(path), repr(field))


def test_adapter_config_that_is_not_an_object_or_has_unknown_fields(casa, llama, adapter):
    directory = adapter("head")
    path = directory / "casa_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "thresold": 0.2}))
    usage_error(classify(casa, llama, directory), str(path), "unknown field 'thresold'")
    path.write_text("[1, 2]")
    usage_error(classify(casa, llama, directory), str(path), "JSON object")


@pytest.mark.parametrize("tensor, bad", [("Q", math.nan), ("V", math.inf), ("b", math.nan),
                                         ("token_out", -math.inf)])
def test_non_finite_head_tensor_is_refused(casa, llama, adapter, tensor, bad):
    directory = adapter("head")
    path = directory / "head.safetensors"
    tensors = load_file(str(path))
    tensors[tensor].view(-1)[0] = bad
    save_file(tensors, str(path))
    usage_error(classify(casa, llama, directory), str(path), repr(tensor), "non-finite")


def test_save_adapter_refuses_what_would_not_load(llama, tmp_path):
    backbone = load_backbone(str(llama))
    config, head = init_adapter(backbone)
    config.threshold = math.nan  # a one-class validation split
    with pytest.raises(InputError, match="'threshold'"):
        save_adapter(tmp_path / "nan-threshold", config, head)
    config.threshold = 0.5
    with torch.no_grad():
        head.V.fill_(math.inf)
    with pytest.raises(InputError, match="'V'.*non-finite"):
        save_adapter(tmp_path / "inf-head", config, head)
    config, head = init_adapter(backbone)
    peft = get_peft_model(backbone.model, LoraConfig(r=2, target_modules=LORA_TARGETS))
    with torch.no_grad():
        next(p for name, p in peft.named_parameters() if "lora_B" in name).fill_(math.nan)
    with pytest.raises(InputError, match="adapter_model.safetensors.*non-finite"):
        save_adapter(tmp_path / "nan-lora", config, head, peft)
    assert not any(tmp_path.iterdir())  # nothing written


# --- LoRA -------------------------------------------------------------------------------------
class Planted:
    """A pickle that, if ever unpickled, creates a marker file (a stand-in for any code)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_pickled_lora_weights_are_refused_never_unpickled(casa, llama, adapter, tmp_path):
    directory = adapter("lora")
    (directory / "lora" / "adapter_model.safetensors").unlink()
    marker = tmp_path / "unpickled"
    (directory / "lora" / "adapter_model.bin").write_bytes(pickle.dumps(Planted(marker)))
    usage_error(classify(casa, llama, directory), "adapter_model.safetensors",
                "safetensors only", "adapter_model.bin")
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["garbage weights", "truncated weights", "nan weights",
                                    "garbage config", "config not an object"])
def test_broken_lora_folder_is_one_line_naming_the_file(casa, llama, adapter, damage):
    directory = adapter("lora")
    weights = directory / "lora" / "adapter_model.safetensors"
    config = directory / "lora" / "adapter_config.json"
    if damage == "garbage weights":
        weights.write_bytes(b"\x00not a safetensors file" * 8)
    elif damage == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:-10])
    elif damage == "nan weights":
        tensors = load_file(str(weights))
        next(iter(tensors.values())).view(-1)[0] = math.nan
        save_file(tensors, str(weights))
    elif damage == "garbage config":
        config.write_text("{peft")
    else:
        config.write_text('"lora"')
    usage_error(classify(casa, llama, directory), str(config if "config" in damage else weights))


def test_intact_lora_adapter_still_loads(casa, llama, adapter):
    result = classify(casa, llama, adapter("lora"))
    assert result.code == 0, result.stderr


# --- model files ------------------------------------------------------------------------------
@pytest.mark.parametrize("damage, culprit", [
    ("config invalid json", "config.json"),
    ("config not an object", "config.json"),
    ("config unknown model type", "config.json"),
    ("config without model type", "config.json"),
    ("config wrong field type", "config.json"),
    ("weights truncated", "model.safetensors"),
    ("weights garbage", "model.safetensors"),
    ("tokenizer missing", ""),
])
def test_broken_model_folder_is_one_line_naming_the_file(casa, llama, tmp_path, damage, culprit):
    model = shutil.copytree(llama, tmp_path / "m")
    config = json.loads((model / "config.json").read_text())
    broken = {
        "config invalid json": lambda: (model / "config.json").write_text("{model_type: llama"),
        "config not an object": lambda: (model / "config.json").write_text("[1, 2]"),
        "config unknown model type": lambda: (model / "config.json").write_text(
            json.dumps({"model_type": "zzz", "hidden_size": "wide"})),
        "config without model type": lambda: (model / "config.json").write_text(
            json.dumps({"hidden_size": "wide", "layers": [None]})),
        "config wrong field type": lambda: (model / "config.json").write_text(
            json.dumps({**config, "hidden_size": "wide"})),
        "weights truncated": lambda: (model / "model.safetensors").write_bytes(
            (model / "model.safetensors").read_bytes()[:-100]),
        "weights garbage": lambda: (model / "model.safetensors").write_bytes(b"\xff" * 64),
        "tokenizer missing": lambda: [(model / name).unlink()
                                      for name in ("tokenizer.json", "tokenizer_config.json")],
    }
    broken[damage]()
    usage_error(casa("classify", "hi", "--model", model), str(model / culprit))


def test_truncated_gguf_is_one_line_naming_the_file(casa, tmp_path):
    """The embedded default's GGUF cut inside its metadata (the parser then runs off the end
    of the file), and a file with only the GGUF magic and garbage."""
    from casa_cli.model_sources import embedded_gguf

    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 40)
    usage_error(casa("classify", "hi", "--model", garbage), str(garbage))
    try:
        source = embedded_gguf()
    except InputError:
        pytest.skip("the embedded default model is not installed")
    truncated = tmp_path / "truncated.gguf"
    with open(source, "rb") as whole:
        truncated.write_bytes(whole.read(1 << 20))
    usage_error(casa("classify", "hi", "--model", truncated), str(truncated))


# --- device and kernel --------------------------------------------------------------------------
@pytest.fixture
def no_weights(monkeypatch):
    """Fails the test if anything gets as far as loading a model."""
    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the options were checked")
    monkeypatch.setattr(casa_cli.pipeline, "load_backbone", refuse)


def unavailable_devices():
    devices = ["bogus", "cuda:x"]
    if torch.cuda.device_count() <= 7:
        devices.append("cuda:7")
    if not torch.cuda.is_available():
        devices.append("cuda")
    if not torch.backends.mps.is_available():
        devices.append("mps")
    return devices


@pytest.mark.parametrize("command", ["classify", "generate", "load"])
@pytest.mark.parametrize("device", unavailable_devices())
def test_device_is_checked_before_loading(casa, llama, no_weights, command, device):
    args = ["hi"] if command != "load" else []
    usage_error(casa(command, *args, "--model", llama, "--device", device), repr(device))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", ["classify", "generate", "load"])
def test_triton_kernel_without_cuda_is_a_usage_error_up_front(casa, llama, no_weights, command):
    args = ["hi"] if command != "load" else []
    usage_error(casa(command, *args, "--model", llama, "--kernel", "triton"),
                "the Triton kernel needs a CUDA device; use --kernel torch or auto")


def test_max_audio_seconds_is_checked_and_set(llama):
    for bad in (math.nan, math.inf, 0, -1.0, True):
        with pytest.raises(InputError, match="max-audio-seconds"):
            casa_cli.load(llama, max_audio_seconds=bad)
    assert casa_cli.load(llama, max_audio_seconds=12.5).backbone.max_audio_seconds == 12.5
