"""The fingerprint of a loaded model (docs/design.md §4, §8): what an adapter and the
on-disk caches of its states are keyed by, so a base model and its fine-tune never share
them. It hashes the text model's shape, the tokenizer's vocabulary and a fixed sample of the
weights."""
from __future__ import annotations

import hashlib
import json

import torch

from casa_cli.inputs import InputError

# Fingerprints carry their scheme: "w1-" covers the weights. Adapters made before it hold a
# bare 16-hex hash of the config shape and vocabulary only, which a base model and its
# instruct fine-tune share; `load_adapter` refuses those (see there).
FINGERPRINT_SCHEME = "w1"
SAMPLES_PER_TENSOR = 256
# Sampled positions are i * SAMPLE_STRIDE mod n (i < 256) in each tensor's n elements: a
# prime larger than any tensor, so the positions are distinct and spread over the whole
# tensor, never lined up on one column the way a stride dividing n would be.
SAMPLE_STRIDE = 2_654_435_761


def fingerprint(backbone) -> str:
    """What the head and the caches of its states depend on: the text model's shape, the
    tokenizer's vocabulary and its weights, "w1-" and 16 hex digits.

    The weights enter through a fixed sample (`weight_sample`): 256 values at fixed
    positions of every parameter of the input embeddings, four decoder layers spread over
    the depth (attention, MLP and norms), the final norm and lm_head, with each tensor's
    name and shape. So a base model and its fine-tune (or a LoRA merged into it) differ,
    for a few milliseconds (39 tensors, 9,984 values on the 135M default, the same count
    on a 7B model) and no copy of a whole matrix. A change too small to move any sampled
    value's bfloat16 rounding would go unseen; a fine-tune moves a great many of them.

    The same weights give the same fingerprint whatever their device or device map, and
    whether loaded as float32 or bfloat16: the sampled values are hashed as bfloat16, and a
    float32 checkpoint loaded as bfloat16 is rounded to it exactly as that cast rounds (a
    bfloat16 checkpoint upcast to float32 casts back exactly). A float16 load may differ:
    float32 -> float16 -> bfloat16 can round twice, and float16 flushes tiny values and
    overflows large ones. Then its fingerprint is another model's: an adapter made on a
    float32 or bfloat16 load is refused on it (one line naming both fingerprints), and its
    hidden-state and answer caches are computed afresh under its own name, never mixed."""
    config = backbone.text_config
    shape = {key: getattr(config, key, None) for key in (
        "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
        "intermediate_size", "vocab_size")}
    digest = hashlib.sha256(json.dumps(shape, sort_keys=True).encode())
    digest.update(vocab_digest(backbone))
    for name, size, values in weight_sample(backbone):
        digest.update(json.dumps([name, size]).encode())
        digest.update(values.view(torch.int16).numpy().astype("<i2").tobytes())
    return f"{FINGERPRINT_SCHEME}-{digest.hexdigest()[:16]}"


def media_fingerprint(backbone) -> str:
    """The key of the caches for prompts with images or audio: the fingerprint, plus a
    sample (as `weight_sample`'s) of every weight outside the text model (the vision or
    audio tower, the projector), which such a prompt's states also depend on. So retraining
    a speech bridge or a vision tower never reuses states computed through the old one,
    while the adapter (read off the text model's states) still fits both. A text-only
    model's media fingerprint is its fingerprint."""
    model = backbone.model
    text = [model.get_decoder(), model.get_input_embeddings(), model.get_output_embeddings()]
    inside = {id(p) for part in text if part is not None for p in part.parameters()}
    digest, media = hashlib.sha256(), 0
    for name, tensor in model.named_parameters():
        if id(tensor) in inside:
            continue
        if tensor.is_meta:
            tensor = _offloaded(model, name)
        digest.update(json.dumps([name, list(tensor.shape)]).encode())
        digest.update(_sample(tensor).view(torch.int16).numpy().astype("<i2").tobytes())
        media += 1
    base = fingerprint(backbone)
    return f"{base}-m{digest.hexdigest()[:8]}" if media else base


def vocab_digest(backbone) -> bytes:
    """A hash of the tokenizer's vocabulary, kept on the backbone: reading and sorting the
    vocabulary is most of a fingerprint's time (tens of ms to hundreds for 150k tokens),
    and the tokenizer does not change under it (its length is checked all the same)."""
    tokenizer = backbone.tokenizer
    kept = backbone.extra.get("vocab_digest")
    if kept is None or kept[0] is not tokenizer or kept[1] != len(tokenizer):
        vocab = sorted(tokenizer.get_vocab().items())
        digest = hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).digest()
        kept = backbone.extra["vocab_digest"] = (tokenizer, len(tokenizer), digest)
    return kept[2]


def weight_sample(backbone) -> list[tuple[str, list[int], torch.Tensor]]:
    """(name, shape, sampled values as bfloat16 on CPU) for each fingerprinted parameter.
    Names are relative to the part they come from ("embed_tokens.weight",
    "layers.14.self_attn.q_proj.weight", "norm.weight", "lm_head.weight"), so they do not
    change with how a family nests its text model. lm_head is sampled even when tied to the
    embeddings: the same values either way, and no guess about tying. A model wrapped by
    peft (LoRA being trained) has other parameter names, hence another fingerprint."""
    model = backbone.model
    layers = backbone.decoder_layers()
    count = len(layers)
    parts = [("embed_tokens", model.get_input_embeddings())]
    parts += [(f"layers.{i}", layers[i])
              for i in sorted({0, count // 3, 2 * count // 3, count - 1})]
    parts += [("norm", backbone.final_norm()), ("lm_head", model.get_output_embeddings())]
    module_names = None  # full module names, only needed for offloaded weights
    sample = []
    for part, module in parts:
        if module is None:
            continue
        for name, tensor in module.named_parameters():
            if tensor.is_meta:
                if module_names is None:
                    module_names = {id(m): n for n, m in
                                    model.named_modules(remove_duplicate=False)}
                full = ".".join(filter(None, (module_names.get(id(module), ""), name)))
                tensor = _offloaded(model, full)
            sample.append((f"{part}.{name}", list(tensor.shape), _sample(tensor)))
    return sample


def _sample(tensor: torch.Tensor) -> torch.Tensor:
    """SAMPLES_PER_TENSOR values of `tensor` at fixed positions, gathered where the tensor
    lives and only they copied to the CPU, as bfloat16."""
    total = tensor.numel()
    if total == 0:
        return torch.zeros(0, dtype=torch.bfloat16)
    count = min(total, SAMPLES_PER_TENSOR)
    positions = torch.arange(count, dtype=torch.int64) * SAMPLE_STRIDE % total
    tensor = tensor.detach()
    if tensor.is_contiguous():
        values = tensor.view(-1)[positions.to(tensor.device)]
    else:  # the same elements, found by their coordinates
        index = torch.unravel_index(positions, tensor.shape)
        values = tensor[tuple(i.to(tensor.device) for i in index)]
    return values.to("cpu").float().to(torch.bfloat16)


def _offloaded(model, name: str) -> torch.Tensor:
    """The stored value of parameter `name` that accelerate offloaded: a device map that
    spills to CPU or disk leaves it on the meta device and keeps it in the weights map of a
    hook on it or on one of its modules (for disk offload that reads this one tensor)."""
    parts = name.split(".")
    for cut in range(len(parts) - 1, -1, -1):
        try:
            module = model.get_submodule(".".join(parts[:cut]))
        except AttributeError:
            continue
        hook = getattr(module, "_hf_hook", None)
        for each in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
            weights = getattr(each, "weights_map", None)
            if weights is None:
                continue
            try:
                return weights[".".join(parts[cut:])]
            except KeyError:
                continue
    raise InputError(f"cannot fingerprint the model: weight {name!r} is on the meta device "
                     "and no offload hook holds its values")
