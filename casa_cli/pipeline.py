"""The library's front door: a backbone plus its safety head, and the verdict path
(encode -> prefill -> safety head -> record). Commands call this; so can any script:

    import casa_cli
    casa = casa_cli.load()                       # the embedded default and its adapter
    for record in casa.classify([casa_cli.prompt_sample("How do I pick a lock?")]):
        print(record["verdict"], record["p_unsafe"])
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from casa_cli.adapter import (AdapterConfig, LoraGate, attach_lora, init_adapter, load_adapter,
                              load_response_head, lora_path, merge_lora)
from casa_cli.backbone import Backbone, Prepared, load_backbone, resolve_device
from casa_cli.decoding import generate
from casa_cli.head import SafetyHead, check_threshold, kernel_available, resolve_backend, verdict
from casa_cli.inputs import InputError, Sample, prompt_sample

DEFAULT_ADAPTER = "smollm2-135m-instruct"
# How many samples are read ahead and sorted by length before batching: large enough for
# batches of similar lengths, small enough that records stream out steadily.
WINDOW_BATCHES = 8


SHIPPED = Path(__file__).parent / "adapters"


def default_adapter_dir() -> Path | None:
    """The adapter shipped for the embedded default, if this install carries one."""
    path = SHIPPED / DEFAULT_ADAPTER
    return path if (path / "casa_config.json").is_file() else None


def shipped_adapters() -> list[str]:
    """Names of the adapters this install ships (`--adapter NAME` finds them)."""
    return sorted(p.name for p in SHIPPED.iterdir() if (p / "casa_config.json").is_file())


def adapter_path(adapter: str | Path) -> Path:
    """`adapter` as a directory: a path as given, or a shipped adapter's bare name when
    no such directory exists here (a local folder of that name wins)."""
    path = Path(adapter)
    if not path.exists() and path.name == str(adapter) and path.name in shipped_adapters():
        return SHIPPED / path.name
    return path


@dataclass
class Casa:
    backbone: Backbone
    head: SafetyHead
    config: AdapterConfig
    adapter_dir: Path | None
    kernel: str = "auto"
    # The adapter's response head (issue 17), (config, head), if it has one: it judges a
    # (prompt, response) pair, in classify and in the response monitor; else the prompt
    # head does.
    response: tuple[AdapterConfig, SafetyHead] | None = None
    # A lora-mode adapter's LoRA, unmerged and off except while the model writes after
    # <|unsafe|> (`decoding.generate`).
    refusal_lora: LoraGate | None = None

    def response_judge(self) -> tuple[SafetyHead, float]:
        """The head and threshold that judge a response."""
        if self.response is None:
            return self.head, self.config.threshold
        config, head = self.response
        return head, config.threshold

    @property
    def trained(self) -> bool:
        return self.config.trained

    @property
    def adapter_name(self) -> str | None:
        """The adapter as reports name it: the shipped one by name, others by path."""
        if self.adapter_dir is None:
            return None
        if self.adapter_dir.parent == SHIPPED:
            return f"shipped:{self.adapter_dir.name}"
        return str(self.adapter_dir)

    @property
    def backend(self) -> str:
        return resolve_backend(self.kernel, self.backbone.device)

    def info(self) -> dict:
        """What `casa load` reports."""
        b = self.backbone
        info = {
            "model": b.source, "family": b.family, "parameters": b.parameter_count,
            "dtype": str(b.dtype).replace("torch.", ""), "device": str(b.device),
            "hidden_size": b.hidden_size, "layers": b.num_layers,
            "context": b.max_positions, "modalities": sorted({"text", *b.modalities}),
            "adapter": self.adapter_name, "shipped_adapters": shipped_adapters(),
            "adapter_trained": self.trained, "adapter_mode": self.config.mode,
            "safety_tokens": self.config.tokens, "gate": self.config.gate,
            "threshold": self.config.threshold, "heads": self.config.heads,
            "response_head": None if self.response is None else {
                "threshold": self.response[0].threshold, "heads": self.response[0].heads},
            "head_layer": self.config.layer or b.num_layers,
            # issue 19: every family stops the same way (a hook at that layer), none falls back
            "verdict_prefill": f"layers 1-{b.resolve_layer(self.config.layer)} of {b.num_layers} "
                               + ("(classify; generate prefills every layer, as the LoRA writes "
                                  "the refusal after it)" if self.refusal_lora else
                                  "(classify, and generate until the verdict; a refusal stops there)"),
            "head_backend": self.backend, "load_seconds": round(b.load_seconds, 3),
            "import_seconds": round(b.import_seconds, 3),
        }
        placed = getattr(b.model, "hf_device_map", None)  # set by a device map
        if placed:
            info["device_map"] = sorted({str(where) for where in placed.values()})
        if b.device.type == "cuda":
            info["peak_gpu_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        info["peak_cpu_memory_mb"] = peak_rss_mb()
        return info

    # --- classify ---------------------------------------------------------------------
    def verdicts(self, prepared: list[Prepared], threshold: float | None = None,
                 explain: int = 0) -> list[dict]:
        """Run one batch through prefill and the safety head; one record per sample, whose
        `scored` says what was read: "prompt", or "response" (the prompt and the response
        after it; `prompt_tokens` then counts both). With `explain`, each record lists the
        tokens that pushed z up the most. A sample whose score is not a finite probability
        gets an error record, never a verdict."""
        started = time.perf_counter()
        batch = self.backbone.collate(prepared)
        prefill = self.backbone.prefill(batch, layer=self.config.layer, states_only=True)
        # Each record is judged by the head for what it scores (a pair: the response head,
        # when the adapter has one), at that head's threshold unless one is given.
        judges = {"prompt": (self.head, self.config.threshold)}
        if any(p.scored == "response" for p in prepared):
            judges["response"] = self.response_judge()
        outs = {}
        with torch.no_grad():
            for scored, (head, _) in judges.items():
                outs[scored] = head(prefill.H, prefill.mask, backend=self.kernel,
                                    return_weights=explain > 0)
        per_sample_ms = (time.perf_counter() - started) * 1000 / len(prepared)
        records = []
        for i, p in enumerate(prepared):
            out = outs[p.scored]
            p_unsafe = float(out.p_unsafe[i])
            try:
                judged = verdict(p_unsafe, judges[p.scored][1] if threshold is None else threshold)
            except ValueError as err:
                records.append(error_record(p.sample.id, err))
                continue
            record = {"id": p.sample.id, "scored": p.scored, "verdict": judged,
                      "p_unsafe": round(p_unsafe, 6), "z": round(float(out.z[i]), 6),
                      "lm_log_odds": round(float(out.lm_log_odds[i]), 6),
                      "prompt_tokens": int(prefill.mask[i].sum()),
                      "latency_ms": round(per_sample_ms, 3)}
            if p.truncated:
                record["truncated"] = True
            if p.sample.label is not None:
                record["label"] = p.sample.label
            if explain:
                record["explain"] = self.explain(batch["input_ids"][i], prefill.H[i],
                                                 prefill.mask[i], out.weights[i], explain,
                                                 judges[p.scored][0])
            records.append(record)
        return records

    def explain(self, input_ids, H, mask, weights, top: int, head: SafetyHead) -> list[dict]:
        """Each valid token's share of `head`'s z, sum_j a[t,j] (H[t].V[j]); the `top` largest."""
        values = H.float() @ head.V.detach().float().T  # (T, K)
        share = (weights * values).sum(-1).masked_fill(~mask, float("-inf"))
        best = share.topk(min(top, int(mask.sum()))).indices.tolist()
        decode = self.backbone.tokenizer.decode
        return [{"position": t, "token": decode([int(input_ids[t])]),
                 "contribution": round(float(share[t]), 6)} for t in best]

    def classify(self, samples: Iterable[Sample], batch_size: int = 8,
                 threshold: float | None = None, truncate: bool = False, explain: int = 0,
                 on_batch: Callable[[int], None] | None = None) -> Iterator[dict]:
        """Verdicts for `samples`, each batch's records as soon as it finishes (so a killed
        run loses at most the batch in flight). Samples are read `batch_size` x
        WINDOW_BATCHES at a time and batched by length, so records come in input order only
        within a batch: match them by `id`. A sample that fails yields an error record
        `{"id", "error"}` and the rest go on. `on_batch(n)` is told of each finished batch.

        A sample with a `response` is scored as the (prompt, response) pair, in one prefill:
        the head attends over the chat-formatted prompt and the assistant turn holding the
        response, h_last its last token (what `generate --monitor` has computed when an
        answer ends). The adapter's response head judges it at its own threshold (the prompt
        head, for an adapter without one). Pairs and prompts share batches; each record's
        `scored` ("prompt" or "response") says which it is."""
        if threshold is not None:
            check_threshold(threshold)
        window: list[Sample] = []
        for sample in samples:
            window.append(sample)
            if len(window) == batch_size * WINDOW_BATCHES:
                yield from self._classify_window(window, batch_size, threshold, truncate, explain, on_batch)
                window = []
        if window:
            yield from self._classify_window(window, batch_size, threshold, truncate, explain, on_batch)

    def _classify_window(self, window, batch_size, threshold, truncate, explain, on_batch):
        """Text is checked and fitted for the whole window (cheap), media are decoded one
        batch at a time (an image can take a gigabyte decoded), just before it runs."""
        ready: list[tuple[int, Prepared]] = []
        failed = []
        for index, sample in enumerate(window):
            try:
                ready.append((index, self.backbone.prepare(sample, truncate, decode_media=False,
                                                           response=sample.response)))
            except InputError as err:
                failed.append(error_record(sample.id, err))
        yield from failed
        if failed and on_batch:
            on_batch(len(failed))
        # Length-sorted batches waste less compute on padding.
        ready.sort(key=lambda item: len(item[1].text))
        for start in range(0, len(ready), batch_size):
            chunk = sorted(ready[start:start + batch_size], key=lambda item: item[0])
            records: dict[int, dict] = {}
            loaded: list[tuple[int, Prepared]] = []
            for index, p in chunk:
                try:
                    self.backbone.load_media(p)
                    loaded.append((index, p))
                except InputError as err:
                    records[index] = error_record(p.sample.id, err)
            if loaded:
                batch = [p for _, p in loaded]
                for (index, _), record in zip(loaded, self._run_batch(batch, threshold, explain)):
                    records[index] = record
            for _, p in loaded:
                p.media = {}  # decoded media live for one batch only
            yield from (records[index] for index, _ in chunk)
            if on_batch:
                on_batch(len(chunk))

    def _run_batch(self, prepared: list[Prepared], threshold, explain) -> list[dict]:
        """A failing batch is retried one sample at a time, so only the bad one fails."""
        try:
            return self.verdicts(prepared, threshold, explain)
        except (InputError, RuntimeError, ValueError) as err:
            if len(prepared) == 1:
                return [error_record(prepared[0].sample.id, err)]
            return [record for p in prepared for record in self._run_batch([p], threshold, explain)]

    # --- generate ---------------------------------------------------------------------
    def generate(self, samples, defense: str = "casa", **options):
        """Answers under `defense` (casa, coca, prompt, vsfa, none); `options` as in
        `casa_cli.decoding.generate` (`monitor=True` or a `casa_cli.monitor.MonitorOptions`
        watches each answer as it is written). One Sample (or prompt string) gives a
        `Generation` (text, verdict, p_unsafe, timings, monitor); an iterable gives records
        in input order, one sample at a time, with an error record `{"id", "error"}` for a
        sample that fails (a monitor score that is not finite included)."""
        if isinstance(samples, str):
            samples = prompt_sample(samples)
        if isinstance(samples, Sample):
            return generate(self, samples, defense, **options)
        return self._generate_each(samples, defense, options)

    def _generate_each(self, samples, defense, options):
        for sample in samples:
            try:
                yield generate(self, sample, defense, **options).record(sample)
            except (InputError, RuntimeError, ValueError) as err:
                yield error_record(sample.id, err)


def error_record(sample_id: str, err: Exception) -> dict:
    return {"id": sample_id, "error": str(err).splitlines()[0] if str(err) else type(err).__name__}


def peak_rss_mb() -> float:
    import resource
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def load(model: str | None = None, adapter: str | Path | None = None, device: str = "auto",
         dtype: str = "auto", kernel: str = "auto", trust_remote_code: bool = False,
         device_map: str | None = None, max_audio_seconds: float | None = None) -> Casa:
    """Load a backbone and its adapter. With no `model`, the embedded default and its shipped
    adapter; with no adapter at all, a fresh untrained head (`casa.trained` is False).
    `device_map="auto"` spreads the model over the visible GPUs (see `load_backbone`).
    `max_audio_seconds` caps audio clips (None: the audio encoder's window). Options are
    checked against this machine before any weights load; every load failure is one
    InputError line naming the file."""
    check_audio_cap(max_audio_seconds)
    if device_map is None:  # with a device map, the head's device is known only once placed
        check_kernel(kernel, resolve_device(device))
    backbone = load_backbone(model, device=device, dtype=dtype,
                             trust_remote_code=trust_remote_code, device_map=device_map)
    check_kernel(kernel, backbone.device)
    backbone.max_audio_seconds = max_audio_seconds
    adapter_dir = adapter_path(adapter) if adapter else (default_adapter_dir() if model is None else None)
    response = refusal_lora = None
    if adapter_dir is not None:
        config, head = load_adapter(adapter_dir, backbone)
        response = load_response_head(adapter_dir, backbone, config.layer)
        lora = lora_path(adapter_dir)
        if lora and config.mode == "lora":
            refusal_lora = attach_lora(backbone.model, lora)
        elif lora:  # vsfa: the fine-tuned model answers everything
            backbone.model = merge_lora(backbone.model, lora)
    else:
        config, head = init_adapter(backbone)
    return Casa(backbone, head.to(backbone.device), config, adapter_dir, kernel, response,
                refusal_lora)


def check_kernel(kernel: str, device: torch.device) -> None:
    """A usage error up front, rather than every record failing, for a kernel this device
    cannot run. (`resolve_backend` itself accepts "triton" anywhere: tests run the kernel
    through Triton's CPU interpreter.)"""
    if resolve_backend(kernel, device) != "triton":
        return
    if device.type != "cuda":
        raise InputError("the Triton kernel needs a CUDA device; use --kernel torch or auto")
    if not kernel_available():
        raise InputError("the Triton kernel needs the triton package, which is not installed; "
                         "use --kernel torch or auto")


def check_audio_cap(seconds: float | None) -> None:
    """The audio duration cap is a finite number of seconds above 0 (a NaN cap would compare
    false everywhere and let any clip through)."""
    if seconds is None:
        return
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) \
            or not 0 < seconds < math.inf:
        raise InputError(f"--max-audio-seconds {seconds!r}: not a finite number of seconds above 0")
