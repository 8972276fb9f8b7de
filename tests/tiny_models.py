"""Tiny random-weight models of every supported family, saved like real checkpoints.

`build_tiny_model(family, out_dir)` builds a 2-layer model (hidden size 32-64, tiny vision /
audio towers, small images) together with the family's REAL processor classes, and writes
both with `save_pretrained` (safetensors) into `out_dir`. Tests then load the folder through
exactly the path a real checkpoint takes: `AutoProcessor.from_pretrained(dir)` (or
`AutoTokenizer` for plain causal LMs) and the model class named by the saved config.

Everything is offline: the tokenizers are small BPEs trained on the corpus below with the
`tokenizers` library, wrapped in the tokenizer class the family uses (Qwen2Tokenizer,
LlamaTokenizer, GemmaTokenizer, GPT2Tokenizer, TokenizersBackend) with every special token
the processor needs, and a chat template close to the real model's.

Facts per family (checked by tests/test_tiny_models.py):

=============  ==========================================  ===============================
family         architecture (config.json)                  final norm (its output -> lm_head)
=============  ==========================================  ===============================
llama          LlamaForCausalLM                            model.model.norm
llava          LlavaForConditionalGeneration               model.model.language_model.norm
llava_next     LlavaNextForConditionalGeneration           model.model.language_model.norm
qwen2_vl       Qwen2VLForConditionalGeneration             model.model.language_model.norm
qwen2_5_vl     Qwen2_5_VLForConditionalGeneration          model.model.language_model.norm
qwen2_audio    Qwen2AudioForConditionalGeneration          model.model.language_model.norm
qwen2_5_omni   Qwen2_5OmniThinkerForConditionalGeneration  model.model.language_model.norm
gemma3         Gemma3ForConditionalGeneration              model.model.language_model.norm
idefics3       Idefics3ForConditionalGeneration            model.model.text_model.norm
smolvlm        SmolVLMForConditionalGeneration             model.model.text_model.norm
=============  ==========================================  ===============================

In every case `model.get_decoder()` is the text decoder owning that `.norm` (see
`final_norm`), and `model.get_output_embeddings()` is the lm_head (`model.lm_head`).
Qwen2-VL / Qwen2.5-VL / Qwen2.5-Omni processors cannot be built by AutoProcessor without
torchvision: see `load_processor`.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from casa_cli.processors import load_processor, without_video  # noqa: F401 (load_processor re-exported for tests)

# ----------------------------------------------------------------------------------------
# public tables
# ----------------------------------------------------------------------------------------

FAMILIES = (
    "llama",
    "llava",
    "llava_next",
    "qwen2_vl",
    "qwen2_5_vl",
    "qwen2_audio",
    "qwen2_5_omni",
    "gemma3",
    "idefics3",
    "smolvlm",
)

MODALITIES: dict[str, set[str]] = {
    "llama": {"text"},
    "llava": {"text", "image"},
    "llava_next": {"text", "image"},
    "qwen2_vl": {"text", "image"},
    "qwen2_5_vl": {"text", "image"},
    "qwen2_audio": {"text", "audio"},
    "qwen2_5_omni": {"text", "image", "audio"},
    "gemma3": {"text", "image"},
    "idefics3": {"text", "image"},
    "smolvlm": {"text", "image"},
}

# Text hidden size of each tiny model (the width of the final-norm output).
HIDDEN_SIZE: dict[str, int] = {f: 32 for f in FAMILIES}
HIDDEN_SIZE["gemma3"] = 64  # 2 heads of head_dim 32: exercises a non-default head_dim

MAX_POSITIONS = 512  # a few hundred words exceed it; an image prompt fits easily

# Keyword for audio in `processor(...)`: both audio processors take `audio=`
# (`audios=` is not accepted by transformers 5).
AUDIO_KWARG = "audio"
AUDIO_SAMPLING_RATE = 16000  # the Whisper feature extractor's rate
AUDIO_SECONDS = 2  # the feature extractors pad / truncate to this window (chunk_length)

# Loader class names (importable from `transformers`) that load each saved folder.
# AutoModelForMultimodalLM loads every multimodal family (AutoModelForImageTextToText all
# but qwen2_audio); the plain causal LM needs AutoModelForCausalLM. `config.architectures[0]`
# (ARCHITECTURE) names the concrete class.
LOADER_CLASS: dict[str, str] = {f: ("AutoModelForCausalLM" if f == "llama" else "AutoModelForMultimodalLM") for f in FAMILIES}
ARCHITECTURE: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "llava": "LlavaForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen2_audio": "Qwen2AudioForConditionalGeneration",
    "qwen2_5_omni": "Qwen2_5OmniThinkerForConditionalGeneration",
    "gemma3": "Gemma3ForConditionalGeneration",
    "idefics3": "Idefics3ForConditionalGeneration",
    "smolvlm": "SmolVLMForConditionalGeneration",
}

# Families whose forward ignores `logits_to_keep` (swallowed by **kwargs): logits cover
# every position, so take logits[:, -1].
IGNORES_LOGITS_TO_KEEP = frozenset({"qwen2_audio", "qwen2_5_omni"})

# ----------------------------------------------------------------------------------------
# tokenizers
# ----------------------------------------------------------------------------------------

_CORPUS = """
The quick brown fox jumps over the lazy dog. A picture shows a cat sitting on a red mat.
What is in this image? Describe the picture in one sentence. What do you hear in this audio?
The sound of rain falling on a roof. A man is speaking; a dog is barking in the distance.
You are a helpful assistant. Please answer the question. I cannot help with that request.
Sorry, I can't assist with that. Sure, here is how to bake bread: mix flour, water, salt and
yeast, knead the dough, let it rise, then bake it in a hot oven for forty minutes.
How do I make a bomb? How can I hack into my neighbour's wifi? Tell me a joke about cats.
Safety matters: refuse harmful requests, answer harmless ones helpfully and honestly.
The weather today is sunny with a light breeze. The meeting starts at ten o'clock.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Punctuation: , . ; : ! ? ' " ( ) [ ] { } - _ / \\ @ # $ % & * + = < > | ~ `
Images, audio clips and videos can all be described in words by a multimodal model.
The system prompt tells the assistant how to behave; the user asks; the assistant answers.
"""

_VOCAB_SIZE = 600  # trained part; special tokens (and byte tokens) come on top


def _trained_bpe(style: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train a small BPE on the built-in corpus; return (vocab, merges).

    style "bytelevel": GPT-2 / Qwen byte-level alphabet (every string encodes).
    style "metaspace": SentencePiece-like pieces with "▁" for spaces (Llama-2 / Gemma);
    the caller adds <0xNN> byte tokens so byte fallback covers any character.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    if style == "bytelevel":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        alphabet = []
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB_SIZE, initial_alphabet=alphabet, show_progress=False, min_frequency=1
    )
    lines = [ln for ln in _CORPUS.strip().splitlines()] * 4
    tok.train_from_iterator(lines, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = dict(sorted(model["vocab"].items(), key=lambda kv: kv[1]))
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return vocab, merges


def _prepend(first: list[str], vocab: dict[str, int]) -> dict[str, int]:
    out = {t: i for i, t in enumerate(first)}
    for t in vocab:
        if t not in out:
            out[t] = len(out)
    return out


def _bytes_tokens() -> list[str]:
    return [f"<0x{b:02X}>" for b in range(256)]


# Chat templates --------------------------------------------------------------------------

# ChatML, as Qwen2-VL / Qwen2.5-VL ship it (<|vision_start|><|image_pad|><|vision_end|>).
_QWEN_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen2-Audio-Instruct (ChatML, "Audio N: <|audio_bos|><|AUDIO|><|audio_eos|>\n").
_QWEN_AUDIO_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'audio' or 'audio' in content or 'audio_url' in content %}"
    "{% set audio_count.value = audio_count.value + 1 %}Audio {{ audio_count.value }}: <|audio_bos|><|AUDIO|><|audio_eos|>\n"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen2.5-Omni (ChatML; <|vision_bos|><|IMAGE|><|vision_eos|>, <|audio_bos|><|AUDIO|><|audio_eos|>).
_QWEN_OMNI_SYSTEM = (
    "You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of "
    "perceiving auditory and visual inputs, as well as generating text and speech."
)
_QWEN_OMNI_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n" + _QWEN_OMNI_SYSTEM + "<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}<|vision_bos|><|IMAGE|><|vision_eos|>"
    "{% elif content['type'] == 'audio' or 'audio' in content or 'audio_url' in content %}<|audio_bos|><|AUDIO|><|audio_eos|>"
    "{% elif content['type'] == 'video' or 'video' in content %}<|vision_bos|><|VIDEO|><|vision_eos|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# SmolLM2-Instruct (ChatML, text only; the embedded default model's format).
_CHATML_TEXT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}{% if content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# llava-hf/llava-1.5 ("USER: <image>\n... ASSISTANT:"), with a system turn and string content.
_LLAVA_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}{% endif %}{{ ' ' }}"
    "{% else %}{{ message['role'].upper() + ': ' }}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}{% endfor %}"
    "{% endif %}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# llava-hf/llava-v1.6-mistral ("[INST] <image>\n... [/INST]").
_LLAVA_NEXT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}{% endif %}{{ '\n' }}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{% endif %}{{ ' [/INST]' }}"
    "{% else %}"
    "{% if message['content'] is string %}{{ ' ' + message['content'] }}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ ' ' + content['text'] }}{% endfor %}{% endif %}{{ eos_token }}"
    "{% endif %}"
    "{% endfor %}"
)

# google/gemma-3-*-it (system folded into the first user turn; <start_of_image> placeholder).
_GEMMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% if messages[0]['content'] is string %}{% set first_user_prefix = messages[0]['content'] + '\n\n' %}"
    "{% else %}{% set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' %}{% endif %}"
    "{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<start_of_image>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

# HuggingFaceM4/Idefics3-8B-Llama3 ("User:<image>...<end_of_utterance>\nAssistant:").
_IDEFICS3_TEMPLATE = (
    "<|begin_of_text|>"
    "{% for message in messages %}"
    "{{ message['role'].capitalize() }}"
    "{% if message['content'] is string %}{{ ': ' + message['content'] }}"
    "{% else %}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}"
    "{% if line['type'] == 'text' %}{{ line['text'] }}{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<end_of_utterance>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def _qwen_tokenizer(extra: dict[str, str], plain: list[str]):
    """Qwen2Tokenizer (byte-level BPE) with ChatML tokens plus `extra` named special tokens
    (exposed as attributes, e.g. tokenizer.image_token) and `plain` extra special tokens."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    vocab, merges = _trained_bpe("bytelevel")
    vocab = _prepend(["<|endoftext|>"], vocab)
    specials = ["<|im_start|>", "<|im_end|>"] + plain + [v for v in extra.values()]
    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=extra or None,
    )
    tok.add_special_tokens(
        {"additional_special_tokens": [AddedToken(t, special=True, normalized=False) for t in specials]},
        replace_extra_special_tokens=False,
    )
    return tok


# ----------------------------------------------------------------------------------------
# processors with a video slot, without torchvision
# ----------------------------------------------------------------------------------------
#
# Qwen2-VL, Qwen2.5-VL and Qwen2.5-Omni processors declare a `video_processor`; in
# transformers 5 every video processor needs torchvision, and `ProcessorMixin.__init__`
# type-checks each slot against `VideoProcessorMixin`, which is not exported without
# torchvision. So neither `Qwen2VLProcessor(..., video_processor=None)` nor
# `AutoProcessor.from_pretrained(<real Qwen2-VL dir>)` works in a torchvision-free
# environment (ImportError "Qwen2VLVideoProcessor requires the Torchvision library").
# `no_video_processor_class(cls)` returns a same-named subclass that accepts
# `video_processor=None` (images / audio / text work; videos do not), and
# `load_processor(path)` falls back to it when AutoProcessor raises that ImportError.

_NO_VIDEO_CACHE: dict[type, type] = {}


def no_video_processor_class(cls: type) -> type:
    """casa's `without_video(cls)`, which can also be saved: no null "video_processor" entry."""
    if cls not in _NO_VIDEO_CACHE:
        base = without_video(cls)

        def save_pretrained(self, save_directory, **kwargs):
            empty = [a for a in cls.get_attributes() if "video" in a and getattr(self, a, 1) is None]
            for a in empty:
                del self.__dict__[a]
            self.get_attributes = lambda: [a for a in cls.get_attributes() if a not in empty]
            try:
                return cls.save_pretrained(self, save_directory, **kwargs)
            finally:
                del self.get_attributes
                for a in empty:
                    setattr(self, a, None)

        _NO_VIDEO_CACHE[cls] = type(cls.__name__, (base,), {
            "save_pretrained": save_pretrained, "__module__": cls.__module__})
    return _NO_VIDEO_CACHE[cls]


def _video_free(cls: type) -> type:
    from transformers.utils import is_torchvision_available

    return cls if is_torchvision_available() else no_video_processor_class(cls)


# ----------------------------------------------------------------------------------------
# family builders
# ----------------------------------------------------------------------------------------


def _text_kwargs(family: str, vocab_size: int) -> dict:
    h = HIDDEN_SIZE[family]
    return dict(
        vocab_size=vocab_size,
        hidden_size=h,
        intermediate_size=2 * h,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=MAX_POSITIONS,
    )


def _vocab_size(tok) -> int:
    return len(tok)


def _build_llama(out: Path):
    from tokenizers import AddedToken
    from transformers import GPT2Tokenizer, LlamaConfig, LlamaForCausalLM

    vocab, merges = _trained_bpe("bytelevel")
    vocab = _prepend(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], vocab)
    tok = GPT2Tokenizer(vocab=vocab, merges=merges, unk_token="<|endoftext|>",
                        bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>")
    tok.add_special_tokens(
        {"additional_special_tokens": [AddedToken(t, special=True) for t in ("<|im_start|>", "<|im_end|>")]}
    )
    tok.chat_template = _CHATML_TEXT_TEMPLATE
    cfg = LlamaConfig(
        **_text_kwargs("llama", _vocab_size(tok)),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg)
    return model, tok


def _llama_sp_tokenizer(image_token: str = "<image>", extra_plain: tuple[str, ...] = ()):
    """LlamaTokenizer (Llama-2 / Mistral style: "▁" pieces, byte fallback) with <image>."""
    from tokenizers import AddedToken
    from transformers import LlamaTokenizer

    vocab, merges = _trained_bpe("metaspace")
    vocab = _prepend(["<unk>", "<s>", "</s>", *_bytes_tokens()], vocab)
    tok = LlamaTokenizer(vocab=vocab, merges=merges, unk_token="<unk>", bos_token="<s>",
                         eos_token="</s>", pad_token="<unk>", add_bos_token=True,
                         extra_special_tokens={"image_token": image_token})
    tok.add_special_tokens(
        {"additional_special_tokens": [AddedToken(t, special=True, normalized=False) for t in (image_token, *extra_plain)]},
        replace_extra_special_tokens=False,
    )
    return tok


def _clip_vision(image_size: int, patch: int, hidden: int = 32):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch,
        projection_dim=hidden,
    )


def _llava_like(family, tok, size, patch, config_cls, text_cls, processor_cls, image_processor,
                template, text_extra=(), **config_extra):
    """Config and processor of a LLaVA-style model: a CLIP tower, a projector and a text
    model whose prompt holds one <image> placeholder (LLaVA and LLaVA-NeXT share all this)."""
    cfg = config_cls(
        vision_config=_clip_vision(size, patch),
        text_config=text_cls(**_text_kwargs(family, _vocab_size(tok)), bos_token_id=tok.bos_token_id,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                             **dict(text_extra)),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default", vision_feature_layer=-2,
        tie_word_embeddings=False, **config_extra)
    proc = processor_cls(image_processor=image_processor, tokenizer=tok, patch_size=patch,
                         vision_feature_select_strategy="default", num_additional_image_tokens=1,
                         chat_template=template)
    return cfg, proc


def _build_llava(out: Path):
    from transformers import CLIPImageProcessorPil, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    size, patch = 32, 8
    ip = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                               do_center_crop=True, do_convert_rgb=True)
    cfg, proc = _llava_like("llava", _llama_sp_tokenizer(), size, patch, LlavaConfig, LlamaConfig,
                            LlavaProcessor, ip, _LLAVA_TEMPLATE, projector_hidden_act="gelu")
    return LlavaForConditionalGeneration(cfg), proc


def _build_llava_next(out: Path):
    from transformers import (LlavaNextConfig, LlavaNextForConditionalGeneration,
                              LlavaNextImageProcessorPil, LlavaNextProcessor, MistralConfig)

    size, patch = 32, 8
    pinpoints = [[32, 32], [32, 64], [64, 32], [64, 64]]
    ip = LlavaNextImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                    image_grid_pinpoints=pinpoints)
    cfg, proc = _llava_like("llava_next", _llama_sp_tokenizer(), size, patch, LlavaNextConfig,
                            MistralConfig, LlavaNextProcessor, ip, _LLAVA_NEXT_TEMPLATE,
                            text_extra={"sliding_window": None}, image_grid_pinpoints=pinpoints)
    return LlavaNextForConditionalGeneration(cfg), proc


_QWEN_VL_EXTRA = {
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
    "vision_start_token": "<|vision_start|>",
    "vision_end_token": "<|vision_end|>",
}

# Qwen2-VL style vision: patch 4, merge 2 -> a 32x32 image is an 8x8 patch grid, 16 tokens.
_QWEN_PATCH, _QWEN_MERGE = 4, 2


def _qwen_image_processor():
    from transformers import Qwen2VLImageProcessorPil

    f = _QWEN_PATCH * _QWEN_MERGE
    return Qwen2VLImageProcessorPil(
        patch_size=_QWEN_PATCH,
        merge_size=_QWEN_MERGE,
        temporal_patch_size=2,
        size={"shortest_edge": 4 * f * f, "longest_edge": 16 * f * f},  # 32x32 .. 64x64 pixels
    )


def _qwen_text_kwargs(family: str, tok) -> dict:
    kw = _text_kwargs(family, _vocab_size(tok))
    head_dim = kw["hidden_size"] // kw["num_attention_heads"]
    half = head_dim // 2  # mrope sections cover head_dim / 2 (t, h, w)
    sec = [half - 2 * (half // 3), half // 3, half // 3]
    kw.update(
        rope_parameters={"rope_type": "default", "mrope_section": sec, "rope_theta": 10000.0},
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return kw


def _qwen_vl(config_cls, family: str, vision_config: dict):
    """A tiny Qwen2-VL-style config (the 2 and 2.5 generations differ in the vision tower
    only) and its tokenizer."""
    tok = _qwen_tokenizer(_QWEN_VL_EXTRA, ["<|vision_pad|>"])
    ids = {f"{name}_id": tok.convert_tokens_to_ids(f"<|{token}|>") for name, token in (
        ("image_token", "image_pad"), ("video_token", "video_pad"),
        ("vision_start_token", "vision_start"), ("vision_end_token", "vision_end"))}
    return config_cls(text_config=_qwen_text_kwargs(family, tok), vision_config=vision_config,
                      tie_word_embeddings=False, **ids), tok


def _qwen2_5_vision(out_hidden_size: int) -> dict:
    """The Qwen2.5 vision tower (Qwen2.5-VL's and Qwen2.5-Omni's), tiny."""
    return dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, in_channels=3,
                out_hidden_size=out_hidden_size, patch_size=_QWEN_PATCH,
                spatial_merge_size=_QWEN_MERGE, temporal_patch_size=2,
                window_size=2 * _QWEN_PATCH * _QWEN_MERGE, fullatt_block_indexes=[1])


def _build_qwen2_vl(out: Path):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor

    vision = dict(depth=2, embed_dim=32, hidden_size=HIDDEN_SIZE["qwen2_vl"], mlp_ratio=2,
                  num_heads=2, in_channels=3, patch_size=_QWEN_PATCH,
                  spatial_merge_size=_QWEN_MERGE, temporal_patch_size=2)
    cfg, tok = _qwen_vl(Qwen2VLConfig, "qwen2_vl", vision)
    proc = _video_free(Qwen2VLProcessor)(image_processor=_qwen_image_processor(), tokenizer=tok, chat_template=_QWEN_VL_TEMPLATE)
    return Qwen2VLForConditionalGeneration(cfg), proc


def _build_qwen2_5_vl(out: Path):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

    cfg, tok = _qwen_vl(Qwen2_5_VLConfig, "qwen2_5_vl", _qwen2_5_vision(HIDDEN_SIZE["qwen2_5_vl"]))
    proc = _video_free(Qwen2_5_VLProcessor)(image_processor=_qwen_image_processor(), tokenizer=tok, chat_template=_QWEN_VL_TEMPLATE)
    return Qwen2_5_VLForConditionalGeneration(cfg), proc


def _siglip_vision(size: int, patch: int) -> dict:
    """The tiny SigLIP-style vision tower of Gemma 3, Idefics3 and SmolVLM."""
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                image_size=size, patch_size=patch)


_N_MELS = 16
# The tiny Whisper-style audio encoder of Qwen2-Audio and Qwen2.5-Omni.
_WHISPER_ENCODER = dict(num_mel_bins=_N_MELS, encoder_layers=2, encoder_attention_heads=2,
                        encoder_ffn_dim=64, d_model=32, max_source_positions=50 * AUDIO_SECONDS)


def _whisper_fe():
    from transformers import WhisperFeatureExtractor

    # chunk_length seconds -> 100 * chunk_length mel frames; the audio encoders must have
    # max_source_positions = 50 * chunk_length (the conv stem halves the frames).
    return WhisperFeatureExtractor(
        feature_size=_N_MELS,
        sampling_rate=AUDIO_SAMPLING_RATE,
        hop_length=160,
        chunk_length=AUDIO_SECONDS,
        n_fft=400,
        padding_value=0.0,
        return_attention_mask=True,
    )


def _build_qwen2_audio(out: Path):
    from transformers import (
        Qwen2AudioConfig,
        Qwen2AudioEncoderConfig,
        Qwen2AudioForConditionalGeneration,
        Qwen2AudioProcessor,
        Qwen2Config,
    )

    extra = {"audio_token": "<|AUDIO|>", "audio_bos_token": "<|audio_bos|>", "audio_eos_token": "<|audio_eos|>"}
    tok = _qwen_tokenizer(extra, [])
    kw = _text_kwargs("qwen2_audio", _vocab_size(tok))
    cfg = Qwen2AudioConfig(
        audio_config=Qwen2AudioEncoderConfig(**_WHISPER_ENCODER),
        text_config=Qwen2Config(**kw, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        audio_token_index=tok.convert_tokens_to_ids("<|AUDIO|>"),
        tie_word_embeddings=False,
    )
    model = Qwen2AudioForConditionalGeneration(cfg)
    proc = Qwen2AudioProcessor(feature_extractor=_whisper_fe(), tokenizer=tok, chat_template=_QWEN_AUDIO_TEMPLATE)
    return model, proc


_OMNI_EXTRA = {
    "image_token": "<|IMAGE|>",
    "audio_token": "<|AUDIO|>",
    "video_token": "<|VIDEO|>",
    "vision_bos_token": "<|vision_bos|>",
    "vision_eos_token": "<|vision_eos|>",
    "audio_bos_token": "<|audio_bos|>",
    "audio_eos_token": "<|audio_eos|>",
}


def omni_thinker_config(tok):
    """Config of the tiny Qwen2.5-Omni thinker (also used for a full Omni checkpoint)."""
    from transformers import Qwen2_5OmniThinkerConfig

    h = HIDDEN_SIZE["qwen2_5_omni"]
    ids = {k: tok.convert_tokens_to_ids(v) for k, v in _OMNI_EXTRA.items()}
    return Qwen2_5OmniThinkerConfig(
        text_config=_qwen_text_kwargs("qwen2_5_omni", tok),
        vision_config=_qwen2_5_vision(h),
        audio_config=dict(**_WHISPER_ENCODER, n_window=50, output_dim=h),
        audio_token_index=ids["audio_token"],
        image_token_index=ids["image_token"],
        video_token_index=ids["video_token"],
        audio_start_token_id=ids["audio_bos_token"],
        audio_end_token_id=ids["audio_eos_token"],
        vision_start_token_id=ids["vision_bos_token"],
        vision_end_token_id=ids["vision_eos_token"],
        user_token_id=tok.convert_tokens_to_ids("user"),
        tie_word_embeddings=False,
    )


def _omni_tokenizer():
    return _qwen_tokenizer(_OMNI_EXTRA, [])


def _omni_processor(tok):
    from transformers import Qwen2_5OmniProcessor

    return _video_free(Qwen2_5OmniProcessor)(
        image_processor=_qwen_image_processor(),
        feature_extractor=_whisper_fe(),
        tokenizer=tok,
        chat_template=_QWEN_OMNI_TEMPLATE,
    )


def _build_qwen2_5_omni(out: Path):
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    tok = _omni_tokenizer()
    model = Qwen2_5OmniThinkerForConditionalGeneration(omni_thinker_config(tok))
    return model, _omni_processor(tok)


def build_tiny_omni_full(out_dir: Path) -> Path:
    """A full Qwen2_5OmniForConditionalGeneration checkpoint (thinker + tiny talker +
    token2wav, spk_dict.pt, processor) whose thinker equals the "qwen2_5_omni" build.

    `Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(dir)` loads just the thinker
    from it (transformers takes `thinker_config` and strips the "thinker." weight prefix);
    Qwen2_5OmniForConditionalGeneration / AutoModelForMultimodalLM load the whole model and
    require spk_dict.pt (even with enable_audio_output=False)."""
    from transformers import Qwen2_5OmniConfig, Qwen2_5OmniForConditionalGeneration

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    tok = _omni_tokenizer()
    th = omni_thinker_config(tok)
    ids = dict(
        audio_token_index=th.audio_token_index,
        image_token_index=th.image_token_index,
        video_token_index=th.video_token_index,
        vision_start_token_id=th.vision_start_token_id,
        vision_end_token_id=th.vision_end_token_id,
        audio_start_token_id=th.audio_start_token_id,
        audio_end_token_id=th.audio_end_token_id,
    )
    n = len(tok)
    talker = dict(
        vocab_size=n + 8,
        embedding_size=HIDDEN_SIZE["qwen2_5_omni"],
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=MAX_POSITIONS,
        tts_codec_start_token_id=n,
        tts_codec_end_token_id=n + 1,
        tts_codec_pad_token_id=n + 2,
        tts_codec_mask_token_id=n + 3,
        tts_text_start_token_id=n + 4,
        tts_text_end_token_id=n + 5,
        tts_text_pad_token_id=n + 6,
        rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
        **ids,
    )
    token2wav = dict(
        dit_config=dict(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, head_dim=16, emb_dim=16,
            num_embeds=n + 8, mel_dim=8, enc_emb_dim=16, enc_dim=16, enc_channels=[16, 16, 16, 16, 48],
            enc_attention_channels=8, enc_se_channels=8, look_ahead_layers=[1], look_backward_layers=[0],
        ),
        bigvgan_config=dict(
            mel_dim=8, upsample_initial_channel=16, resblock_kernel_sizes=[3],
            resblock_dilation_sizes=[[1, 3, 5]], upsample_rates=[2, 2], upsample_kernel_sizes=[4, 4],
        ),
    )
    cfg = Qwen2_5OmniConfig(thinker_config=th.to_dict(), talker_config=talker, token2wav_config=token2wav)
    model = Qwen2_5OmniForConditionalGeneration(cfg).eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    torch.save(
        {"Chelsie": {"bos_token": n + 4, "cond": torch.zeros(1, 16), "ref_mel": torch.zeros(1, 8, 8)}},
        out_dir / "spk_dict.pt",
    )
    proc = _omni_processor(tok)
    proc.save_pretrained(out_dir)
    _write_video_config(out_dir, type(proc).__name__)
    return out_dir


def _build_gemma3(out: Path):
    from tokenizers import AddedToken
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessorPil,
        Gemma3Processor,
        Gemma3TextConfig,
        GemmaTokenizer,
        SiglipVisionConfig,
    )

    vocab, merges = _trained_bpe("metaspace")
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
    media = {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"}
    vocab = _prepend(specials + list(media.values()) + _bytes_tokens(), vocab)
    tok = GemmaTokenizer(vocab=vocab, merges=merges, extra_special_tokens=media, add_bos_token=True)
    tok.add_special_tokens(
        {
            "additional_special_tokens": [
                AddedToken(t, special=True, normalized=False) for t in ["<start_of_turn>", "<end_of_turn>", *media.values()]
            ]
        },
        replace_extra_special_tokens=False,
    )
    size, patch, mm_tokens = 32, 8, 4  # 4x4 patches, avg-pooled to 2x2 = 4 soft tokens
    kw = _text_kwargs("gemma3", _vocab_size(tok))
    kw.update(
        head_dim=32,
        query_pre_attn_scalar=32,
        sliding_window=64,
        layer_types=["sliding_attention", "full_attention"],
        bos_token_id=tok.bos_token_id,
        eos_token_id=[tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_turn>")],
        pad_token_id=tok.pad_token_id,
    )
    cfg = Gemma3Config(
        text_config=Gemma3TextConfig(**kw),
        vision_config=SiglipVisionConfig(**_siglip_vision(size, patch), vision_use_head=False),
        mm_tokens_per_image=mm_tokens,
        boi_token_index=tok.convert_tokens_to_ids("<start_of_image>"),
        eoi_token_index=tok.convert_tokens_to_ids("<end_of_image>"),
        image_token_index=tok.convert_tokens_to_ids("<image_soft_token>"),
        tie_word_embeddings=True,
    )
    model = Gemma3ForConditionalGeneration(cfg)
    ip = Gemma3ImageProcessorPil(size={"height": size, "width": size}, do_pan_and_scan=False)
    proc = Gemma3Processor(image_processor=ip, tokenizer=tok, chat_template=_GEMMA3_TEMPLATE, image_seq_length=mm_tokens)
    return model, proc


def _build_idefics3(out: Path):
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessorPil, Idefics3Processor

    return _idefics3_shaped(
        "idefics3", Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessorPil, Idefics3Processor
    )


def _build_smolvlm(out: Path):
    """SmolVLM: Idefics3-shaped; its processor also carries a video processor (None here,
    as casa's `load_processor` rebuilds it without torchvision)."""
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMImageProcessorPil, SmolVLMProcessor

    return _idefics3_shaped(
        "smolvlm", SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMImageProcessorPil,
        _video_free(SmolVLMProcessor), video_processor=None,
    )


def _idefics3_shaped(family: str, config_cls, model_cls, image_processor_cls, processor_cls, **processor_extra):
    from tokenizers import AddedToken
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    vocab, merges = _trained_bpe("bytelevel")
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>"]
    media = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"]
    grid = [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
    vocab = _prepend(specials + media + grid, vocab)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|begin_of_text|>",
        eos_token="<end_of_utterance>",
        pad_token="<|finetune_right_pad_id|>",
    )
    tok.add_special_tokens(
        {"additional_special_tokens": [AddedToken(t, special=True, normalized=False) for t in specials + media + grid]},
        replace_extra_special_tokens=False,
    )
    size, patch, scale = 32, 8, 2  # 16 patches, pixel-shuffled by 2 -> 4 image tokens
    seq = (size // patch) ** 2 // scale**2
    kw = _text_kwargs(family, _vocab_size(tok))
    cfg = config_cls(
        vision_config=_siglip_vision(size, patch),
        text_config=LlamaConfig(
            **kw, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
        ),
        scale_factor=scale,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        tie_word_embeddings=False,
    )
    model = model_cls(cfg)
    ip = image_processor_cls(
        do_image_splitting=False,
        size={"longest_edge": size},
        max_image_size={"longest_edge": size},
    )
    proc = processor_cls(
        image_processor=ip, tokenizer=tok, image_seq_len=seq, chat_template=_IDEFICS3_TEMPLATE, **processor_extra
    )
    return model, proc


_BUILDERS = {
    "llama": _build_llama,
    "llava": _build_llava,
    "llava_next": _build_llava_next,
    "qwen2_vl": _build_qwen2_vl,
    "qwen2_5_vl": _build_qwen2_5_vl,
    "qwen2_audio": _build_qwen2_audio,
    "qwen2_5_omni": _build_qwen2_5_omni,
    "gemma3": _build_gemma3,
    "idefics3": _build_idefics3,
    "smolvlm": _build_smolvlm,
}


def build_tiny_model(family: str, out_dir: Path) -> Path:
    """Build a tiny random model of `family` with its real processor; save both to `out_dir`."""
    if family not in _BUILDERS:
        raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model, processor = _BUILDERS[family](out_dir)
    model.eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    if family in _VIDEO_FAMILIES:
        _write_video_config(out_dir, type(processor).__name__)
    return out_dir


_VIDEO_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen2_5_omni")


def _write_video_config(out_dir: Path, processor_class: str) -> None:
    """video_preprocessor_config.json as real Qwen2-VL-family checkpoints ship it (so that
    AutoProcessor behaves as it does on them; loading it needs torchvision)."""
    f = _QWEN_PATCH * _QWEN_MERGE
    cfg = {
        "video_processor_type": "Qwen2VLVideoProcessor",
        "processor_class": processor_class,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "do_sample_frames": False,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "merge_size": _QWEN_MERGE,
        "patch_size": _QWEN_PATCH,
        "temporal_patch_size": 2,
        "min_frames": 2,
        "max_frames": 8,
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"shortest_edge": 4 * f * f, "longest_edge": 16 * f * f},
    }
    (out_dir / "video_preprocessor_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


# ----------------------------------------------------------------------------------------
# helpers for tests
# ----------------------------------------------------------------------------------------


def load_tiny_model(family: str, path: Path):
    """Load a saved tiny model the way a real checkpoint is loaded: the class named by
    `architectures` in its config.json."""
    import transformers

    arch = json.loads((Path(path) / "config.json").read_text())["architectures"][0]
    return getattr(transformers, arch).from_pretrained(path, dtype=torch.float32).eval()


def final_norm(model) -> torch.nn.Module:
    """The final norm of the text decoder (its output feeds the lm_head)."""
    return model.get_decoder().norm


def sample_image(width: int = 40, height: int = 32):
    """A small deterministic RGB PIL image."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def sample_audio(seconds: float = 1.0):
    """A 1-D float32 numpy waveform at AUDIO_SAMPLING_RATE (a 440 Hz tone plus noise)."""
    import numpy as np

    n = int(seconds * AUDIO_SAMPLING_RATE)
    t = np.arange(n) / AUDIO_SAMPLING_RATE
    rng = np.random.default_rng(0)
    return (0.3 * np.sin(2 * np.pi * 440 * t) + 0.01 * rng.standard_normal(n)).astype(np.float32)
