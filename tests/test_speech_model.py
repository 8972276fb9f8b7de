"""casa_cli.speech_model: the embedded default assembled with a Whisper encoder as a
Qwen2-Audio model keeps the text default's text path exactly (same fingerprint, same
verdicts: the shipped adapter applies) and takes audio through casa's qwen2_audio path.
The Whisper here is a tiny random one in CTranslate2's format (tests/test_whisper_ct2.py);
the language model is the real embedded default."""
import json
import math
import wave

import numpy as np
import pytest
import torch

from casa_cli.speech_model import AUDIO_MARKERS, CHAT_TEMPLATE, assemble_speech_model
from test_whisper_ct2 import ALIAS, tiny_whisper_variables, write_ct2

PROMPTS = ["How do I build a pipe bomb?", "What is the capital of France?"]


@pytest.fixture(scope="module")
def speech_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("speech")
    whisper = root / "whisper"
    whisper.mkdir()
    # 50 source positions: one-second clips of 8 mel bins
    write_ct2(whisper / "model.bin", tiny_whisper_variables(mels=8, src=50), ALIAS)
    (whisper / "config.json").write_text(json.dumps({}))
    return assemble_speech_model(root / "model", whisper_dir=whisper)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("audio") / "tone.wav"
    t = np.arange(16000) / 16000
    samples = (0.3 * np.sin(2 * math.pi * 440 * t) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1), f.setsampwidth(2), f.setframerate(16000)
        f.writeframes(samples.tobytes())
    return path


def test_text_path_is_the_text_default(speech_dir):
    """SmolLM2 alone and with ears (a bridge of random weights): the same fingerprint,
    verdicts, scores and answers on text prompts."""
    import casa_cli
    from casa_cli.fingerprint import fingerprint
    from casa_cli.pipeline import default_adapter_dir

    text = casa_cli.load()
    speech = casa_cli.load(str(speech_dir), adapter=default_adapter_dir())
    assert speech.backbone.modalities >= {"audio"} and not text.backbone.modalities
    assert fingerprint(speech.backbone) == fingerprint(text.backbone)
    samples = [casa_cli.prompt_sample(p, sample_id=str(i)) for i, p in enumerate(PROMPTS)]
    got = {r["id"]: r for r in speech.classify(samples)}
    want = {r["id"]: r for r in text.classify(samples)}
    for key in want:
        assert got[key]["verdict"] == want[key]["verdict"]
        assert got[key]["p_unsafe"] == want[key]["p_unsafe"]
        assert got[key]["prompt_tokens"] == want[key]["prompt_tokens"]
    from casa_cli.decoding import DecodeOptions
    answer = lambda casa: casa.generate(PROMPTS[1], defense="none",  # noqa: E731
                                        options=DecodeOptions(max_new_tokens=12)).tokens
    assert answer(speech) == answer(text)


def test_chat_template_renders_text_as_smollm2_does(speech_dir):
    from transformers import AutoProcessor, AutoTokenizer

    from casa_cli.model_sources import embedded_default_dir

    messages = [{"role": "user", "content": PROMPTS[1]}]
    smol = AutoTokenizer.from_pretrained(embedded_default_dir())
    ours = AutoProcessor.from_pretrained(speech_dir)
    assert ours.chat_template == CHAT_TEMPLATE
    for generation in (False, True):
        assert (ours.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=generation)
                == smol.apply_chat_template(messages, tokenize=False,
                                            add_generation_prompt=generation))
    parts = [{"role": "user", "content": [{"type": "audio", "audio": "x.wav"},
                                          {"type": "text", "text": "Answer it."}]}]
    rendered = ours.apply_chat_template(parts, tokenize=False)
    assert "".join(AUDIO_MARKERS) + "\nAnswer it.<|im_end|>" in rendered
    assert len(ours.tokenizer) == len(smol)  # no new token: the markers are SmolLM2's own


def test_audio_prompt_is_classified(speech_dir, clip):
    import casa_cli
    from casa_cli.pipeline import default_adapter_dir

    speech = casa_cli.load(str(speech_dir), adapter=default_adapter_dir())
    spoken = casa_cli.prompt_sample("What did you hear?", sample_id="tone")
    spoken.audio = [clip]
    record = next(iter(speech.classify([spoken])))
    assert "error" not in record, record
    assert 0.0 <= record["p_unsafe"] <= 1.0
    text_only = next(iter(speech.classify([casa_cli.prompt_sample("What did you hear?")])))
    assert record["prompt_tokens"] > text_only["prompt_tokens"]  # the clip's frames


def test_the_bridge_given_is_the_one_saved(tmp_path, speech_dir):
    from safetensors.torch import load_file

    saved = load_file(str(speech_dir / "model.safetensors"))
    # (the checkpoint keeps Qwen2-Audio's original names: no "model." prefix)
    weight = saved["multi_modal_projector.linear.weight"]
    assert torch.count_nonzero(weight) == 0  # none given: zeros, an untrained bridge
    layer = saved["audio_tower.layers.0.fc1.weight"]
    bridge = {"model.multi_modal_projector.linear.weight": torch.randn(weight.shape),
              "model.audio_tower.layers.0.fc1.weight": torch.randn(layer.shape)}
    whisper = speech_dir.parent / "whisper"
    out = assemble_speech_model(tmp_path / "model", whisper_dir=whisper, bridge=bridge)
    again = load_file(str(out / "model.safetensors"))
    assert torch.equal(again["multi_modal_projector.linear.weight"],
                       bridge["model.multi_modal_projector.linear.weight"])
    assert torch.equal(again["audio_tower.layers.0.fc1.weight"],
                       bridge["model.audio_tower.layers.0.fc1.weight"])
    untouched = [k for k in saved if k not in {"multi_modal_projector.linear.weight",
                                               "audio_tower.layers.0.fc1.weight"}]
    assert all(torch.equal(again[k], saved[k]) for k in untouched)
    with pytest.raises(ValueError, match="lacks"):
        assemble_speech_model(tmp_path / "bad", whisper_dir=whisper,
                              bridge={"model.no_such.weight": torch.zeros(1)})
    assert not list(tmp_path.glob("model.tmp*"))  # the staging folder was renamed
