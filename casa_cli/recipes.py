"""Whole jobs as library calls: what `casa train`, `casa generate` and `casa vsfa build` /
`casa vsfa train` do between reading their options and printing. (`casa eval`'s is
`casa_cli.evaluation.evaluate`.)

    import casa_cli
    adapter = casa_cli.train("path/to/model", limit=50)       # on the built-in sets
    adapter.save("my-adapter")
    casa = casa_cli.load("path/to/model", adapter="my-adapter")

Like the commands, they draw progress bars on stderr when it is a terminal, and say there
what they chose for you (such as training on the built-in sets).
"""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Iterable, Iterator

from casa_cli import training, vsfa
from casa_cli.adapter import Adapter
from casa_cli.backbone import load_backbone
from casa_cli.cache import portable_path
from casa_cli.data.assemble import builtin_splits, limit_per_label
from casa_cli.decoding import check_defense, default_defense
from casa_cli.distributed import Shard, World
from casa_cli.inputs import InputError, Sample
from casa_cli.output import RecordWriter, progress_tasks, stderr
from casa_cli.pipeline import Casa, load
from casa_cli.training import TrainOptions, label_of, read_examples

Paths = Iterable[str | Path]


# --- train -----------------------------------------------------------------------------
def train(model: str | None = None, data: Paths | None = None, val: Paths | None = None,
          heldout: Paths | None = None, limit: int | None = None,
          options: TrainOptions | None = None, device: str = "auto", dtype: str = "auto",
          trust_remote_code: bool = False) -> Adapter:
    """A CASA adapter for `model` (None: the embedded default), trained on JSONL files of
    labelled prompts: `data` to train on, `val` to validate (default: a split of `data`),
    `heldout` scored into the adapter's metrics. Without `data`, the built-in sets (the
    shipped adapter's data, `builtin_splits`): their train split, and their val and two test
    splits as `val` and `heldout` unless given. `limit`: at most that many training examples
    per label, and the same share of each label from `val` and `heldout`. The data are read
    before the model loads, so a malformed line fails at once."""
    data, val, heldout = list(data or []), list(val or []), list(heldout or [])
    source: dict = {"source": "files", "data": [portable_path(p) for p in data],
                    "val": [portable_path(p) for p in val],
                    "heldout": [portable_path(p) for p in heldout]}
    if not data:
        builtin = builtin_splits()
        data, val = [builtin["train"]], val or [builtin["val"]]
        heldout = heldout or [builtin["test_ordinary"], builtin["test_overrefusal"]]
        source = {"source": "builtin", "version": builtin["train"].parent.name}
        stderr.print(f"training on the built-in sets (casa_cli.data.assemble, version "
                     f"{source['version']}), cached in {builtin['train'].parent}", markup=False)
    examples = read_examples(data)
    val_examples = read_examples(val) if val else None
    held = {Path(p).stem: read_examples([p]) for p in heldout}
    if limit:
        examples, val_examples, *held_lists = limit_per_label(
            examples, limit, label_of, val_examples, *held.values())
        held = dict(zip(held, held_lists))
        source["limit"] = limit
    backbone = load_backbone(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    with progress_tasks() as add:
        config, head, lora_model = training.train(backbone, examples, options or TrainOptions(),
                                                  val_examples, held, add)
    config.training["data"] = source
    return Adapter(config, head, lora_model)


# --- generate --------------------------------------------------------------------------
def generate_records(samples: Iterable[Sample], total: int | None = None,
                     output: str | Path | None = None, resume: bool = False,
                     model: str | None = None, adapter: str | Path | None = None,
                     defense: str | None = None, device: str = "auto",
                     device_map: str | None = None, dtype: str = "auto", kernel: str = "auto",
                     trust_remote_code: bool = False, max_audio_seconds: float | None = None,
                     progress: bool = False,
                     on_loaded: Callable[[Casa, str], None] | None = None,
                     **options) -> Iterator[dict]:
    """One record per sample (`total` of them, when known), answered under `defense` (None:
    the model's `default_defense`) with `options` as in `casa_cli.decoding.generate`, in
    input order; each is written to `output` (JSONL, flushed) before it is yielded. `output`
    is opened, and locked, before the model loads, so a busy one fails at once; `resume`
    skips the ids it already answers (`distributed.Shard`, as `casa classify` does).
    `on_loaded(casa, defense)` is told of the model and the defence chosen; `progress`
    draws a bar of the records on stderr, when that is a terminal."""
    output = None if output is None else Path(output)
    with Shard(World(), samples, total, output, resume) as job, \
            (RecordWriter(job.path, resume=resume) if job.path else nullcontext()) as writer:
        casa = load(model, adapter, device=device, dtype=dtype, kernel=kernel,
                    trust_remote_code=trust_remote_code, device_map=device_map,
                    max_audio_seconds=max_audio_seconds)
        defense = defense or default_defense(casa)
        check_defense(casa, defense)  # once, before any record, rather than once per record
        if on_loaded:
            on_loaded(casa, defense)
        bar = (job.progress("generate", records_on_stdout=output is None) if progress
               else nullcontext(lambda n=1: None))
        with bar as advance:
            for record in casa.generate(job.samples, defense, **options):
                advance(1)
                if writer:
                    writer.write(record)
                yield record
        job.finish([])


# --- VSFA ------------------------------------------------------------------------------
def build_vsfa(out: str | Path, images: str | Path | None = None,
               captions: str | Path | None = None, texts: str | Path | None = None,
               per_item: int | None = None, max_new_tokens: int = 48, model: str | None = None,
               device: str = "auto", dtype: str = "auto", trust_remote_code: bool = False) -> dict:
    """A VSFA dataset at `out` (JSONL): neutral questions about the threat-related `images`
    (a folder) or `texts` (a file of passages, or "builtin"), answered by `model` or, for
    images, from `captions` without a model; refusals are dropped. Returns its summary."""
    if (images is None) == (texts is None):
        raise InputError("give exactly one source: --images DIR or --texts FILE|builtin")
    if captions is not None and images is None:
        raise InputError("--captions goes with --images")
    if images is not None:
        items = vsfa.image_records(Path(images), Path(out).parent, per_item,
                                   vsfa.read_captions(Path(captions)) if captions else None)
    else:
        items = vsfa.text_records(vsfa.read_passages(texts), per_item)
    dropped = 0
    if captions is not None:
        records = [record for record, _ in items]
    else:
        backbone = load_backbone(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
        stderr.print(f"answering {len(items)} questions with the base model", markup=False)
        records, dropped = vsfa.answer_with_model(backbone, items, max_new_tokens)
    if not records:
        raise InputError("every answer was a refusal or empty: nothing to train on")
    vsfa.write_dataset(records, Path(out))
    return {"dataset": str(out), "examples": len(records), "dropped_refusals": dropped,
            "sources": len({r["source"] for r in records})}


def train_vsfa(data: str | Path, model: str | None = None,
               options: vsfa.VsfaOptions | None = None, device: str = "auto",
               dtype: str = "auto", trust_remote_code: bool = False) -> Adapter:
    """A VSFA LoRA adapter for `model`, fine-tuned on a `build_vsfa` dataset."""
    options = options or vsfa.VsfaOptions()
    examples = vsfa.read_data(Path(data))
    backbone = load_backbone(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    with progress_tasks() as add:
        config, head, lora_model = vsfa.train(backbone, examples, options,
                                              add("vsfa lora", len(examples) * options.epochs))
    config.training["data"] = str(data)
    return Adapter(config, head, lora_model)
