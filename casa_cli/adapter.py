"""CASA adapters (docs/design.md §4): a directory with `casa_config.json`, `head.safetensors`
(Q, V, b and the two safety-token rows) and an optional peft `lora/` folder.

The safety tokens never enter the base model's vocabulary: their output rows live in the
head (the safety step reads them directly) and their input rows are fed as embeddings when
decoding continues after the verdict. The base model's weights, tokenizer and KV cache stay
untouched, and tied-embedding models need no special case.
"""
from __future__ import annotations

import contextlib
import json
import warnings
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import torch

from casa_cli.fingerprint import FINGERPRINT_SCHEME, fingerprint
from casa_cli.head import GATES, SAFETY_TOKENS, SafetyHead, valid_threshold
from casa_cli.inputs import InputError
from casa_cli.model_sources import loading
from casa_cli.output import strict_json
from casa_cli.processors import read_json_object

FORMAT_VERSION = 1
CONFIG_FILE = "casa_config.json"
HEAD_FILE = "head.safetensors"
LORA_DIR = "lora"
# A response head (issue 17): an adapter of its own in this folder, trained on (prompt,
# response) pairs, that the response monitor and classify's pair verdicts use.
RESPONSE_DIR = "response"
LORA_CONFIG = "adapter_config.json"
LORA_WEIGHTS = "adapter_model.safetensors"
PICKLED_LORA_WEIGHTS = "adapter_model.bin"  # peft's old format: never loaded (unpickling runs code)
MODES = ("head", "lora", "vsfa")
DEFAULT_REFUSAL = "I can't help with that request."
# Words whose embeddings seed the safety tokens' rows, so an untrained head starts from the
# LM's own notion of "safe" vs "unsafe" rather than from noise.
SEED_WORDS = (" safe", " unsafe")


@dataclass
class AdapterConfig:
    base_model: str
    fingerprint: str
    hidden_size: int
    heads: int
    gate: str = "log"
    threshold: float = 0.5
    tokens: dict = field(default_factory=dict)  # {"safe": {"string", "id"}, "unsafe": {...}}
    refusal: str = DEFAULT_REFUSAL
    safety_prompt: str | None = None
    trained: bool = False
    mode: str = "head"  # one of MODES
    layer: int | None = None  # decoder layer the head reads (through the final norm); None = last
    training: dict = field(default_factory=dict)  # data summary, hyper-parameters
    metrics: dict = field(default_factory=dict)  # held-out metrics
    format_version: int = FORMAT_VERSION


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_token(entry) -> bool:
    return (isinstance(entry, dict) and set(entry) == {"string", "id"}
            and isinstance(entry["string"], str) and _is_int(entry["id"]))


# What each field of casa_config.json must hold. A wrong value must never reach the head:
# a NaN threshold compares false everywhere and would call every prompt safe.
FIELD_CHECKS = {
    "base_model": (lambda v: isinstance(v, str), "a string"),
    "fingerprint": (lambda v: isinstance(v, str), "a string"),
    "hidden_size": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "heads": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "gate": (lambda v: isinstance(v, str) and v in GATES, f"one of {', '.join(GATES)}"),
    "threshold": (valid_threshold, "a number in [0, 1]"),
    "tokens": (lambda v: isinstance(v, dict) and set(v) == {"safe", "unsafe"}
               and all(map(_is_token, v.values())),
               'an object {"safe": {"string", "id"}, "unsafe": {"string", "id"}}'),
    "refusal": (lambda v: isinstance(v, str), "a string"),
    "safety_prompt": (lambda v: v is None or isinstance(v, str), "null or a string"),
    "trained": (lambda v: isinstance(v, bool), "true or false"),
    "mode": (lambda v: isinstance(v, str) and v in MODES, f"one of {', '.join(MODES)}"),
    "layer": (lambda v: v is None or (_is_int(v) and v > 0), "null or a layer number from 1"),
    "training": (lambda v: isinstance(v, dict), "an object"),
    "metrics": (lambda v: isinstance(v, dict), "an object"),
    "format_version": (_is_int, "an integer"),
}
REQUIRED = tuple(f.name for f in fields(AdapterConfig)
                 if f.default is MISSING and f.default_factory is MISSING)


def check_config(raw: dict, where: Path) -> None:
    """Every field of an adapter config is known, present when required and of the right
    type and range; otherwise one InputError line naming `where` and the field."""
    unknown = sorted(set(raw) - set(FIELD_CHECKS))
    missing = [name for name in REQUIRED if name not in raw]
    if unknown or missing:
        problem = f"unknown field {unknown[0]!r}" if unknown else f"missing field {missing[0]!r}"
        raise InputError(f"{where}: {problem}")
    for name, value in raw.items():
        valid, expected = FIELD_CHECKS[name]
        if not valid(value):
            shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
            raise InputError(f"{where}: field {name!r} must be {expected}, not {shown}")


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, all finite: a NaN or Inf in a head or LoRA weight
    silently turns every verdict into "safe" (or every answer into noise)."""
    from safetensors.torch import load_file

    with loading(path, "tensors"):
        tensors = load_file(str(path))
    check_finite(tensors, path)
    return tensors


def check_finite(tensors: dict[str, torch.Tensor], where: Path) -> None:
    for name, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise InputError(f"{where}: tensor {name!r} has non-finite values (NaN or Inf)")


def token_table(backbone) -> dict:
    """The safety tokens' strings and the ids they take just past the base vocabulary."""
    base = len(backbone.tokenizer)
    return {name: {"string": string, "id": base + i}
            for i, (name, string) in enumerate(zip(("safe", "unsafe"), SAFETY_TOKENS))}


def init_adapter(backbone, heads: int = 4, gate: str = "log", seed: int = 0):
    """A fresh, untrained adapter for `backbone`: V = 0 and b = 0, so z = 0 and p_unsafe is
    the LM's own safety log-odds from the seeded token rows until training moves them."""
    if gate not in GATES:
        raise InputError(f"unknown gate {gate!r}; expected one of {', '.join(GATES)}")
    d = backbone.hidden_size
    head = SafetyHead(d, heads=heads, gate=gate)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.Q.copy_(torch.randn(heads, d, generator=generator) / d ** 0.5)
        head.token_out.copy_(_word_rows(backbone, backbone.model.get_output_embeddings().weight))
        head.token_in.copy_(_word_rows(backbone, backbone.model.get_input_embeddings().weight))
    config = AdapterConfig(base_model=backbone.source, fingerprint=fingerprint(backbone),
                           hidden_size=d, heads=heads, gate=gate, tokens=token_table(backbone))
    return config, head.to(backbone.device)


def _word_rows(backbone, matrix: torch.Tensor) -> torch.Tensor:
    rows = []
    for word in SEED_WORDS:
        ids = backbone.tokenizer(word, add_special_tokens=False)["input_ids"]
        rows.append(matrix[ids].float().mean(dim=0))
    return torch.stack(rows).detach().cpu()


def save_adapter(directory: Path, config: AdapterConfig, head: SafetyHead, lora_model=None) -> Path:
    """Write an adapter, refusing (InputError, nothing written) one that would not load:
    a threshold or tensor that is not finite, a field of the wrong type."""
    from safetensors.torch import save_file

    directory = Path(directory)
    config.heads, config.hidden_size, config.gate = head.heads, head.hidden_size, head.gate
    config.threshold = float(config.threshold)
    tensors = {name: p.detach().float().cpu().contiguous() for name, p in head.named_parameters()}
    check_config(asdict(config), directory / CONFIG_FILE)
    check_finite(tensors, directory / HEAD_FILE)
    if lora_model is not None:
        from peft import get_peft_model_state_dict
        check_finite(get_peft_model_state_dict(lora_model), directory / LORA_DIR / LORA_WEIGHTS)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / HEAD_FILE), metadata={"format": "casa-head"})
    (directory / CONFIG_FILE).write_text(json.dumps(strict_json(asdict(config)), indent=2) + "\n")
    if lora_model is not None:
        lora_model.save_pretrained(directory / LORA_DIR, safe_serialization=True)
        # peft records where the base weights were read from: a path of this machine, which
        # a shared adapter should not carry (casa checks the model by its fingerprint).
        peft_config = directory / LORA_DIR / LORA_CONFIG
        fields = read_json_object(peft_config)
        fields["base_model_name_or_path"] = None
        peft_config.write_text(json.dumps(fields, indent=2) + "\n")
    return directory


@dataclass
class Adapter:
    """A freshly trained adapter, in memory (what `casa_cli.train` returns): `save` writes
    the directory that `casa_cli.load(model, adapter=directory)` reads."""
    config: AdapterConfig
    head: SafetyHead
    lora_model: object | None = None  # the peft model, in lora and vsfa modes

    def save(self, directory: str | Path) -> Path:
        return save_adapter(Path(directory), self.config, self.head, self.lora_model)


def read_config(directory: Path) -> AdapterConfig:
    """The adapter's casa_config.json, every field checked (`check_config`)."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise InputError(f"{directory}: not a CASA adapter (no {CONFIG_FILE})")
    raw = read_json_object(path)
    if raw.get("format_version") != FORMAT_VERSION:
        raise InputError(f"{path}: adapter format version {raw.get('format_version')!r}, "
                         f"this casa reads version {FORMAT_VERSION}")
    check_config(raw, path)
    return AdapterConfig(**raw)


def load_adapter(directory: Path, backbone) -> tuple[AdapterConfig, SafetyHead]:
    """Read an adapter and check it belongs to `backbone` (refusing a mismatch clearly),
    the layer its head reads included (callers pass `config.layer` to each prefill)."""
    directory = Path(directory)
    config = read_config(directory)
    # An adapter from before weight fingerprints is refused, not accepted on its old check
    # with a warning: that check cannot tell a base model from its fine-tune, exactly the
    # mix-up this guards against, and a head on the wrong model's states gives confident
    # verdicts at a threshold calibrated for other states (a safety check must fail closed,
    # and a stderr note goes unread in batch use). The file format itself did not change,
    # so FORMAT_VERSION stays: the fingerprint names its own scheme.
    if not config.fingerprint.startswith(FINGERPRINT_SCHEME + "-"):
        raise InputError(f"{directory / CONFIG_FILE}: adapter made by an older casa (its "
                         f"fingerprint {config.fingerprint} does not cover the model's "
                         "weights); retrain it for this model with `casa train`")
    actual = fingerprint(backbone)
    if config.fingerprint != actual:
        # float16 rounds the sampled weights differently (see `fingerprint`): say so
        hint = ("; a float16 load fingerprints differently, use --dtype bfloat16 or float32"
                if backbone.dtype == torch.float16 else "")
        raise InputError(f"{directory}: adapter was made for {config.base_model} "
                         f"(fingerprint {config.fingerprint}), not this model "
                         f"{backbone.source} (fingerprint {actual}){hint}")
    try:
        backbone.resolve_layer(config.layer)
    except InputError as err:
        raise InputError(f"{directory}: {err}") from None
    path = directory / HEAD_FILE
    if not path.is_file():
        raise InputError(f"{path}: missing")
    tensors = read_tensors(path)
    token_in = tensors.get("token_in")
    embed_size = token_in.shape[-1] if token_in is not None and token_in.dim() == 2 else None
    head = SafetyHead(config.hidden_size, config.heads, gate=config.gate,
                      threshold=config.threshold, embed_size=embed_size)
    expected = {name: tuple(p.shape) for name, p in head.named_parameters()}
    found = {name: tuple(t.shape) for name, t in tensors.items()}
    if expected != found:
        raise InputError(f"{path}: tensor shapes {found} do not match the config's {expected}")
    head.load_state_dict(tensors)
    return config, head.to(backbone.device)


def load_response_head(directory: Path, backbone, layer: int | None):
    """The adapter's response head, (config, head), or None when it has none. It must read
    the prompt head's `layer`: the monitor keeps one attention state, at one layer."""
    folder = Path(directory) / RESPONSE_DIR
    if not folder.is_dir():
        return None
    config, head = load_adapter(folder, backbone)
    if backbone.resolve_layer(config.layer) != backbone.resolve_layer(layer):
        raise InputError(f"{folder}: the response head reads layer {config.layer}, the prompt "
                         f"head layer {layer}; both must read the same layer")
    return config, head


def merge_lora(model, directory: Path):
    """`model` with the LoRA in `directory` merged into its weights: the fine-tuned model at
    the base model's speed (a VSFA adapter's)."""
    return peft_model(model, directory).merge_and_unload().eval()


def attach_lora(model, directory: Path) -> LoraGate:
    """The LoRA in `directory` injected into `model` unmerged and switched off: a CASA lora
    adapter's, which writes only after <|unsafe|> (`LoraGate`)."""
    peft_model(model, directory)
    return LoraGate(model)


def peft_model(model, directory: Path):
    """peft's model of `model` (changed in place) with the LoRA in `directory`. Weights come
    from safetensors only: a folder with only a pickled adapter_model.bin is refused and the
    pickle never opened."""
    from peft import PeftConfig, PeftModel

    weights = directory / LORA_WEIGHTS
    if not weights.is_file():
        pickled = (directory / PICKLED_LORA_WEIGHTS).exists()
        raise InputError(f"{weights}: missing; casa loads LoRA weights from safetensors only"
                         + (f" and never loads {PICKLED_LORA_WEIGHTS} (pickle)" if pickled else ""))
    read_json_object(directory / LORA_CONFIG)
    with loading(directory / LORA_CONFIG, "the LoRA config"):
        config = PeftConfig.from_pretrained(str(directory))
    read_tensors(weights)  # only checked (finite); peft reads the file again below
    # peft takes adapter_model.safetensors over a .bin whenever it exists (checked above).
    with loading(directory, "the LoRA adapter"), peft_quietly():
        return PeftModel.from_pretrained(model, str(directory), config=config)


class LoraGate:
    """The LoRA layers injected into a model, off unless switched on. CASA's lora mode writes
    with them only after <|unsafe|>: the prefill the head reads and every answer after a safe
    verdict run on the base weights exactly."""

    def __init__(self, model):
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
        self.switch(False)

    def switch(self, on: bool) -> None:
        # Only the flag peft's forward reads: its enable_adapters also sets requires_grad,
        # which would freeze the LoRA while it is being trained (it is off between steps).
        for layer in self.layers:
            layer._disable_adapters = not on

    @contextlib.contextmanager
    def on(self):
        self.switch(True)
        try:
            yield
        finally:
            self.switch(False)


@contextlib.contextmanager
def peft_quietly():
    """peft asks transformers `is_gradient_checkpointing`, which it has since renamed: a
    FutureWarning on every LoRA load that the user can do nothing about."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        yield


def lora_path(directory: Path | None) -> Path | None:
    if directory is None:
        return None
    path = Path(directory) / LORA_DIR
    return path if path.is_dir() else None
