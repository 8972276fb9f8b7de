"""Where every on-disk cache lives and how its entries are named (docs/design.md §8).

All of them are under $CASA_CACHE_DIR (default ~/.cache/casa). The code that fills a cache
decides how it is written; this module only says where each one is and what keys it.
"""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("CASA_CACHE_DIR", Path.home() / ".cache" / "casa"))


def portable_path(path: str | Path) -> str:
    """A path as casa records it in files that travel (adapter metadata, results): inside
    casa's cache as `$CASA_CACHE_DIR/...`, inside casa's own install (its shipped adapters)
    relative to it, anything else as given, so no record names one machine's folders."""
    resolved = Path(path).resolve()
    for base, shown in ((cache_dir().resolve(), "$CASA_CACHE_DIR"),
                        (Path(__file__).resolve().parent.parent, None)):
        if resolved.is_relative_to(base):
            rest = resolved.relative_to(base).as_posix()
            return f"{shown}/{rest}" if shown else rest
    return str(path)


def default_model_folder() -> Path:
    """The embedded default model as safetensors, converted from its GGUF on first use.
    Its key is fixed: the GGUF ships inside a pinned registry package."""
    return cache_dir() / "smollm2-135m-instruct"


def states_folder(model_key: str, layer: int, num_layers: int) -> Path:
    """Prompt states for training, one file per prompt: one folder per base model
    (`model_key`, its weights fingerprint) and decoder layer (1-based, of `num_layers`).
    The last layer's folder has no suffix: its states are the final norm's output, what
    the head reads unless told otherwise."""
    suffix = "" if layer == num_layers else f"-layer{layer}"
    return cache_dir() / "states" / (model_key + suffix)


def answers_file(model_key: str, max_new_tokens: int) -> Path:
    """The base model's own greedy answers (lora mode, vsfa build), one JSON line per prompt:
    one file per base model (`model_key`, its weights fingerprint) and answer length cap."""
    return cache_dir() / "answers" / f"{model_key}-{max_new_tokens}.jsonl"


def builtin_data_root() -> Path:
    """The folder holding the built-in training sets, one subfolder per version key
    (`casa_cli.data.assemble.builtin_key`: a hash of `casa_cli/data` and the registry
    packages' versions)."""
    return cache_dir() / "data"
