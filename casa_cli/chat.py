"""Chat histories (`casa generate --messages FILE.json`): a JSON list of {role, content}
turns, made into one Sample whose last user turn is the prompt."""
from __future__ import annotations

import json
from pathlib import Path

from casa_cli.inputs import InputError, Sample, gather, prompt_sample

ROLES = ("system", "user", "assistant")


def gather_chat(messages: Path | None, prompt: str | None, images, audio, manifest: Path | None,
                folder: Path | None, folder_prompt: str | None):
    """`inputs.gather`'s samples and their count; with a `messages` chat history, the one
    sample it makes with the prompt."""
    if messages is None:
        return gather(prompt, images, audio, manifest, folder, folder_prompt)
    return [chat_sample(messages, prompt, images, audio, manifest or folder)], 1


def chat_sample(path: Path, prompt: str | None, images, audio, other_source) -> Sample:
    """One sample from a chat history file, with PROMPT as the last user turn (or the
    file's own last turn, which must then be the user's)."""
    if other_source is not None:
        raise InputError("--messages goes with a PROMPT (or alone), not with --manifest or --folder")
    history = read_history(path)
    if prompt is None:
        if not history or history[-1]["role"] != "user":
            raise InputError(f"{path}: the last message must be the user's turn (or give a PROMPT)")
        prompt, history = history[-1]["content"], history[:-1]
    sample = prompt_sample(prompt, images, audio)
    sample.messages = history + sample.messages
    return sample


def read_history(path: Path) -> list[dict]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: invalid JSON ({getattr(err, 'msg', err)})") from None
    if not isinstance(data, list) or not all(
            isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)
            for m in data):
        raise InputError(f"{path}: expected a JSON list of {{\"role\": system|user|assistant, "
                         "\"content\": text}}")
    return [{"role": m["role"], "content": m["content"]} for m in data]
