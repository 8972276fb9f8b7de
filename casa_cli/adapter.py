"""CASA adapters (DESIGN §4): a directory with `casa_config.json`, `head.safetensors`
(Q, V, b and the two safety-token rows) and an optional peft `lora/` folder.

The safety tokens never enter the base model's vocabulary: their output rows live in the
head (the safety step reads them directly) and their input rows are fed as embeddings when
decoding continues after the verdict. The base model's weights, tokenizer and KV cache stay
untouched, and tied-embedding models need no special case.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from casa_cli.head import GATES, SAFETY_TOKENS, SafetyHead
from casa_cli.inputs import InputError
from casa_cli.output import strict_json

FORMAT_VERSION = 1
CONFIG_FILE = "casa_config.json"
HEAD_FILE = "head.safetensors"
LORA_DIR = "lora"
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
    mode: str = "head"  # "head" or "lora"
    layer: int | None = None  # decoder layer the head reads (through the final norm); None = last
    training: dict = field(default_factory=dict)  # data summary, hyper-parameters
    metrics: dict = field(default_factory=dict)  # held-out metrics
    format_version: int = FORMAT_VERSION


def fingerprint(backbone) -> str:
    """A hash of what the head depends on: the text model's shape and the tokenizer's vocab."""
    config = backbone.text_config
    shape = {key: getattr(config, key, None) for key in (
        "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
        "intermediate_size", "vocab_size")}
    digest = hashlib.sha256(json.dumps(shape, sort_keys=True).encode())
    vocab = sorted(backbone.tokenizer.get_vocab().items())
    digest.update(json.dumps(vocab, ensure_ascii=False).encode())
    return digest.hexdigest()[:16]


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
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config.heads, config.hidden_size, config.gate = head.heads, head.hidden_size, head.gate
    config.threshold = float(config.threshold)
    tensors = {name: p.detach().float().cpu().contiguous() for name, p in head.named_parameters()}
    save_file(tensors, str(directory / HEAD_FILE), metadata={"format": "casa-head"})
    (directory / CONFIG_FILE).write_text(json.dumps(strict_json(asdict(config)), indent=2) + "\n")
    if lora_model is not None:
        lora_model.save_pretrained(directory / LORA_DIR, safe_serialization=True)
    return directory


def read_config(directory: Path) -> AdapterConfig:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise InputError(f"{directory}: not a CASA adapter (no {CONFIG_FILE})")
    try:
        raw = json.loads(path.read_text())
        if raw.get("format_version") != FORMAT_VERSION:
            raise InputError(f"{path}: adapter format version {raw.get('format_version')}, "
                             f"this casa reads version {FORMAT_VERSION}")
        return AdapterConfig(**raw)
    except (json.JSONDecodeError, TypeError) as err:
        raise InputError(f"{path}: corrupt adapter config ({err})") from None


def load_adapter(directory: Path, backbone) -> tuple[AdapterConfig, SafetyHead]:
    """Read an adapter, check it belongs to `backbone` (refusing a mismatch clearly) and
    point the backbone at the layer the head reads."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    config = read_config(directory)
    actual = fingerprint(backbone)
    if config.fingerprint != actual:
        raise InputError(f"{directory}: adapter was made for {config.base_model} "
                         f"(fingerprint {config.fingerprint}), not this model "
                         f"{backbone.source} (fingerprint {actual})")
    try:
        backbone.read_layer(config.layer)
    except InputError as err:
        raise InputError(f"{directory}: {err}") from None
    try:
        tensors = load_file(str(directory / HEAD_FILE))
    except (FileNotFoundError, SafetensorError, OSError) as err:
        raise InputError(f"{directory / HEAD_FILE}: cannot read ({err})") from None
    head = SafetyHead(config.hidden_size, config.heads, gate=config.gate,
                      threshold=config.threshold,
                      embed_size=tensors.get("token_in", torch.empty(0, 0)).shape[-1] or None)
    expected = {name: tuple(p.shape) for name, p in head.named_parameters()}
    found = {name: tuple(t.shape) for name, t in tensors.items()}
    if expected != found:
        raise InputError(f"{directory / HEAD_FILE}: tensor shapes {found} do not match the "
                         f"config's {expected}")
    head.load_state_dict(tensors)
    return config, head.to(backbone.device)


def lora_path(directory: Path | None) -> Path | None:
    if directory is None:
        return None
    path = Path(directory) / LORA_DIR
    return path if path.is_dir() else None
