"""What a prompt is (`Sample`) and where prompts come from: the shell, stdin, a JSONL
manifest, a folder of media files. Media are decoded here, with one-line errors that name
the file, so a bad record fails alone and the rest of a batch goes on."""
from __future__ import annotations

import codecs
import functools
import hashlib
import json
import sys
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".mp3", ".m4a", ".aiff", ".aif"}
# Decoded images larger than this are refused (a decompression bomb guard: Pillow's own
# default only warns between 89 and 179 megapixels).
MAX_IMAGE_PIXELS = 64_000_000
# Longer audio is refused: Whisper-style encoders (Qwen2-Audio, Qwen2.5-Omni) read 30 s
# windows, and a long clip decodes to gigabytes (3 hours of silence fit in a small FLAC).
MAX_AUDIO_SECONDS = 30.0
LABEL_ALIASES = {"harmful": "harmful", "unsafe": "harmful", "1": "harmful", "true": "harmful",
                 "benign": "benign", "safe": "benign", "0": "benign", "false": "benign"}
# The keys a manifest line may have that read_manifest interprets; others go to Sample.extra.
MANIFEST_FIELDS = {"id", "text", "prompt", "image", "images", "audio", "label", "category",
                   "response"}


def file_digest(path: Path) -> str:
    """A hash of a media file's bytes ("missing" if it cannot be read: the record fails
    later with the reason), remembered per path, size and modification time so a batch
    reads each file once more at most."""
    try:
        stat = Path(path).stat()
    except OSError:
        return "missing"
    return _file_digest(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=65536)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return "missing"
    return digest.hexdigest()[:24]


class InputError(ValueError):
    """Bad user input: the message is one line and names the input."""


@dataclass
class Sample:
    """One prompt: chat messages (plain-string contents) plus media files for the last user
    turn. `error` holds why the record could not even be read (kept so the batch reports it).
    A manifest sample also has `origin` ("file:line", for messages about it) and `extra`, the
    line's keys the reader does not interpret (such as a VSFA dataset's `answer`).
    `response`: an answer to the prompt, for `casa classify` to score the (prompt, response)
    pair (issue 17; with the adapter's response head where it has one, else the prompt
    head); the other commands read the prompt alone."""
    id: str
    messages: list[dict] = field(default_factory=list)
    images: list[Path] = field(default_factory=list)
    audio: list[Path] = field(default_factory=list)
    label: str | None = None
    category: str | None = None
    error: str | None = None
    origin: str | None = None
    extra: dict = field(default_factory=dict)
    response: str | None = None

    @property
    def text(self) -> str:
        users = [m["content"] for m in self.messages if m["role"] == "user"]
        return users[-1] if users else ""

    @property
    def key(self) -> str:
        """A hash of what the model reads: the messages, the media files (path and
        contents: the same question about two images is two prompts, and an image
        overwritten in place is another prompt) and a response to score, if any.
        On-disk caches name files by it."""
        content = [self.messages, [[str(p), file_digest(p)] for p in self.images + self.audio]]
        if self.response is not None:  # (a prompt alone keeps the key it always had)
            content.append(self.response)
        return hashlib.sha256(json.dumps(content).encode()).hexdigest()[:24]

    @property
    def modalities(self) -> set[str]:
        kinds = {"text"}
        if self.images:
            kinds.add("image")
        if self.audio:
            kinds.add("audio")
        return kinds

    def check(self) -> None:
        """Raise InputError for what can be told without the model."""
        if self.error:
            raise InputError(self.error)
        if not self.text.strip() and not (self.images or self.audio):
            raise InputError(f"{self.id}: empty prompt")  # media alone are a prompt
        for path in [*self.images, *self.audio]:
            if not path.is_file():
                raise InputError(f"{path}: no such file")


def prompt_sample(text: str, images=(), audio=(), sample_id: str = "prompt",
                  response: str | None = None) -> Sample:
    """A sample from the command line; `-` reads the prompt, or else the `response`, from
    stdin (not both: stdin is one text)."""
    if text == "-" and response == "-":
        raise InputError("the prompt and --response cannot both be - (stdin is one text)")
    if text == "-":
        text = sys.stdin.read()
    if response == "-":
        response = sys.stdin.read()
    return Sample(id=sample_id, messages=[{"role": "user", "content": text}],
                  images=[Path(p) for p in images], audio=[Path(p) for p in audio],
                  response=response)


def normalise_label(value) -> str | None:
    """"harmful", "benign", or None when there is no label; the one place labels and their
    aliases (unsafe/safe, 1/0, true/false) are read, so every command agrees on them."""
    if value is None or value == "":
        return None
    label = LABEL_ALIASES.get(str(value).strip().lower())
    if label is None:
        raise InputError(f"label must be harmful or benign (or unsafe/safe, 1/0, true/false), "
                         f"got {value!r}")
    return label


def read_manifest(path: Path) -> Iterator[Sample]:
    """JSONL: one object a line with `text` (or `prompt`) and optional `id`, `image` or
    `images`, `audio`, `label`, `category`, `response` (`text` may be empty or absent when
    the line has media: a clip alone is a prompt); other keys are kept in
    `Sample.extra`. Media paths resolve against the manifest's folder.

    Every command reads manifests here, so a line has the same id and the same checks
    everywhere. A malformed line of any kind yields a sample carrying its error
    ("file:line: what is wrong"), with the line's own id when it has a usable one, else
    `line-N`: the rest of the file is still read. The file is decoded line by line, so a
    bad byte spoils only its line; a UTF-8 BOM on line 1 is dropped; blank lines are
    skipped but counted."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            if number == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)
            if raw.strip():
                yield _manifest_sample(raw, path, number)


class _BadLine(ValueError):
    """What is wrong with one manifest line (the reader adds where it is)."""


def _manifest_sample(raw: bytes, path: Path, number: int) -> Sample:
    where = f"{path}:{number}"
    obj = None
    try:
        obj = _parse_line(raw)
        _check_writable(obj)
        return _sample_from(obj, path.parent, _line_id(obj) or f"line-{number}", where)
    except (_BadLine, InputError) as err:
        return Sample(id=_line_id(obj) or f"line-{number}", error=f"{where}: {err}", origin=where)


def _parse_line(raw: bytes) -> dict:
    """The line's JSON object."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise _BadLine(f"not valid UTF-8 (byte 0x{raw[err.start]:02x} at offset {err.start})") from None
    except json.JSONDecodeError as err:
        raise _BadLine(f"invalid JSON ({err.msg})") from None
    except ValueError as err:  # an integer over Python's 4300-digit conversion limit
        raise _BadLine(f"invalid JSON ({err})") from None
    except RecursionError:
        raise _BadLine("invalid JSON (nested too deeply)") from None
    if not isinstance(obj, dict):
        raise _BadLine("expected a JSON object")
    return obj


def _check_writable(obj: dict) -> None:
    """Every field can be written back as JSON in UTF-8. A lone surrogate escape ("\\ud800")
    is valid JSON but not Unicode, and nesting that json.loads just manages can be too deep
    for json.dumps: either would fail when a record is written, far from its line."""
    for key, value in obj.items():
        try:
            json.dumps({key: value}, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise _BadLine(f"field {key!r} holds a lone surrogate (\\ud800-\\udfff), which is "
                           "not valid Unicode") from None
        except RecursionError:
            raise _BadLine(f"field {key!r} is nested too deeply") from None


def _line_id(obj) -> str | None:
    """The line's own id as a string, when it has a usable one (a non-empty string or an
    integer that can be written back)."""
    value = obj.get("id") if isinstance(obj, dict) else None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return None
    value = str(value)
    return value if value.strip() and not _has_surrogate(value) else None


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _sample_from(obj: dict, base: Path, sample_id: str, where: str) -> Sample:
    if obj.get("id") is not None and _line_id(obj) is None:
        raise _BadLine(f"'id' must be a non-empty string or an integer, got {obj['id']!r}")
    if obj.get("image") is not None and obj.get("images") is not None:
        raise _BadLine("give 'image' or 'images', not both")
    images = _paths(obj, "image" if obj.get("image") is not None else "images", base)
    audio = _paths(obj, "audio", base)
    # a clip or an image alone is a prompt (a spoken question), as on the command line
    text = obj.get("text", obj.get("prompt", "" if images or audio else None))
    if not isinstance(text, str):
        raise _BadLine("missing string field 'text'" if text is None else
                       f"'text' must be a string, got {type(text).__name__}")
    if not text.strip() and not (images or audio):
        raise _BadLine("empty prompt")
    category, response = _optional_string(obj, "category"), _optional_string(obj, "response")
    if response is not None and not response.strip():
        raise _BadLine("empty response")
    return Sample(id=sample_id, messages=[{"role": "user", "content": text}],
                  images=images, audio=audio, label=normalise_label(obj.get("label")),
                  category=category, origin=where, response=response,
                  extra={k: v for k, v in obj.items() if k not in MANIFEST_FIELDS})


def _optional_string(obj: dict, key: str) -> str | None:
    value = obj.get(key)
    if value is not None and not isinstance(value, str):
        raise _BadLine(f"'{key}' must be a string, got {type(value).__name__}")
    return value


def _paths(obj: dict, key: str, base: Path) -> list[Path]:
    """A media field (a path or a list of paths; null or absent: none), resolved against
    the manifest's folder; each file must exist."""
    value = obj.get(key)
    names = [] if value is None else [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not all(isinstance(n, str) and n.strip() for n in names):
        raise _BadLine(f"'{key}' must be a path or a list of paths, got {value!r}")
    paths = [base / Path(name).expanduser() for name in names]
    missing = next((p for p in paths if not p.is_file()), None)
    if missing is not None:
        raise _BadLine(f"{missing}: no such file")
    return paths


def read_folder(folder: Path, prompt: str) -> Iterator[Sample]:
    """Every image and audio file under `folder` (sorted, recursive), paired with `prompt`;
    the sample id is the file's path relative to the folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: no such folder")
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        suffix = path.suffix.lower()
        if suffix in IMAGE_SUFFIXES or suffix in AUDIO_SUFFIXES:
            is_image = suffix in IMAGE_SUFFIXES
            yield Sample(id=str(path.relative_to(folder)),
                         messages=[{"role": "user", "content": prompt}],
                         images=[path] if is_image else [], audio=[] if is_image else [path])


def load_image(path: Path):
    """Decode an image to RGB; refuse non-images, corrupt files and decompression bombs."""
    from PIL import Image, UnidentifiedImageError

    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()
                return image.convert("RGB")
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except UnidentifiedImageError:
        raise InputError(f"{path}: not an image file") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InputError(f"{path}: image too large (over {MAX_IMAGE_PIXELS:,} pixels); "
                         "refused as a possible decompression bomb") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise InputError(f"{path}: corrupt image ({err})") from None


def load_audio(path: Path, sampling_rate: int, max_seconds: float | None = MAX_AUDIO_SECONDS):
    """Decode audio to mono float32 at `sampling_rate` (downmix, then polyphase resampling).
    Clips over `max_seconds` are refused from the header, before anything is decoded; NaN or
    infinite samples are refused too, as they would turn the verdict into noise."""
    import numpy as np
    import soundfile
    from scipy.signal import resample_poly

    if not Path(path).is_file():
        raise InputError(f"{path}: no such file")
    try:
        duration = soundfile.info(str(path)).duration
        if max_seconds is not None and duration > max_seconds:
            raise InputError(f"{path}: audio is {duration:.1f} s long, over the limit of "
                             f"{max_seconds:g} s (--max-audio-seconds)")
        data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as err:
        raise InputError(f"{path}: unreadable audio ({str(err).splitlines()[0]})") from None
    if data.size == 0:
        raise InputError(f"{path}: audio has no samples")
    if not np.isfinite(data).all():
        raise InputError(f"{path}: audio has non-finite samples")
    mono = data.mean(axis=1)
    if rate != sampling_rate:
        from math import gcd
        g = gcd(rate, sampling_rate)
        mono = resample_poly(mono, sampling_rate // g, rate // g)
    return np.ascontiguousarray(mono, dtype=np.float32)


def refuse_duplicate_ids(ids: Iterable[str], source: str, shown: int = 5) -> None:
    """InputError listing the ids that occur more than once in `source`: outputs and
    --resume are keyed by id, so a second sample with an id would be skipped as done."""
    repeated = [i for i, n in Counter(ids).items() if n > 1]
    if repeated:
        listed = ", ".join(map(repr, repeated[:shown]))
        more = f" and {len(repeated) - shown} more" if len(repeated) > shown else ""
        raise InputError(f"{source}: {len(repeated)} id(s) occur more than once: {listed}{more}; "
                         "ids must be unique")


def gather(prompt: str | None = None, images=(), audio=(), manifest: Path | None = None,
           folder: Path | None = None, folder_prompt: str | None = None,
           response: str | None = None) -> tuple[Iterable[Sample], int | None]:
    """The samples a command was given (exactly one source) and how many, when known. A
    manifest is read whole (samples are small), so duplicate ids are refused before any work.
    `response` (`casa classify --response`) goes with a PROMPT; a manifest line has its own."""
    if prompt is None and (images or audio) and manifest is None and folder is None:
        prompt = ""  # the media alone are the prompt (a spoken question)
    sources = [prompt is not None, manifest is not None, folder is not None]
    if sum(sources) != 1:
        raise InputError("give exactly one input: a PROMPT (or - for stdin), "
                         "--manifest FILE.jsonl, or --folder DIR --prompt TEXT")
    if (images or audio) and prompt is None:
        raise InputError("--image and --audio go with a PROMPT; a manifest names its own media")
    if response is not None and prompt is None:
        raise InputError("--response goes with a PROMPT; a manifest line has its own 'response'")
    if manifest is not None:
        samples = list(read_manifest(manifest))
        refuse_duplicate_ids((s.id for s in samples), str(manifest))
        return samples, len(samples)
    if folder is not None:
        if not folder_prompt:
            raise InputError("--folder needs --prompt TEXT to pair with each file")
        samples = list(read_folder(folder, folder_prompt))
        return iter(samples), len(samples)
    return iter([prompt_sample(prompt, images, audio, response=response)]), 1
