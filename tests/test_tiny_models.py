"""The tiny model factory: every family builds, saves, reloads from disk through the real
loading path, and runs a forward whose final-norm states project onto the logits."""
from __future__ import annotations

import json

import pytest
import torch
import transformers

import tiny_models as tm


def _processor_inputs(proc, texts, family, media=True, **kw):
    """Call the processor as casa does: images as PIL, audio as 1-D float arrays."""
    mods = tm.MODALITIES[family] if media else {"text"}
    if "image" in mods:
        kw["images"] = [tm.sample_image()]
    if "audio" in mods:
        kw[tm.AUDIO_KWARG] = [tm.sample_audio()]
        kw["sampling_rate"] = tm.AUDIO_SAMPLING_RATE
    if hasattr(proc, "tokenizer"):
        return proc(text=texts, return_tensors="pt", **kw)
    return proc(texts, return_tensors="pt", **kw)  # plain causal LM: AutoProcessor gives the tokenizer


def _media_messages(family):
    content = [{"type": m} for m in ("image", "audio") if m in tm.MODALITIES[family]]
    content.append({"type": "text", "text": "What is in this picture?"})
    return [{"role": "user", "content": content}]


def _capture_norm(model):
    norm = tm.final_norm(model)
    store = {}

    def hook(module, args, output):
        store.setdefault("h", output)  # returning None leaves the output unchanged

    return norm.register_forward_hook(hook), store


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = {}

    def get(family):
        if family not in cache:
            out = tmp_path_factory.mktemp(family)
            tm.build_tiny_model(family, out)
            cache[family] = out
        return cache[family]

    return get


@pytest.mark.parametrize("family", tm.FAMILIES)
def test_build_reload_forward(family, built):
    path = built(family)
    assert (path / "model.safetensors").is_file()
    assert (path / "config.json").is_file()

    # Reload exactly as a real checkpoint: AutoProcessor (+ the torchvision fallback) and
    # the Auto class / the class named by config.json.
    proc = tm.load_processor(path)
    model = getattr(transformers, tm.LOADER_CLASS[family]).from_pretrained(path, dtype=torch.float32).eval()
    assert type(model).__name__ == tm.ARCHITECTURE[family]
    assert json.loads((path / "config.json").read_text())["architectures"] == [tm.ARCHITECTURE[family]]
    tcfg = model.config.get_text_config()
    assert tcfg.hidden_size == tm.HIDDEN_SIZE[family]
    assert tcfg.num_hidden_layers == 2
    assert tcfg.max_position_embeddings == tm.MAX_POSITIONS
    tok = getattr(proc, "tokenizer", proc)
    assert tok.pad_token_id is not None
    assert model.get_output_embeddings() is model.lm_head

    text = proc.apply_chat_template(_media_messages(family), add_generation_prompt=True, tokenize=False)
    inputs = _processor_inputs(proc, [text], family)
    T = inputs["input_ids"].shape[1]
    assert T < tm.MAX_POSITIONS
    handle, store = _capture_norm(model)
    with torch.no_grad():
        out = model(**inputs, logits_to_keep=1)
    handle.remove()
    V = model.get_output_embeddings().weight.shape[0]
    expected_T = T if family in tm.IGNORES_LOGITS_TO_KEEP else 1
    assert tuple(out.logits.shape) == (1, expected_T, V)
    h = store["h"]
    assert tuple(h.shape) == (1, T, tm.HIDDEN_SIZE[family])
    with torch.no_grad():
        proj = model.get_output_embeddings()(h[:, -1])
    torch.testing.assert_close(proj, out.logits[:, -1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", tm.FAMILIES)
def test_text_only_left_padded_batch(family, built):
    path = built(family)
    proc = tm.load_processor(path)
    model = tm.load_tiny_model(family, path)
    tok = getattr(proc, "tokenizer", proc)
    tok.padding_side = "left"
    short = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    long = [
        {"role": "system", "content": "Be safe."},
        {"role": "user", "content": "Tell me a joke about cats."},
        {"role": "assistant", "content": "Why did the cat sit on the mat?"},
        {"role": "user", "content": [{"type": "text", "text": "Tell me a long story about a dog please."}]},
    ]
    texts = [proc.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in (short, long)]
    batch = _processor_inputs(proc, texts, family, media=False, padding=True)
    mask = batch["attention_mask"]
    assert mask.shape[0] == 2 and (mask[:, -1] == 1).all(), "left padding"
    padded_row = int(mask.sum(1).argmin())
    assert mask[padded_row, 0] == 0
    single = _processor_inputs(proc, [texts[padded_row]], family, media=False)
    handle, store = _capture_norm(model)
    with torch.no_grad():
        out = model(**batch, logits_to_keep=1)
        ref = model(**single, logits_to_keep=1)
    handle.remove()
    torch.testing.assert_close(out.logits[padded_row, -1], ref.logits[0, -1], rtol=1e-4, atol=1e-4)
    assert store["h"].shape[:2] == batch["input_ids"].shape


def test_context_overflow_possible(built):
    """A few hundred words exceed the tiny models' context."""
    path = built("llama")
    tok = tm.load_processor(path)
    ids = tok(" ".join(["the quick brown fox jumps over the lazy dog"] * 60))["input_ids"]
    assert len(ids) > tm.MAX_POSITIONS


def test_omni_thinker_loads_from_full_checkpoint(tmp_path):
    from safetensors.torch import load_file

    full = tm.build_tiny_omni_full(tmp_path / "omni_full")
    cfg = json.loads((full / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2_5OmniForConditionalGeneration"]
    # The thinker class takes thinker_config and the "thinker."-prefixed weights.
    thinker = transformers.Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(full, dtype=torch.float32)
    assert type(thinker.config).__name__ == "Qwen2_5OmniThinkerConfig"
    saved = load_file(str(full / "model.safetensors"))
    assert {k.split(".")[0] for k in saved} == {"thinker", "talker", "token2wav"}
    # Same weights as the thinker inside the full model (needs spk_dict.pt to load).
    whole = transformers.Qwen2_5OmniForConditionalGeneration.from_pretrained(full, dtype=torch.float32)
    want, mine = whole.thinker.state_dict(), thinker.state_dict()
    assert want.keys() == mine.keys()
    assert all(torch.equal(mine[k], want[k]) for k in want)
    assert not any(k.startswith(("talker", "token2wav")) for k in mine)
    proc = tm.load_processor(full)
    assert type(proc).__name__ == "Qwen2_5OmniProcessor"
    text = proc.apply_chat_template(_media_messages("qwen2_5_omni"), add_generation_prompt=True, tokenize=False)
    with torch.no_grad():
        out = thinker.eval()(**_processor_inputs(proc, [text], "qwen2_5_omni"))
    assert out.logits.shape[-1] == thinker.get_output_embeddings().weight.shape[0]
