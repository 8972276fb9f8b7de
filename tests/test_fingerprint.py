"""The fingerprint covers the weights (issue 14): two models with the same config and
vocabulary but different weights (a base model and its fine-tune) never share cached hidden
states or answers, and an adapter made for one is refused on the other; the same weights
keep one fingerprint whatever their dtype (float32 or bfloat16) or placement; prompts with
audio or images are also keyed by the towers' weights and by the media files' bytes."""
import hashlib
import json
import shutil

import pytest
import torch

import casa_cli
from casa_cli.adapter import CONFIG_FILE, init_adapter, save_adapter
from casa_cli.fingerprint import fingerprint
from casa_cli.backbone import load_backbone
from casa_cli.inputs import prompt_sample
from casa_cli.lora import self_answers
from casa_cli.states import prompt_states

PROMPTS = ["a quiet river under the stone bridge", "tell me a joke about cats", "hi"]


def one_line_error(result, *needles):
    assert result.code == 2, (result.code, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("casa: error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def resaved(source, out, change=None, dtype=torch.float32):
    """A copy of the model folder `source` in `out`: its weights loaded, changed by `change`
    (a function of the model) and saved as `dtype`, its tokenizer files copied as they are."""
    from transformers import AutoModelForCausalLM

    shutil.copytree(source, out)
    (out / "model.safetensors").unlink()
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    if change:
        with torch.no_grad():
            change(model)
    model.to(dtype).save_pretrained(out, safe_serialization=True)
    return out


def fine_tuned(model):
    """What a fine-tune (or a merged LoRA on v_proj) does: every element of one projection
    in every layer moves a little, by about 2% of its spread."""
    generator = torch.Generator().manual_seed(0)
    for layer in model.model.layers:
        weight = layer.self_attn.v_proj.weight
        weight += 0.02 * weight.std() * torch.randn(weight.shape, generator=generator)


@pytest.fixture(scope="module")
def base(tiny_model):
    return tiny_model("llama")


@pytest.fixture(scope="module")
def tuned(base, tmp_path_factory):
    """The tiny llama's "instruct fine-tune": same config and tokenizer, other weights."""
    return resaved(base, tmp_path_factory.mktemp("tuned") / "model", fine_tuned)


def test_same_config_other_weights_other_fingerprint(base, tuned):
    a, b = load_backbone(str(base)), load_backbone(str(tuned))
    same = {key: value for key, value in a.model.config.to_dict().items() if key != "_name_or_path"}
    assert same == {key: value for key, value in b.model.config.to_dict().items()
                    if key != "_name_or_path"}  # the configs are the same
    assert a.tokenizer.get_vocab() == b.tokenizer.get_vocab()
    assert fingerprint(a) != fingerprint(b)
    assert fingerprint(a) == fingerprint(load_backbone(str(base)))  # and stable


def test_same_weights_same_fingerprint_in_float32_bfloat16_and_offloaded(base, tuned, tmp_path):
    import accelerate

    reference = fingerprint(load_backbone(str(base)))
    in_bf16 = load_backbone(str(base), dtype="bfloat16")
    assert in_bf16.dtype == torch.bfloat16
    assert fingerprint(in_bf16) == reference
    # a bfloat16 checkpoint of these weights, read back as float32, casts back exactly
    bf16_checkpoint = resaved(base, tmp_path / "bf16", dtype=torch.bfloat16)
    assert fingerprint(load_backbone(str(bf16_checkpoint), dtype="float32")) == reference
    # weights that accelerate offloaded (a device map spilling to CPU or disk leaves them on
    # the meta device, kept by hooks) are read from where the hooks keep them
    offloaded = load_backbone(str(base))
    accelerate.cpu_offload(offloaded.model, execution_device=torch.device("cpu"))
    assert offloaded.model.get_decoder().layers[0].self_attn.v_proj.weight.is_meta
    assert fingerprint(offloaded) == reference
    # while other weights stay apart in bfloat16 too
    assert fingerprint(load_backbone(str(tuned), dtype="bfloat16")) != reference


def test_cached_states_and_answers_never_mix(base, tuned, tmp_path, monkeypatch):
    monkeypatch.setenv("CASA_CACHE_DIR", str(tmp_path / "cache"))
    samples = [prompt_sample(text) for text in PROMPTS]
    a, b = load_backbone(str(base)), load_backbone(str(tuned))
    states_a = prompt_states(a, samples, None)  # fills the cache for the base model
    states_b = prompt_states(b, samples, None)  # must not read it
    monkeypatch.setenv("CASA_CACHE_DIR", str(tmp_path / "elsewhere"))
    fresh_b = prompt_states(b, samples, None)  # computed afresh, into a cache of its own
    monkeypatch.setenv("CASA_CACHE_DIR", str(tmp_path / "cache"))
    for cached, fresh, other in zip(states_b, fresh_b, states_a):
        assert torch.equal(cached, fresh)
        assert not torch.equal(cached, other)
    assert torch.equal(prompt_states(b, samples, None)[0], fresh_b[0])  # now from B's own cache
    assert len(list((tmp_path / "cache" / "states").iterdir())) == 2  # one folder each
    self_answers(a, samples[:1], max_new_tokens=2)
    self_answers(b, samples[:1], max_new_tokens=2)
    answers = sorted(p.name for p in (tmp_path / "cache" / "answers").iterdir())
    assert answers == sorted(f"{fingerprint(m)}-2.jsonl" for m in (a, b))


def test_adapter_for_one_is_refused_on_the_other(base, tuned, tmp_path, casa):
    adapter = save_adapter(tmp_path / "base-adapter", *init_adapter(load_backbone(str(base))))
    assert casa("classify", "hi", "--model", base, "--adapter", adapter).code == 0
    one_line_error(casa("classify", "hi", "--model", tuned, "--adapter", adapter),
                   str(adapter), "adapter was made for")
    # the same weights in bfloat16 take it
    loaded = casa("classify", "hi", "--model", base, "--adapter", adapter, "--dtype", "bfloat16")
    assert loaded.code == 0, loaded.stderr
    # float16 rounds the sampled weights twice: refused, saying which dtypes to use
    in_fp16 = casa("classify", "hi", "--model", base, "--adapter", adapter, "--dtype", "float16")
    one_line_error(in_fp16, "adapter was made for", "float16 load fingerprints differently")


def old_fingerprint(backbone) -> str:
    """The fingerprint adapters carried before it covered the weights."""
    config = backbone.text_config
    shape = {key: getattr(config, key, None) for key in (
        "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
        "intermediate_size", "vocab_size")}
    digest = hashlib.sha256(json.dumps(shape, sort_keys=True).encode())
    vocab = sorted(backbone.tokenizer.get_vocab().items())
    digest.update(json.dumps(vocab, ensure_ascii=False).encode())
    return digest.hexdigest()[:16]


def test_adapter_from_before_weight_fingerprints_is_refused(base, tmp_path, casa):
    backbone = load_backbone(str(base))
    adapter = save_adapter(tmp_path / "old-adapter", *init_adapter(backbone))
    path = adapter / CONFIG_FILE
    config = json.loads(path.read_text())
    config["fingerprint"] = old_fingerprint(backbone)
    path.write_text(json.dumps(config))
    one_line_error(casa("classify", "hi", "--model", base, "--adapter", adapter),
                   str(path), "older casa", "casa train")


def test_shipped_adapter_loads_on_the_default_in_float32_and_bfloat16():
    for dtype in ("float32", "bfloat16"):
        model = casa_cli.load(dtype=dtype)
        assert model.trained and model.config.fingerprint.startswith("w1-")
        assert model.config.fingerprint == fingerprint(model.backbone)


def test_caches_survive_a_run_killed_mid_write(base, tmp_path, monkeypatch):
    """A kill mid-append leaves a torn last line in the answers cache: the next run answers
    that prompt again and appends on a fresh line. State files are renamed into place, so
    none is ever read half-written (no temporary file is left behind either)."""
    monkeypatch.setenv("CASA_CACHE_DIR", str(tmp_path / "cache"))
    samples = [prompt_sample(text) for text in PROMPTS]
    backbone = load_backbone(str(base))
    first = self_answers(backbone, samples[:2], max_new_tokens=2)
    path = tmp_path / "cache" / "answers" / f"{fingerprint(backbone)}-2.jsonl"
    whole = path.read_text().splitlines()
    path.write_text(whole[0] + "\n" + whole[1][: len(whole[1]) // 2])  # torn by a kill
    assert self_answers(backbone, samples, max_new_tokens=2)[:2] == first
    lines = [json.loads(line) for line in path.read_text().splitlines()[2:]]
    # the torn line's prompt and the new ones, answered once each (shortest prompts first)
    torn = json.loads(whole[1])["key"]
    assert sorted(r["key"] for r in lines) == sorted({torn, *(s.key for s in samples[2:])})
    prompt_states(backbone, samples, None)
    files = [p.name for p in (tmp_path / "cache" / "states").rglob("*") if p.is_file()]
    assert len(files) == len(samples) and all(f.endswith(".safetensors") for f in files)


def other_projector(model):
    """A retrained audio bridge: the projector's weights move, the text model stays."""
    weight = model.model.multi_modal_projector.linear.weight
    generator = torch.Generator().manual_seed(0)
    weight += 0.1 * weight.std() * torch.randn(weight.shape, generator=generator)


def test_audio_prompts_states_are_keyed_by_the_towers_weights(tiny_model, tmp_path, monkeypatch):
    """Two Qwen2-Audio models with one text model and different projectors: one fingerprint
    (the head applies to both), text prompts share cached states, and an audio prompt's
    states are computed afresh for each (a retrained bridge never reads the old one's)."""
    from transformers import Qwen2AudioForConditionalGeneration

    from casa_cli.fingerprint import media_fingerprint
    from test_cli_families import make_audio

    source = tiny_model("qwen2_audio")
    out = tmp_path / "retrained"
    shutil.copytree(source, out)
    for f in out.glob("*.safetensors"):
        f.unlink()
    model = Qwen2AudioForConditionalGeneration.from_pretrained(source, dtype=torch.float32)
    with torch.no_grad():
        other_projector(model)
    model.save_pretrained(out, safe_serialization=True)
    monkeypatch.setenv("CASA_CACHE_DIR", str(tmp_path / "cache"))
    a, b = load_backbone(str(source)), load_backbone(str(out))
    assert fingerprint(a) == fingerprint(b)
    assert media_fingerprint(a) != media_fingerprint(b)
    assert media_fingerprint(a).startswith(fingerprint(a) + "-m")
    clip = make_audio(tmp_path / "q.wav")
    text, heard = prompt_sample("hi"), prompt_sample("what is this?", audio=[clip])
    states_a = prompt_states(a, [text, heard], None)
    states_b = prompt_states(b, [text, heard], None)
    assert torch.equal(states_a[0], states_b[0])
    assert not torch.equal(states_a[1], states_b[1])
    folders = sorted(p.name for p in (tmp_path / "cache" / "states").iterdir())
    assert folders == sorted({fingerprint(a), media_fingerprint(a), media_fingerprint(b)})


def test_a_media_file_overwritten_in_place_is_another_prompt(tmp_path):
    clip = tmp_path / "q.wav"
    clip.write_bytes(b"first")
    before = prompt_sample("what is this?", audio=[clip]).key
    clip.write_bytes(b"other!")
    assert prompt_sample("what is this?", audio=[clip]).key != before
    # a text prompt keeps the key it always had, and so its cached states
    text = json.dumps([[{"role": "user", "content": "hi"}], []]).encode()
    assert prompt_sample("hi").key == hashlib.sha256(text).hexdigest()[:24]
