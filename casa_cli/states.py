"""Each prompt's hidden states at the decoder layers a head reads, computed once (one
prefill per prompt for every layer asked) and cached on disk per base model, layer and
prompt (docs/design.md §8), so training, the layer sweep, the ablation and the detection
tables never recompute a prompt they have seen."""
from __future__ import annotations

import os
from typing import Callable

import torch

from casa_cli.backbone import Backbone
from casa_cli.cache import states_folder
from casa_cli.fingerprint import fingerprint, media_fingerprint
from casa_cli.inputs import Sample


def prompt_states(backbone: Backbone, samples: list[Sample], layer: int | None,
                  batch_size: int = 16, on_batch: Callable[[int], None] | None = None
                  ) -> list[torch.Tensor]:
    """Each prompt's hidden states (T_i, d) in float16 at decoder layer `layer`, the one the
    head reads (an adapter's `config.layer`; None: the last), cached on disk one file per
    base model, layer and prompt, so any subset or superset of a set reuses what was
    computed."""
    layer = backbone.resolve_layer(layer)
    return layer_states(backbone, samples, [layer], batch_size, on_batch)[layer]


def layer_states(backbone: Backbone, samples: list[Sample], layers: list[int],
                 batch_size: int = 16, on_batch: Callable[[int], None] | None = None,
                 keep: bool = True) -> dict[int, list[torch.Tensor]]:
    """Each prompt's states at each of `layers` (1-based; the last is the final norm's
    output), {layer: [(T_i, d) float16]}. What the cache lacks comes from ONE prefill per
    prompt that misses any of the layers, hooks on all of them at once. `keep=False` only
    makes sure every state is on disk and returns nothing: a sweep over
    many layers then loads one layer at a time instead of holding them all in memory."""
    from safetensors.torch import load_file, save_file

    layers = sorted(set(layers))
    # a prompt with images or audio also depends on the towers' weights; text alone does not
    text_key = fingerprint(backbone)
    media_key = (media_fingerprint(backbone) if any(s.modalities != {"text"} for s in samples)
                 else text_key)
    model_keys = [text_key if s.modalities == {"text"} else media_key for s in samples]
    paths = {layer: [states_folder(model_key, layer, backbone.num_layers)
                     / f"{s.key}.safetensors" for model_key, s in zip(model_keys, samples)]
             for layer in layers}
    have = {layer: [p.is_file() for p in paths[layer]] for layer in layers}
    states = {layer: [load_file(str(p))["H"] if keep and found else None
                      for p, found in zip(paths[layer], have[layer])] for layer in layers}
    missing = [i for i in range(len(samples)) if not all(have[layer][i] for layer in layers)]
    if on_batch and len(missing) < len(samples):
        on_batch(len(samples) - len(missing))
    # similar lengths batch with less padding (a pair's length is its prompt's and response's)
    missing.sort(key=lambda i: len(samples[i].text) + len(samples[i].response or ""))
    for start in range(0, len(missing), batch_size):
        chunk = missing[start:start + batch_size]
        wanted = [layer for layer in layers if not all(have[layer][i] for i in chunk)]
        prefill = backbone.prefill(backbone.encode([samples[i] for i in chunk]), capture=False,
                                   layers=wanted, states_only=True)
        for layer in wanted:
            for row, index in enumerate(chunk):
                if have[layer][index]:
                    continue
                paths[layer][index].parent.mkdir(parents=True, exist_ok=True)
                H = prefill.layers[layer][row][prefill.mask[row]].to("cpu", torch.float16).clone()
                # written aside and renamed: a killed run leaves no torn file
                aside = paths[layer][index].with_suffix(f".{os.getpid()}.tmp")
                save_file({"H": H}, str(aside))
                os.replace(aside, paths[layer][index])
                if keep:
                    states[layer][index] = H
        del prefill
        if on_batch:
            on_batch(len(chunk))
    return states if keep else {}
