"""VSFA (arXiv 2603.08486): a more cautious model from neutral exposure alone.

The recipe fine-tunes a vision-language model with LoRA on ordinary visual question
answering built around threat-related images (weapons, fire, dangerous scenes). The data
carry no safety labels and no refusals: the questions are neutral (describe, list, count,
what could happen next) and the answers are plain descriptions. The paper reports that this
repeated exposure shifts the model's persona: attack success goes down, over-refusal goes
down too, and general ability is kept.

Two steps, mirroring `casa vsfa build` and `casa vsfa train`:
- build: a fixed list of neutral questions per image (IMAGE_QUESTIONS), answered by the base
  model itself (greedy, short: `casa_cli.lora.self_answers`) or, given user captions, by
  templates over the caption. Text-only backbones get the analogue: neutral reading
  questions (TEXT_QUESTIONS) about threat-related passages, answered by the base model; a
  built-in set of 60 passages ships in `casa_cli/data/vsfa_passages.json`.
- train: peft LoRA on the text decoder's attention projections only (the vision tower stays
  frozen), plain next-token loss on the answers. The result is a casa adapter directory
  (mode "vsfa", an untrained safety head, a `lora/` folder) that `casa_cli.load` merges into
  the backbone; `--defense vsfa` is then the plain decoding of the merged model.
"""
from __future__ import annotations

import csv
import io
import json
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.nn import functional as F

from casa_cli.adapter import AdapterConfig, init_adapter
from casa_cli.backbone import Backbone
from casa_cli.data.forms import lower_first, upper_first
from casa_cli.head import SafetyHead
from casa_cli.inputs import IMAGE_SUFFIXES, InputError, Sample, read_manifest
from casa_cli.judges import is_refusal
from casa_cli.lora import decoder_lora, self_answers

MODE = "vsfa"
PASSAGES_FILE = Path(__file__).parent / "data" / "vsfa_passages.json"
BUILTIN = "builtin"


@dataclass(frozen=True)
class Question:
    id: str
    text: str
    # How a user-supplied caption becomes the answer; None: only the model can answer it
    # (a caption says nothing reliable about counts or colours).
    from_caption: str | None = None


IMAGE_QUESTIONS = (
    Question("describe", "Describe this image.", "{Caption}."),
    Question("objects", "What objects can you see in this image?", "The image shows {caption}."),
    Question("count", "How many people or objects are in this image?"),
    Question("colours", "What are the main colours in this image?"),
    Question("setting", "Where does this scene take place?"),
    Question("next", "What could happen next in this scene?",
             "The image shows {caption}. A single picture does not show what happens next; "
             "that depends on what the people there do."),
)
TEXT_QUESTIONS = (
    Question("summary", "Summarise this passage in one or two sentences."),
    Question("objects", "What objects are mentioned in the passage?"),
    Question("setting", "Where does this take place?"),
    Question("next", "What might happen next?"),
)


# --- build -----------------------------------------------------------------------------
def pick_questions(questions: tuple[Question, ...], index: int, per_item: int | None) -> list[Question]:
    """`per_item` questions for the index-th item, rotating through the list so that every
    question is asked about as often as the others (all of them when per_item is None)."""
    count = len(questions) if per_item is None else min(per_item, len(questions))
    return [questions[(index + k) % len(questions)] for k in range(count)]


def read_passages(source: str | Path) -> list[dict]:
    """Passages as {"id", "text"}: "builtin", a JSONL manifest with `text` (and optional
    `id`; any bad line stops the build with its file:line), or any other file with one
    passage per line."""
    if str(source) == BUILTIN:
        return json.loads(PASSAGES_FILE.read_text(encoding="utf-8"))
    path = Path(source)
    passages = []
    if path.suffix.lower() == ".jsonl":
        for sample in read_manifest(path):
            if sample.error:
                raise InputError(sample.error)
            passages.append({"id": sample.id, "text": sample.text})
    else:
        lines = [line.strip() for line in read_text(path).splitlines()]
        passages = [{"id": f"line-{number}", "text": line}
                    for number, line in enumerate(lines, start=1) if line]
    if not passages:
        raise InputError(f"{path}: no passages")
    return passages


def read_captions(path: Path) -> dict[str, str]:
    """File name -> caption, from JSONL ({"file"|"image", "caption"}) or a CSV with a header
    naming a file/image column and a caption column."""
    path = Path(path)
    text = read_text(path)
    if path.suffix.lower() == ".csv":
        rows = list(csv.DictReader(io.StringIO(text)))
    else:
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise InputError(f"{path}:{number}: invalid JSON ({err.msg})") from None
    captions = {}
    for number, row in enumerate(rows, start=1):
        name = isinstance(row, dict) and (row.get("file") or row.get("image"))
        caption = isinstance(row, dict) and row.get("caption")
        if not (isinstance(name, str) and isinstance(caption, str) and caption.strip()):
            raise InputError(f"{path}: record {number} needs a file (or image) and a caption")
        captions[name] = caption.strip().rstrip(".")
    return captions


def read_text(path: Path) -> str:
    """A user's text file (a BOM dropped); a missing file or bad UTF-8 is bad input."""
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not valid UTF-8 (byte 0x{err.object[err.start]:02x} "
                         f"at offset {err.start})") from None


def caption_answer(question: Question, caption: str) -> str:
    return question.from_caption.format(Caption=upper_first(caption), caption=lower_first(caption))


def image_records(folder: Path, out_dir: Path, per_item: int | None = None,
                  captions: dict[str, str] | None = None) -> list[tuple[dict, Sample]]:
    """(record, sample) for each image under `folder` (sorted, recursive) and each of its
    questions. With captions, only captioned images and the questions a caption can answer,
    each record already carrying its templated answer. Image paths in the records are
    relative to `out_dir`, where the dataset file lives, as manifests expect."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: no such folder")
    images = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise InputError(f"{folder}: no image files")
    questions = IMAGE_QUESTIONS
    if captions is not None:
        questions = tuple(q for q in IMAGE_QUESTIONS if q.from_caption)
    items = []
    for index, path in enumerate(images):
        name = path.relative_to(folder).as_posix()
        caption = None if captions is None else captions.get(name, captions.get(path.name))
        if captions is not None and caption is None:
            continue
        for question in pick_questions(questions, index, per_item):
            record = {"id": f"{name}:{question.id}", "text": question.text,
                      "image": os.path.relpath(path.resolve(), Path(out_dir).resolve()),
                      "question": question.id, "source": name}
            if caption is not None:
                record.update(answer=caption_answer(question, caption), answered_by="caption")
            items.append((record, Sample(id=record["id"], images=[path], messages=[
                {"role": "user", "content": question.text}])))
    if not items:
        raise InputError(f"{folder}: no image has a caption in the captions file")
    return items


def text_records(passages: list[dict], per_item: int | None = None) -> list[tuple[dict, Sample]]:
    """(record, sample) for each passage and each of its reading questions."""
    items = []
    for index, passage in enumerate(passages):
        for question in pick_questions(TEXT_QUESTIONS, index, per_item):
            record = {"id": f"{passage['id']}:{question.id}",
                      "text": f"{passage['text']}\n\n{question.text}",
                      "question": question.id, "source": passage["id"]}
            items.append((record, Sample(id=record["id"], messages=[
                {"role": "user", "content": record["text"]}])))
    return items


def answer_with_model(backbone: Backbone, items: list[tuple[dict, Sample]], max_new_tokens: int
                      ) -> tuple[list[dict], int]:
    """The base model's own short greedy answers; answers that are empty or refusals are
    dropped (VSFA trains on no refusals). Returns the records and how many were dropped."""
    answers = self_answers(backbone, [sample for _, sample in items], max_new_tokens)
    kept = [{**record, "answer": answer, "answered_by": "model"}
            for (record, _), answer in zip(items, answers) if not is_refusal(answer)]
    return kept, len(items) - len(kept)


def write_dataset(records: list[dict], path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


# --- train -----------------------------------------------------------------------------
@dataclass
class VsfaOptions:
    epochs: int = 2
    lr: float = 2e-4
    lora_r: int = 8
    lora_alpha: int = 16
    seed: int = 0


def read_data(path: Path) -> list[tuple[Sample, str]]:
    """(prompt, answer) pairs from a `casa vsfa build` file (any manifest whose lines also
    carry a string `answer`); any bad line stops training with its file:line."""
    pairs = []
    for sample in read_manifest(Path(path)):
        if sample.error:
            raise InputError(sample.error)
        answer = sample.extra.get("answer")
        if not isinstance(answer, str) or not answer.strip():
            raise InputError(f"{sample.origin}: no string 'answer'")
        pairs.append((sample, answer))
    if not pairs:
        raise InputError(f"{path}: no training examples")
    return pairs


def answer_loss(backbone: Backbone, model, sample: Sample, answer: str) -> torch.Tensor:
    """Mean next-token CE of `answer` + end token after the prompt, in one forward pass over
    prompt and answer (media and mrope positions come from the processor's batch as usual)."""
    tokenizer = backbone.tokenizer
    # The answer is user data, like the prompt: typed control tokens stay text.
    ids = tokenizer(backbone.plain_text(answer), add_special_tokens=False)["input_ids"] \
        + [tokenizer.eos_token_id]
    target = torch.tensor([ids], device=backbone.device)
    batch = backbone.encode([sample], reserve=len(ids))
    # The last answer token is only a target; its logits would predict nothing.
    batch["input_ids"] = torch.cat([batch["input_ids"], target[:, :-1]], dim=1)
    batch["attention_mask"] = torch.cat(
        [batch["attention_mask"], batch["attention_mask"].new_ones(1, len(ids) - 1)], dim=1)
    # Qwen2-Audio and Qwen2.5-Omni ignore logits_to_keep and return every position: the
    # slice makes the answer's positions the last len(ids) either way.
    logits = model(**batch, logits_to_keep=len(ids)).logits[:, -len(ids):]
    return F.cross_entropy(logits[0].float(), target[0])


def train(backbone: Backbone, examples: list[tuple[Sample, str]], options: VsfaOptions,
          on_step: Callable[[int], None] | None = None) -> tuple[AdapterConfig, SafetyHead, object]:
    """LoRA on the decoder's attention, `epochs` shuffled passes one example per step; returns
    the adapter's config (mode "vsfa"), its untrained head and the peft model to save."""
    torch.manual_seed(options.seed)
    config, head = init_adapter(backbone, seed=options.seed)
    model = decoder_lora(backbone.model, options.lora_r, options.lora_alpha)
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=options.lr)
    generator = random.Random(options.seed)
    losses = []
    model.train()
    for _ in range(options.epochs):
        order = list(range(len(examples)))
        generator.shuffle(order)
        total = 0.0
        for index in order:
            loss = answer_loss(backbone, model, *examples[index])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += float(loss.detach())
            if on_step:
                on_step(1)
        losses.append(round(total / len(examples), 4))
    model.eval()
    config.mode = MODE
    config.training = {
        "recipe": "VSFA (arXiv 2603.08486): neutral QA on threat-related content, no safety labels",
        "options": asdict(options), "examples": len(examples),
        "images": len({str(p) for sample, _ in examples for p in sample.images}),
        "epoch_loss": losses,
    }
    return config, head, model
