"""A loaded model (`Backbone`): the facts about it, its chat text and media, and the
prefill that captures the hidden states `H` the safety head reads (docs/design.md §2, §5).
`load_backbone` checks the device options and reads the model through `model_sources`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from casa_cli.chat_text import CUT_MARK, ChatText
from casa_cli.inputs import MAX_AUDIO_SECONDS, InputError, Sample, load_audio, load_image
from casa_cli.model_sources import locate_model, read_model
from casa_cli.output import stderr


# accelerate's placement strategies for `device_map` ("auto" fills GPUs in order, then CPU).
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


@dataclass
class Prepared:
    sample: Sample
    text: str  # the prompt through the chat template (and the response after it, if scored)
    media: dict = field(default_factory=dict)  # decoded "images" / "audio" (`load_media`)
    truncated: bool = False  # the middle of the user's text was cut to fit the context
    # A text-only model's tokens for `text` (the tokenizer's output, special tokens added),
    # from the context check; `collate` pads them into the batch (see `tokenise`).
    tokens: dict | None = None
    # What `text` ends with: "prompt", or "response" (an assistant turn holding a response)
    scored: str = "prompt"


@dataclass
class Prefill:
    H: torch.Tensor | None  # (B, T, d) the states the head reads, after the final norm
    mask: torch.Tensor  # (B, T) bool, True on real prompt tokens
    logits: torch.Tensor | None  # (B, V) next-token logits at the last position (None: states_only)
    cache: object | None = None  # the KV cache, when asked for (transformers' `cache`)
    # With `prefill(layers=[...])` (training): decoder layer (1-based) -> its (B, T, d)
    # output through the final norm, all from this one pass; None otherwise.
    layers: dict[int, torch.Tensor] | None = None


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once every state wanted is captured."""


def _stop_forward(module, args, output):
    raise _StopForward


@dataclass
class Backbone(ChatText):  # chat text, plain user text, the middle cut: casa_cli/chat_text.py
    model: torch.nn.Module
    processor: object  # a ProcessorMixin for multimodal families, else the tokenizer
    family: str
    modalities: frozenset
    source: str
    load_seconds: float = 0.0
    import_seconds: float = 0.0
    extra: dict = field(default_factory=dict)
    # Longest audio clip accepted, in seconds; None: the audio encoder's own window.
    max_audio_seconds: float | None = None

    # --- facts about the model -------------------------------------------------------
    @property
    def tokenizer(self):
        return getattr(self.processor, "tokenizer", self.processor)

    @property
    def text_config(self):
        return self.model.config.get_text_config()

    @property
    def hidden_size(self) -> int:
        return self.text_config.hidden_size

    @property
    def num_layers(self) -> int:
        return self.text_config.num_hidden_layers

    @property
    def max_positions(self) -> int:
        return int(getattr(self.text_config, "max_position_embeddings", 0) or 1 << 30)

    @property
    def device(self) -> torch.device:
        """Where `H` comes out: the final norm's device. The safety head runs there, and
        under a device map (layers spread over GPUs) that is the last GPU's, not the first's."""
        weight = getattr(self.final_norm(), "weight", None)
        return (weight if weight is not None else self.model.get_output_embeddings().weight).device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_output_embeddings().weight.dtype

    @property
    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def final_norm(self) -> torch.nn.Module:
        """The module whose output, at every position, is what lm_head reads."""
        decoder = self.model.get_decoder()
        for name in ("norm", "final_layernorm", "ln_f", "final_layer_norm"):
            module = getattr(decoder, name, None)
            if isinstance(module, torch.nn.Module):
                return module
        raise RuntimeError(f"cannot find the final norm of {type(decoder).__name__}")

    def decoder_layers(self) -> torch.nn.ModuleList:
        return self.model.get_decoder().layers

    def resolve_layer(self, layer: int | None) -> int:
        """The decoder layer (1-based) that an adapter's `layer` names, None naming the last
        (docs/design.md §2); an InputError if this model has no such layer."""
        if layer is None:
            return self.num_layers
        if not 1 <= layer <= self.num_layers:
            raise InputError(f"layer {layer} is out of range: this model has layers 1 to "
                             f"{self.num_layers}")
        return layer

    # --- inputs ----------------------------------------------------------------------
    def check_modalities(self, sample: Sample) -> None:
        unsupported = sample.modalities - {"text"} - self.modalities
        if unsupported:
            kinds = " and ".join(sorted(unsupported))
            raise InputError(f"{sample.id}: {self.family} model does not accept {kinds} input")

    @property
    def audio_limit(self) -> float:
        """Longest audio clip accepted (s): --max-audio-seconds, else the encoder's window
        (Whisper-style feature extractors pad or cut to `chunk_length`, 30 s)."""
        if self.max_audio_seconds is not None:
            return self.max_audio_seconds
        extractor = getattr(self.processor, "feature_extractor", None)
        return float(getattr(extractor, "chunk_length", None) or MAX_AUDIO_SECONDS)

    def media(self, sample: Sample) -> dict:
        """Decoded media for the processor call (raises InputError naming the file)."""
        self.check_modalities(sample)
        media = {}
        if sample.images:
            media["images"] = [load_image(p) for p in sample.images]
        if sample.audio:
            rate = self.processor.feature_extractor.sampling_rate
            media["audio"] = [load_audio(p, rate, max_seconds=self.audio_limit)
                              for p in sample.audio]
        return media

    def prepare(self, sample: Sample, truncate: bool = False, reserve: int = 1,
                decode_media: bool = True, response: str | None = None) -> Prepared:
        """Check one sample, fit it to the context and (unless `decode_media` is False:
        `load_media` later, just before its batch runs) decode its media; raises InputError
        naming the input. Every prompt must leave `reserve` positions free (the safety
        token, any new tokens). With a `response`, the text is the (prompt, response) pair
        (`chat_text`)."""
        sample.check()
        self.check_modalities(sample)
        prepared = self.fit_context(sample, truncate, reserve, response)
        if decode_media:
            self.load_media(prepared)
        return prepared

    def load_media(self, prepared: Prepared) -> None:
        prepared.media = self.media(prepared.sample)

    def collate(self, prepared: list[Prepared]):
        """Model inputs for a batch of prepared samples (left padding), on the model's device."""
        if not self.modalities:  # text-only: the tokens the context check made, padded
            batch = self.tokenizer.pad([p.tokens for p in prepared], padding=True,
                                       return_tensors="pt")
            return batch.to(self.device)
        kwargs = {"padding": True, "return_tensors": "pt"}
        # Images nested per prompt: Gemma 3's processor checks each prompt's own count.
        images = [p.media.get("images", []) for p in prepared]
        audio = [clip for p in prepared for clip in p.media.get("audio", [])]
        if any(images):
            kwargs["images"] = images
        if audio:  # decoded at the extractor's rate (`media`); said, or it warns per clip
            kwargs["audio"] = audio
            kwargs["sampling_rate"] = self.processor.feature_extractor.sampling_rate
        texts = [p.text for p in prepared]
        kwargs["add_special_tokens"] = self.adds_special_tokens(texts[0])
        return self.processor(text=texts, **kwargs).to(self.device)

    def encode(self, samples: list[Sample], truncate: bool = False, reserve: int = 1):
        """Model inputs for `samples`; one with a `response` is the (prompt, response) pair."""
        return self.collate([self.prepare(s, truncate, reserve, response=s.response)
                             for s in samples])

    def fit_context(self, sample: Sample, truncate: bool, reserve: int,
                    response: str | None = None) -> Prepared:
        """`sample` (and `response` after it, if given) through the chat template and
        (text-only models) tokenised, its media not yet decoded; an error if it overflows
        the context. With `truncate` (text only) the middle of the user's text, or of the
        response when that is the longer (`middle_cuts`), is cut to fit, keeping its start
        and its end: a request at either end survives, and an attack cannot push it out of
        view with padding on one side."""
        text = self.chat_text(sample, response)
        scored = "prompt" if response is None else "response"
        what = "prompt" if response is None else "prompt with its response"
        budget = self.max_positions - reserve
        length, tokens = self.tokenise(text)
        if length <= budget:
            return Prepared(sample, text, tokens=tokens, scored=scored)
        # Media expand into many tokens inside the processor; the check above counts only
        # their placeholders, so the model itself would still catch an overflow there.
        if not truncate or sample.images or sample.audio:
            raise InputError(f"{sample.id}: {what} is {length} tokens, over the model's "
                             f"context of {budget} (use --truncate to cut text prompts)")
        parts = [sample.text] + ([] if response is None else [response])
        drop = length - budget + self.count_tokens(CUT_MARK)
        # Decoding and re-encoding can shift a token or two: cut more until it fits.
        while (cuts := self.middle_cuts(parts, drop)) is not None:
            cut = self.chat_text(Sample(id=sample.id, messages=[
                *sample.messages[:-1], {"role": "user", "content": cuts[0]}]), *cuts[1:])
            cut_length, tokens = self.tokenise(cut)
            excess = cut_length - budget
            if excess <= 0:
                stderr.print(f"warning: {sample.id}: {what} truncated from {length} to "
                             f"{budget + excess} tokens (the middle cut)")
                return Prepared(sample, cut, truncated=True, tokens=tokens, scored=scored)
            drop += excess
        raise InputError(f"{sample.id}: the chat template alone overflows the context")

    def tokenise(self, text: str) -> tuple[int, dict | None]:
        """(the length of chat text `text` as the context check counts it: its own tokens,
        not the BOS or EOS the tokenizer adds; its tokens, which `collate` pads into the
        batch). Tokens for text-only models only: a multimodal processor expands each media
        placeholder into the media's tokens as it tokenises, so its batch cannot reuse
        tokens of the bare text; there `collate` has the processor tokenise the text again."""
        if self.modalities:
            return self.count_tokens(text), None
        adds = self.adds_special_tokens(text)
        tokens = dict(self.tokenizer(text, add_special_tokens=adds))
        added = self.tokenizer.num_special_tokens_to_add() if adds else 0
        return len(tokens["input_ids"]) - added, tokens

    def adds_special_tokens(self, text: str) -> bool:
        """Whether chat text `text` gets the tokenizer's special tokens: most chat templates
        write the BOS token themselves, and a second one is never added."""
        bos = self.tokenizer.bos_token
        return not (bos and text.startswith(bos))

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    # --- running ---------------------------------------------------------------------
    @torch.no_grad()  # not inference_mode: training reuses H as a (detached) input
    def prefill(self, batch, *, layer: int | None = None, capture: bool = True,
                use_cache: bool = False, layers: list[int] | None = None,
                states_only: bool = False,
                stop_if: Callable[[torch.Tensor, torch.Tensor], bool] | None = None) -> Prefill:
        """One forward pass over the prompt: logits for the last position only, and (with
        `capture`) `H` at all positions from a hook: the output of decoder layer `layer`
        (the adapter's `config.layer`; None: the last) through the final norm, so every
        layer reaches the head on the scale the last one does. Without `capture`, H is
        None and no hook runs: the plain model's prefill. `layers` (1-based decoder layers,
        for training's layer sweep) also fills `Prefill.layers` with each of those layers'
        states, the same way, from hooks in this same pass. `states_only`: the caller wants
        the captured states and nothing else (a verdict, a state cache), so the forward
        stops right after the deepest layer captured (docs/design.md §2): a head at layer 15
        of 30 costs half a prefill. Then `logits` and `cache` are None.

        `stop_if(H, mask)` (generate's early verdict): called as soon as the head's states
        are captured, inside this pass; True stops the forward there, as `states_only` does
        (a refusal costs the layers up to the head), False lets it run on through the
        layers above and fill the rest of the KV cache. Nothing is resumed, so it works the
        same on every family."""
        wanted = [self.resolve_layer(number) for number in sorted(set(layers or ()))]
        # Which decoder layer fills which captured key ("H" for the head; layer numbers for
        # the sweep). Keys of one layer share its hook, so its norm runs once.
        keys_of: dict[int, list] = {}
        if capture:
            keys_of.setdefault(self.resolve_layer(layer), []).append("H")
        for number in wanted:
            keys_of.setdefault(number, []).append(number)
        captured = {"H": None}
        hooks = []
        deepest = max(keys_of, default=self.num_layers)
        out = None
        try:
            for number, keys in keys_of.items():
                hooks.append(self.capture_hook(number, keys, captured))
            # Registered after the capture hooks on the same module, so they run after them.
            if stop_if is not None:
                def stop_on_verdict(module, args, output):
                    if stop_if(captured["H"], batch["attention_mask"].bool()):
                        raise _StopForward
                hooks.append(self.layer_module(self.resolve_layer(layer))
                             .register_forward_hook(stop_on_verdict))
            if states_only and deepest < self.num_layers:
                hooks.append(self.layer_module(deepest).register_forward_hook(_stop_forward))
            out = self.model(**batch, use_cache=use_cache and not states_only, logits_to_keep=1)
        except _StopForward:
            pass
        finally:
            for hook in hooks:
                hook.remove()
        return Prefill(H=captured["H"], mask=batch["attention_mask"].bool(),
                       logits=None if out is None else out.logits[:, -1],
                       cache=None if out is None else out.get("cache"),
                       layers={number: captured[number] for number in wanted}
                       if layers is not None else None)

    def capture_hook(self, layer: int, keys: list, captured: dict):
        """A forward hook storing decoder layer `layer`'s output, through the final norm,
        under each of `keys` in `captured`. The last layer is the final norm's own output
        (what lm_head reads), hooked on the norm itself."""
        norm = self.final_norm()

        def store(states):
            for key in keys:
                captured[key] = states

        if layer == self.num_layers:
            return norm.register_forward_hook(lambda module, args, output: store(output))

        def through_norm(module, args, output):
            states = output[0] if isinstance(output, tuple) else output
            store(norm(states.to(self.device)))
        return self.layer_module(layer).register_forward_hook(through_norm)

    def layer_module(self, layer: int) -> torch.nn.Module:
        """The module whose output is decoder layer `layer`'s captured states: the layer
        itself, or for the last layer the final norm."""
        return self.final_norm() if layer == self.num_layers else self.decoder_layers()[layer - 1]


def resolve_device(device: str) -> torch.device:
    """`device` ("auto", "cpu", "cuda", "cuda:N" or "mps") checked against this machine, so
    that a device it lacks is a one-line usage error before any weights load."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        resolved = None
    if resolved is None or resolved.type not in ("cpu", "cuda", "mps"):
        raise InputError(f"unknown device {device!r}: use auto, cpu, cuda, cuda:N or mps")
    if resolved.type == "cuda":
        count = torch.cuda.device_count()
        if (resolved.index or 0) >= count:
            have = f"{count} CUDA device(s), cuda:0 to cuda:{count - 1}" if count else "no CUDA device"
            raise InputError(f"device {device!r}: this machine has {have}")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"device {device!r}: MPS is not available on this machine")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[dtype]
    except KeyError:
        raise InputError(f"unknown dtype {dtype!r}: use auto, float32, bfloat16 or float16") from None


def load_backbone(model: str | None = None, device: str = "auto", dtype: str = "auto",
                  trust_remote_code: bool = False, device_map: str | None = None) -> Backbone:
    """Load `model` (a model directory, a .gguf file, or None for the embedded default).
    `device_map` (an accelerate strategy such as "auto") spreads the layers over the visible
    GPUs, then CPU, for a model too large for one GPU; `device` then only picks the dtype."""
    if device_map not in (None, *DEVICE_MAPS):
        raise InputError(f"unknown device map {device_map!r}: use {', '.join(DEVICE_MAPS)}")
    torch_device = resolve_device(device)  # bad options fail before the slow import below
    torch_dtype = resolve_dtype(dtype, torch_device)
    # Importing transformers' model code costs seconds once per process; it is reported
    # apart from the load itself (weights, processor, device placement).
    started = time.perf_counter()
    import transformers.modeling_utils  # noqa: F401  (the bulk: torch.distributed, dynamo)
    import_seconds = time.perf_counter() - started
    started = time.perf_counter()
    directory, gguf_file, source = locate_model(model)
    loaded, processor, modalities = read_model(directory, gguf_file, torch_device, torch_dtype,
                                               trust_remote_code, device_map)
    return Backbone(model=loaded, processor=processor, family=loaded.config.model_type,
                    modalities=modalities, source=source,
                    load_seconds=time.perf_counter() - started, import_seconds=import_seconds)
