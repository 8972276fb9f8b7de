"""Processor loading that survives a torchvision-free install.

Qwen2-VL, Qwen2.5-VL, Qwen2.5-Omni and SmolVLM processors carry a video processor, and
transformers builds none without torchvision (whose wheels do not match every CPU torch). casa
takes no video, so when that is the only obstacle the processor is rebuilt from its other parts
with no video slot: tokenizer, image processor (PIL backend) and audio feature extractor."""
from __future__ import annotations

import functools
import inspect
import json
from pathlib import Path

from casa_cli.inputs import InputError


@functools.cache
def without_video(processor_class: type) -> type:
    """`processor_class`, accepting `video_processor=None` (images, audio and text work)."""
    def check_argument_for_proper_class(self, argument_name, argument):
        if argument is None and "video" in argument_name:
            return None
        return processor_class.check_argument_for_proper_class(self, argument_name, argument)

    def apply_chat_template(self, conversation, *args, **kwargs):
        # SmolVLM's override reads video_processor.num_frames / .fps even for a chat with no
        # video; with no video processor the generic template path is the whole job.
        if all(getattr(self, a, None) is None for a in processor_class.get_attributes() if "video" in a):
            from transformers.processing_utils import ProcessorMixin

            return ProcessorMixin.apply_chat_template(self, conversation, *args, **kwargs)
        return processor_class.apply_chat_template(self, conversation, *args, **kwargs)

    return type(processor_class.__name__, (processor_class,), {
        "check_argument_for_proper_class": check_argument_for_proper_class,
        "apply_chat_template": apply_chat_template,
        "__module__": processor_class.__module__})


def load_processor(directory: Path, trust_remote_code: bool = False):
    import transformers

    directory = Path(directory)
    try:
        return transformers.AutoProcessor.from_pretrained(directory, trust_remote_code=trust_remote_code)
    except (ImportError, OSError) as err:  # OSError: no video_preprocessor_config.json
        message = str(err).lower()
        if "torchvision" not in message and "video" not in message:
            raise
    processor_class = without_video(getattr(transformers, processor_class_name(directory)))
    parts = {}
    for attribute in processor_class.get_attributes():
        if "video" in attribute:
            parts[attribute] = None
        elif "tokenizer" in attribute:
            parts[attribute] = transformers.AutoTokenizer.from_pretrained(directory)
        elif "image" in attribute:
            parts[attribute] = transformers.AutoImageProcessor.from_pretrained(directory)
        else:
            parts[attribute] = transformers.AutoFeatureExtractor.from_pretrained(directory)
    settings = init_settings(directory, processor_class, parts)
    return processor_class(**parts, **settings, chat_template=chat_template(directory))


def init_settings(directory: Path, processor_class: type, parts: dict) -> dict:
    """The processor's own saved settings that its __init__ takes (SmolVLM's image_seq_len)."""
    path = directory / "processor_config.json"
    if not path.is_file():
        return {}
    accepted = inspect.signature(processor_class.__init__).parameters
    return {key: value for key, value in read_json_object(path).items()
            if key in accepted and key not in parts and key not in ("self", "chat_template")}


def processor_class_name(directory: Path) -> str:
    for name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        path = directory / name
        if path.is_file():
            found = read_json_object(path).get("processor_class")
            if found:
                return found
    raise ValueError(f"{directory}: cannot tell the processor class (no processor_class in its configs)")


def chat_template(directory: Path) -> str | None:
    if (directory / "chat_template.jinja").is_file():
        return (directory / "chat_template.jinja").read_text()
    if (directory / "chat_template.json").is_file():
        return read_json_object(directory / "chat_template.json").get("chat_template")
    return None


def read_json_object(path: Path) -> dict:
    """A JSON object from `path`; anything else is one InputError line naming the file."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:  # ValueError: bad JSON or bad UTF-8
        raise InputError(f"{path}: not readable JSON ({' '.join(str(err).split())})") from None
    if not isinstance(value, dict):
        raise InputError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value
