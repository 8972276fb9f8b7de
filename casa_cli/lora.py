"""LoRA mode of CASA training: the model learns to write its own refusal after <|unsafe|>.

The prompt is prefilled on the base weights (the LoRA switched off, as decoding runs it);
<|unsafe|>'s input row and the target refusal are then fed as embeddings on top of that KV
cache through the LoRA: the same steps decoding takes (prefill, verdict, continue)."""
from __future__ import annotations

import json
import random
from typing import Callable

import torch
from torch.nn import functional as F

from casa_cli.adapter import LoraGate, peft_quietly
from casa_cli.fingerprint import media_fingerprint
from casa_cli.backbone import Backbone
from casa_cli.cache import answers_file
from casa_cli.decoding import Stream
from casa_cli.head import SafetyHead
from casa_cli.inputs import InputError, Sample
from casa_cli.refusals import refusal

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
def decoder_lora(model: torch.nn.Module, r: int, alpha: int):
    """`model` wrapped by peft with trainable LoRA (rank `r`) on the text decoder's attention
    projections (`decoder_targets`)."""
    from peft import LoraConfig, get_peft_model

    with peft_quietly():
        return get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0,
                                                target_modules=decoder_targets(model)))


def decoder_targets(model: torch.nn.Module) -> list[str]:
    """Full names of the text decoder's attention projections: a plain suffix such as
    "q_proj" would also match a vision or audio tower's, which stay frozen."""
    inside = {id(m) for m in model.get_decoder().modules()}
    names = [name for name, module in model.named_modules()
             if id(module) in inside and name.rsplit(".", 1)[-1] in LORA_TARGETS]
    if not names:
        raise InputError(f"no attention projections ({', '.join(LORA_TARGETS)}) in the text decoder")
    return names


def _cached_answer(line: str) -> tuple[str, str] | None:
    """(key, answer) of one line of the answers cache; None for a line torn by a kill
    (it is answered again)."""
    try:
        record = json.loads(line)
        return record["key"], record["answer"]
    except (ValueError, KeyError, TypeError):
        return None


def self_answers(backbone: Backbone, samples: list[Sample], max_new_tokens: int,
                 batch_size: int = 1, on_batch: Callable[[int], None] | None = None) -> list[str]:
    """The base model's own greedy answers (self-distillation targets, the response head's
    answers), cached on disk. `batch_size` > 1 decodes left-padded batches of similar
    lengths: faster, and the same answers up to float rounding."""
    path = answers_file(media_fingerprint(backbone), max_new_tokens)
    text = path.read_text(encoding="utf-8", errors="replace") if path.is_file() else ""
    known = dict(line for line in map(_cached_answer, text.splitlines()) if line)
    keys = [s.key for s in samples]
    missing = sorted({k: s for k, s in zip(keys, samples) if k not in known}.items(),
                     key=lambda item: len(item[1].text))
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as cache:
        if text and not text.endswith("\n"):
            cache.write("\n")  # a run killed mid-line: start on a fresh line
        for start in range(0, len(missing), batch_size):
            chunk = missing[start:start + batch_size]
            batch = backbone.encode([sample for _, sample in chunk], reserve=max_new_tokens + 1)
            with torch.no_grad():
                out = backbone.model.generate(**batch, max_new_tokens=max_new_tokens,
                                              do_sample=False)
            for row, (key, _) in enumerate(chunk):
                known[key] = backbone.tokenizer.decode(out[row, batch["input_ids"].shape[1]:],
                                                       skip_special_tokens=True).strip()
                cache.write(json.dumps({"key": key, "answer": known[key]}) + "\n")
            cache.flush()
            if on_batch:
                on_batch(len(chunk))
    return [known[k] for k in keys]


def refusal_loss(backbone: Backbone, gate: LoraGate, head: SafetyHead, samples: list[Sample],
                 targets: list[str]) -> torch.Tensor:
    """Mean CE over the tokens of each refusal in `targets` after its prompt and <|unsafe|>,
    as decoding runs it: the prompts prefilled on the base weights as one left-padded batch,
    without gradient (`Stream`: its positions and masks), then <|unsafe|>'s input row and the
    targets (right-padded) through the LoRA on that KV cache."""
    tokenizer, model = backbone.tokenizer, backbone.model
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
           for t in targets]
    width = max(map(len, ids))
    with torch.no_grad():
        stream = Stream(backbone, [backbone.prepare(s, reserve=width) for s in samples])
    # Position j reads <|unsafe|> (j = 0) or target token j-1, and predicts target token j.
    labels = torch.full((len(ids), width), -100, dtype=torch.long)
    for row, tokens in enumerate(ids):
        labels[row, :len(tokens)] = torch.tensor(tokens)
    labels = labels.to(backbone.device)
    fed = model.get_input_embeddings()(labels[:, :-1].clamp(min=0))
    unsafe = head.token_in[1].to(backbone.dtype).expand(len(ids), 1, -1)
    valid = (labels != -100).to(stream.mask.dtype)
    steps = torch.arange(1, width + 1, device=backbone.device)
    with gate.on():
        out = model(inputs_embeds=torch.cat([unsafe, fed], dim=1),
                    attention_mask=torch.cat([stream.mask, valid], dim=1),
                    position_ids=stream.position + steps, cache=stream.cache, use_cache=True)
    return F.cross_entropy(out.logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)


def fit_lora(backbone: Backbone, head: SafetyHead, examples: list[Sample], labels: list[int],
             options, on_step: Callable[[int], None] | None = None):
    """LoRA + <|unsafe|>'s input row over the harmful examples (`labels` 1), for
    `options.lora_epochs` passes in batches of `options.lora_batch_size`, each taught a
    refusal of its harm category worded by the request's shape (`refusals.refusal`); returns the peft
    model. Benign examples teach
    nothing: after a safe verdict the base model answers, the LoRA switched off."""
    harmful = [i for i, y in enumerate(labels) if y == 1]
    torch.manual_seed(options.seed)  # the LoRA's initial weights, whatever ran before
    model = decoder_lora(backbone.model, options.lora_r, options.lora_alpha)
    gate = LoraGate(backbone.model)
    head.token_in.requires_grad_(True)
    trainable = [p for p in model.parameters() if p.requires_grad] + [head.token_in]
    optimiser = torch.optim.AdamW(trainable, lr=options.lora_lr, weight_decay=0.0)
    generator = random.Random(options.seed)
    model.train()
    for _ in range(options.lora_epochs):
        generator.shuffle(harmful)  # and each epoch draws which refusals offer an alternative
        for start in range(0, len(harmful), options.lora_batch_size):
            batch = [examples[i] for i in harmful[start:start + options.lora_batch_size]]
            targets = [refusal(sample.category, sample.text or "", generator) for sample in batch]
            loss = refusal_loss(backbone, gate, head, batch, targets)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            if on_step:
                on_step(len(batch))
    model.eval()
    return model
