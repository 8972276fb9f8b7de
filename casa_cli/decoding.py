"""Answers under a defence (docs/design.md §1-2): `casa`, `coca`, `prompt`, `vsfa` or `none`.

Every defence runs the same loop: one prefill of the prompt (media are encoded there, once),
then one forward call per new token on top of its KV cache, greedy or sampled.

- casa: the prefill also captures `H`; the safety head turns it into a verdict. A head-only
  adapter never feeds a safety token: on `safe` decoding continues from the prefill's own
  logits (so the answer is exactly the plain model's), on `unsafe` the adapter's refusal
  text is returned. A LoRA adapter on `unsafe` feeds <|unsafe|>'s input row as an embedding
  and its LoRA, switched on from there (`adapter.LoraGate`), writes the model's own refusal;
  on `safe` it answers as the plain model, as a head-only adapter does. The verdict is taken
  inside the prefill as soon as the head's layer has run; when `unsafe` means the refusal
  text (on_unsafe="refuse"), the prefill stops there: a refusal costs the layers up to the
  head (`timings["prefill_layers"]`).
- coca (arXiv 2409.11365): `l_P + alpha * (l_P - l_0)` at every step, where l_P has a safety
  principle before the user's turn and l_0 does not. Both branches run as one batch of two
  (left-padded), so each step is one forward call.
- prompt: a safety system prompt before the conversation. none: the model as loaded.
- vsfa (arXiv 2603.08486): `none` on a model whose VSFA LoRA adapter (`casa vsfa train`)
  `load` has merged, so every defence runs the fine-tuned model (a CASA LoRA adapter's
  LoRA runs only in casa's unsafe branch).

Under every defence, `monitor` also watches the answer as it is written (casa_cli.monitor):
the safety head over prompt + answer so far, kept up to date at each token, stops an
answer whose p_unsafe reaches the threshold (with casa, after the prompt's own verdict).
"""
from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from casa_cli.adapter import lora_path
from casa_cli.backbone import Backbone, Prepared
from casa_cli.head import verdict
from casa_cli.inputs import InputError, Sample
from casa_cli.monitor import Monitor, MonitorOptions
from casa_cli.timing import sync_clock

DEFENSES = ("casa", "coca", "prompt", "vsfa", "none")
ON_UNSAFE = ("generate", "refuse")
DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful and harmless assistant. If a request could help someone cause harm "
    "(violence, weapons, crime, self-harm, abuse, dangerous substances or hacking), refuse "
    "briefly and explain why. Answer every other request helpfully and honestly.")
DEFAULT_PRINCIPLE = (
    "Principle: the assistant must not produce content that could help anyone cause physical, "
    "psychological or financial harm, and should refuse such requests politely while "
    "answering harmless requests helpfully.")


@dataclass
class DecodeOptions:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 decodes greedily
    top_p: float = 1.0  # nucleus sampling, when temperature > 0
    seed: int | None = None
    ignore_eos: bool = False  # decode all max_new_tokens (profiling: equal work per defence)

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise InputError("max_new_tokens must be at least 1")
        if self.temperature < 0:
            raise InputError("temperature must be 0 (greedy) or more")
        if not 0 < self.top_p <= 1:
            raise InputError("top_p must be in (0, 1]")


@dataclass
class Generation:
    id: str
    defense: str
    text: str
    tokens: list[int]
    prompt_tokens: int
    verdict: str | None = None  # casa only
    p_unsafe: float | None = None  # casa only
    refused: bool = False  # the adapter's refusal text stands in for decoding
    truncated: bool = False  # the middle of the user's text was cut to fit (--truncate)
    timings: dict = field(default_factory=dict)  # prefill_ms, safety_ms, first_token_ms, ...
    monitor: dict | None = None  # with a monitor: stopped_at, p_unsafe_max, checks

    def record(self, sample: Sample | None = None) -> dict:
        record = {"id": self.id, "defence": self.defense}
        if self.verdict is not None:
            record.update(verdict=self.verdict, p_unsafe=round(self.p_unsafe, 6),
                          refused=self.refused)
        record.update(text=self.text, prompt_tokens=self.prompt_tokens,
                      new_tokens=len(self.tokens), timings=self.timings)
        if self.monitor is not None:
            record["monitor"] = self.monitor
        if self.truncated:
            record["truncated"] = True
        if sample is not None and sample.label is not None:
            record["label"] = sample.label
        return record


class Stream:
    """A prefilled batch whose KV cache grows by one position per forward call.

    Positions and masks are passed explicitly, as `model.generate` does: left-padded rows
    continue from their own last position, and Qwen2-VL / Omni continue their 3-D (mrope)
    positions, whose text offset from the image grid is fixed at the prefill."""

    def __init__(self, backbone: Backbone, prepared: list[Prepared], capture: bool = False,
                 layer: int | None = None, stop_if: Callable | None = None):
        """`capture`: also keep the head's states `H`, from decoder layer `layer` (the
        adapter's `config.layer`; casa only: other defences run the plain prefill, so
        `casa profile` charges none of CASA's cost to them). `stop_if`: `Backbone.prefill`'s."""
        self.model = backbone.model
        batch = backbone.collate(prepared)
        # The positions generate would use: attention-mask based (left padding), and for
        # mrope families [text; t; h; w] from the image/audio grids.
        positions = self.model._prepare_position_ids_for_generation(batch["input_ids"], dict(batch))
        batch["position_ids"] = positions
        self.prefill = backbone.prefill(batch, layer=layer, capture=capture, use_cache=True,
                                        stop_if=stop_if)
        self.cache = self.prefill.cache
        self.mask = batch["attention_mask"]
        self.position = positions[..., -1:]

    @torch.no_grad()
    def step(self, input_ids: torch.Tensor | None = None,
             inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Append one position to every row; returns the next-token logits (B, V)."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        self.position = self.position + 1
        out = self.model(input_ids=input_ids, inputs_embeds=inputs_embeds,
                         attention_mask=self.mask, position_ids=self.position,
                         cache=self.cache, use_cache=True, logits_to_keep=1)
        self.cache = out.cache
        return out.logits[:, -1]

    def feed(self, token: int) -> torch.Tensor:
        """The same token to every row (CoCA's branches share the chosen token)."""
        ids = torch.full((self.mask.shape[0], 1), token, dtype=torch.long, device=self.mask.device)
        return self.step(input_ids=ids)


def coca_logits(logits: torch.Tensor, alpha: float) -> torch.Tensor:
    """The first row with the principle (l_P), the last without (l_0): l_P + alpha * (l_P - l_0).
    (With `copies`, the rows between are further copies of the two branches.)"""
    principled, plain = logits.float()[[0, -1]]
    return principled + alpha * (principled - plain)


def next_token(logits: torch.Tensor, options: DecodeOptions, generator) -> int:
    if options.temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / options.temperature, dim=-1)
    if options.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
        outside = sorted_probs.cumsum(-1) - sorted_probs >= options.top_p
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs.masked_fill(outside, 0))
    return int(torch.multinomial(probs, 1, generator=generator))


def stop_ids(backbone: Backbone) -> set[int]:
    """The generation config's end tokens plus the tokenizer's (a chat model's end of turn)."""
    configured = backbone.model.generation_config.eos_token_id
    ids = set([configured] if isinstance(configured, int) else configured or [])
    if backbone.tokenizer.eos_token_id is not None:
        ids.add(backbone.tokenizer.eos_token_id)
    return ids


class TextStream:
    """Detokenises incrementally; `on_text` gets each new piece of finished text (a piece
    that ends inside a multi-byte character waits for the next token)."""

    def __init__(self, tokenizer, on_text: Callable[[str], None] | None):
        self.tokenizer, self.on_text = tokenizer, on_text
        self.tokens: list[int] = []
        self.sent = ""

    def push(self, token: int) -> None:
        self.tokens.append(token)
        if self.on_text is None:
            return
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if not text.endswith("\ufffd") and text.startswith(self.sent) and len(text) > len(self.sent):
            self.on_text(text[len(self.sent):])
            self.sent = text

    def finish(self) -> str:
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if self.on_text is not None and text.startswith(self.sent) and len(text) > len(self.sent):
            self.on_text(text[len(self.sent):])
        return text


def decode(backbone: Backbone, logits: torch.Tensor, step: Callable[[int], torch.Tensor],
           options: DecodeOptions, text: TextStream, timings: dict, started: float,
           monitor: Monitor | None = None) -> None:
    """The loop every defence shares: choose a token from `logits`, stop at an end token,
    else `step(token)` gives the next logits. Fills first-token latency and decode rate.
    With a `monitor`, each token is fed before it is kept (the monitor reads its state from
    that step), and decoding stops at a flagged token, which is neither kept nor shown."""
    generator = None
    if options.seed is not None:
        generator = torch.Generator(logits.device).manual_seed(options.seed)
    eos = set() if options.ignore_eos else stop_ids(backbone)
    first = None
    for _ in range(options.max_new_tokens):
        token = next_token(logits, options, generator)
        if first is None:
            first = time.perf_counter()  # int() above waited for the device
            timings["first_token_ms"] = round((first - started) * 1000, 3)
        if token in eos:
            break
        if monitor is not None:
            logits = step(token)
            if monitor.advance():
                break
        text.push(token)
        if len(text.tokens) == options.max_new_tokens:
            break  # unmonitored, the last token is never fed: its logits are not needed
        if monitor is None:
            logits = step(token)
    if len(text.tokens) > 1:
        rate = (len(text.tokens) - 1) / (time.perf_counter() - first)
        timings["decode_tokens_per_s"] = round(rate, 2)


def with_system_prompt(sample: Sample, prompt: str) -> Sample:
    """The safety prompt as the system turn (before any system turn the sample has)."""
    messages = [dict(m) for m in sample.messages]
    if messages and messages[0]["role"] == "system":
        messages[0]["content"] = f"{prompt}\n\n{messages[0]['content']}"
    else:
        messages.insert(0, {"role": "system", "content": prompt})
    return replace(sample, messages=messages)


def with_principle(sample: Sample, principle: str) -> Sample:
    """CoCA's principle branch: the principle before the last user turn's text."""
    messages = [dict(m) for m in sample.messages]
    last = max(i for i, m in enumerate(messages) if m["role"] == "user")
    messages[last]["content"] = f"{principle}\n\n{messages[last]['content']}"
    return replace(sample, messages=messages)


def writes_after_token(casa) -> bool:
    """A CASA LoRA adapter (mode "lora"), whose LoRA was trained to write what follows
    <|unsafe|>. A VSFA adapter also carries a lora/ folder, but its model never saw a safety
    token."""
    return casa.refusal_lora is not None


def default_defense(casa) -> str:
    """The defence a loaded model answers under unless told: vsfa with a VSFA adapter (its
    safety is in the merged LoRA weights, not in a head), casa with a trained head, else
    none (an untrained head's verdicts are only the LM's own log-odds)."""
    if casa.config.mode == "vsfa":
        return "vsfa"
    return "casa" if casa.trained else "none"


def check_defense(casa, defense: str) -> None:
    """Raise InputError when `defense` is unknown or cannot run on this loaded model."""
    if defense not in DEFENSES:
        raise InputError(f"unknown defense {defense!r}; expected one of {', '.join(DEFENSES)}")
    if defense == "vsfa" and not (casa.config.mode == "vsfa" and lora_path(casa.adapter_dir)):
        where = casa.adapter_dir or "the model without an adapter"
        raise InputError(f"--defense vsfa needs a VSFA adapter (made by `casa vsfa train`); "
                         f"{where} is not one (adapter mode {casa.config.mode!r})")


@torch.no_grad()
def generate(casa, sample: Sample, defense: str = "casa", on_unsafe: str | None = None,
             options: DecodeOptions | None = None, threshold: float | None = None,
             principle: str | None = None, alpha: float = 1.0, system_prompt: str | None = None,
             truncate: bool = False, on_text: Callable[[str], None] | None = None,
             copies: int = 1, monitor: MonitorOptions | bool | None = None) -> Generation:
    """One answer to `sample` under `defense`; `on_text` receives the text as it is decoded.

    on_unsafe (casa): "refuse" returns the adapter's refusal text; "generate" lets the model
    answer after the verdict (a LoRA adapter's model writes its refusal after <|unsafe|>; a
    head-only adapter's answer is then the plain model's, with the verdict reported). The
    default is "generate" for LoRA adapters and "refuse" for head-only ones.

    copies: decode that many copies of the prompt as one batch, every row fed the chosen
    token: the cost of a batch of `copies` prompts of this length (`casa profile --batch`).

    monitor: watch the answer as it is decoded (`MonitorOptions`; True: every token, the
    adapter's threshold, refuse). When p_unsafe of prompt + answer so far reaches the
    threshold, decoding stops: on_flag "refuse" replaces the answer by the adapter's
    refusal text, "cut" keeps the tokens before the flagged one. `Generation.monitor`
    says where it stopped. A score that is not finite raises ValueError (fails closed)."""
    check_defense(casa, defense)
    if on_unsafe not in (None, *ON_UNSAFE):
        raise InputError(f"unknown on_unsafe {on_unsafe!r}; expected one of {', '.join(ON_UNSAFE)}")
    options = options or DecodeOptions()
    monitor = MonitorOptions() if monitor is True else monitor or None
    backbone = casa.backbone
    if defense == "prompt":
        sample = with_system_prompt(sample, system_prompt or casa.config.safety_prompt
                                    or DEFAULT_SYSTEM_PROMPT)
    reserve = options.max_new_tokens + 1  # and (casa with LoRA) <|unsafe|>
    prepared = [backbone.prepare(sample, truncate, reserve)] * copies
    if defense == "coca":
        prepared = [backbone.prepare(with_principle(sample, principle or DEFAULT_PRINCIPLE),
                                     truncate, reserve)] * copies + prepared
    text = TextStream(backbone.tokenizer, on_text)

    def combine(logits: torch.Tensor) -> torch.Tensor:
        """The stream's rows -> the one next-token distribution the loop chooses from."""
        return coca_logits(logits, alpha) if defense == "coca" else logits[0]

    safety = None
    if defense == "casa":
        on_unsafe = on_unsafe or ("generate" if writes_after_token(casa) else "refuse")
        safety = SafetyStep(casa, threshold, stop_on_unsafe=on_unsafe == "refuse")
    started = sync_clock(backbone.device)
    stream = Stream(backbone, prepared, capture=defense == "casa" or monitor is not None,
                    layer=casa.config.layer, stop_if=safety)
    timings = {"prefill_ms": round((sync_clock(backbone.device) - started) * 1000, 3)}
    watch = None if monitor is None else Monitor(casa, stream.prefill, monitor)
    # prompt_tokens: the user's own prompt (coca's last row is the one without principle)
    result = Generation(id=sample.id, defense=defense, text="", tokens=[],
                        prompt_tokens=int(stream.prefill.mask[-1].sum()),
                        truncated=prepared[-1].truncated, timings=timings)
    writes_refusal = safety is not None and safety.verdict == "unsafe" and writes_after_token(casa)
    with casa.refusal_lora.on() if writes_refusal else nullcontext():
        logits = (combine(stream.prefill.logits) if safety is None
                  else casa_verdict(casa, stream, safety, result, writes_refusal))
        if logits is None:  # refused: the adapter's text stands in for the answer
            result.text = casa.config.refusal
            if on_text is not None:
                on_text(result.text)
        else:
            with watch.watching() if watch else nullcontext():
                decode(backbone, logits, lambda token: combine(stream.feed(token)), options,
                       text, timings, started, watch)
        if watch is not None:
            stop_flagged(casa, watch, monitor.on_flag, text, result)
        if not result.refused:
            result.text, result.tokens = text.finish(), text.tokens
    if watch is not None:
        result.monitor = watch.record()
    return result


def stop_flagged(casa, watch: Monitor, on_flag: str, text: TextStream, result: Generation) -> None:
    """The answer after the monitor flagged token `watch.stopped_at` (if it did): the
    refusal text, or the tokens before the flagged one. Streamed text is not taken back
    here; the caller that showed it says so (`casa generate` does, on stderr)."""
    watch.finish()
    if watch.stopped_at is None:
        return
    if on_flag == "refuse":
        result.text, result.refused = casa.config.refusal, True
    else:  # a check at the answer's end can flag a token already kept
        del text.tokens[watch.stopped_at:]


class SafetyStep:
    """CASA's verdict on the prompt's states `H`, taken inside the prefill (its `stop_if`)
    as soon as the head's layer has run; with `stop_on_unsafe`, `unsafe` ends the prefill
    there. A score that cannot be judged (not finite) raises ValueError: no answer is given."""

    def __init__(self, casa, threshold: float | None, stop_on_unsafe: bool):
        self.casa, self.stop_on_unsafe = casa, stop_on_unsafe
        self.threshold = casa.config.threshold if threshold is None else threshold
        self.p_unsafe: float | None = None
        self.verdict: str | None = None
        self.ms = 0.0

    def __call__(self, H: torch.Tensor, mask: torch.Tensor) -> bool:
        """The verdict (rows are copies of one prompt); True: stop the prefill."""
        started = sync_clock(H.device)
        out = self.casa.head(H, mask, backend=self.casa.kernel)
        self.p_unsafe = float(out.p_unsafe[0])
        self.verdict = verdict(self.p_unsafe, self.threshold)
        self.ms = (sync_clock(H.device) - started) * 1000
        return self.stop_on_unsafe and self.verdict == "unsafe"


def casa_verdict(casa, stream: Stream, safety: SafetyStep, result: Generation,
                 writes_refusal: bool) -> torch.Tensor | None:
    """The verdict the prefill took (its time then included the step's) on `result`; returns
    the logits decoding starts from (None: the refusal text stands in)."""
    backbone = casa.backbone
    result.timings["prefill_ms"] = round(result.timings["prefill_ms"] - safety.ms, 3)
    result.timings["prefill_layers"] = (backbone.num_layers if stream.prefill.logits is not None
                                        else backbone.resolve_layer(casa.config.layer))
    result.p_unsafe, result.verdict = safety.p_unsafe, safety.verdict
    result.timings["safety_ms"] = round(safety.ms, 3)
    if result.verdict == "unsafe" and safety.stop_on_unsafe:
        result.refused = True
        return None
    if not writes_refusal:
        return stream.prefill.logits[0]  # exactly the plain model's continuation
    unsafe = casa.head.token_in[1].to(backbone.dtype).expand(stream.mask.shape[0], 1, -1)
    return stream.step(inputs_embeds=unsafe)[0]  # with the LoRA on (writes_refusal)
