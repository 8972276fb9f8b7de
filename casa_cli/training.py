"""Training CASA adapters (docs/design.md §2).

The head: CE of the gated safety step against the label, weight `beta` on harmful examples.
Two modes:
- head: the backbone is frozen, so each prompt's hidden states are computed once and
  cached; only Q, V, b and the safety-token output rows train (minutes on a CPU). A
  head-only adapter never feeds the safety token back into the model (on `safe` decoding
  continues exactly as the plain model, on `unsafe` the configured refusal is returned).
- lora: the head as above, then peft LoRA on the backbone, switched on only after
  <|unsafe|>: fed that token's input row after the prompt, the model learns to write a
  refusal of the request's harm category in varied wording (`casa_cli.refusals`). After
  <|safe|> the base model answers (the LoRA off), so it keeps its helpfulness exactly and
  needs no self-distillation.
Ablation variants of the head: "full", "token" (the token rows only, z = 0), "attention"
(the attention score only, token rows at zero).
"""
from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.nn import functional as F

from casa_cli.adapter import AdapterConfig, init_adapter
from casa_cli.backbone import Backbone
from casa_cli.head import SafetyHead, gated_logits
from casa_cli.inputs import InputError, Sample, normalise_label, read_manifest
from casa_cli.lora import fit_lora
from casa_cli.metrics import auroc_standard_error, score_metrics, tpr_at_fpr
from casa_cli.states import layer_states, prompt_states

MODES = ("head", "lora")
VARIANTS = ("full", "token", "attention")


@dataclass
class TrainOptions:
    mode: str = "head"
    variant: str = "full"
    heads: int = 4
    gate: str = "log"
    epochs: int = 60
    lr: float = 3e-3
    weight_decay: float = 1e-2
    batch_size: int = 64
    beta: float = 1.0  # weight of harmful examples in the safety-step loss
    val_fraction: float = 0.15
    patience: int = 8
    target_fpr: float = 0.05  # the threshold is set to this FPR on validation benign prompts
    seed: int = 0
    lora_r: int = 8
    lora_alpha: int = 16
    lora_lr: float = 2e-3
    lora_batch_size: int = 8
    lora_epochs: int = 2
    # Decoder layer the head reads (1-based, through the final norm): "auto" fits the head
    # at each of `layers` (default: `candidate_layers`) and keeps the best on validation;
    # None = the last (docs/design.md §2).
    layer: int | str | None = "auto"
    layers: list[int] | None = None


def label_of(sample: Sample) -> int:
    """1 for harmful, 0 for benign; an unlabelled sample cannot be trained or scored on."""
    try:
        label = normalise_label(sample.label)
    except InputError as err:
        raise InputError(f"{sample.origin or sample.id}: {err}") from None
    if label is None:
        raise InputError(f"{sample.origin or sample.id}: no label (harmful or benign)")
    return int(label == "harmful")


def read_examples(paths: list[Path]) -> list[Sample]:
    """Labelled prompts from JSONL manifests. Any malformed or unlabelled line stops
    training with its file:line: a model should not quietly learn from part of its data."""
    samples = []
    for path in paths:
        for sample in read_manifest(Path(path)):
            if sample.error:
                raise InputError(sample.error)
            label_of(sample)
            samples.append(sample)
    if not samples:
        raise InputError("no training examples")
    return samples


def candidate_layers(num_layers: int) -> list[int]:
    """The layers `--layer auto` tries: the last, and every ceil(L/10)-th layer below it
    down to a quarter of the depth (8 at most; for 30 layers: 9, 12, ..., 27, 30)."""
    step = math.ceil(num_layers / 10)
    return sorted(layer for layer in range(num_layers, 0, -step) if 4 * layer >= num_layers)


def pad_states(states: list[torch.Tensor], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (B, T, d) float32 and its (B, T) validity mask."""
    longest = max(s.shape[0] for s in states)
    H = torch.zeros(len(states), longest, states[0].shape[1], device=device)
    mask = torch.zeros(len(states), longest, dtype=torch.bool, device=device)
    for i, s in enumerate(states):
        H[i, : s.shape[0]] = s.to(device, torch.float32)
        mask[i, : s.shape[0]] = True
    return H, mask


# --- the head --------------------------------------------------------------------------
def safety_logits(head: SafetyHead, H, mask, backend: str = "auto") -> torch.Tensor:
    out = head(H, mask, backend=backend)
    return gated_logits(out.l_safe, out.l_unsafe, out.z, head.gate)


def prepare_variant(head: SafetyHead, variant: str) -> list[torch.nn.Parameter]:
    """The parameters a variant trains; the others are pinned at values that switch their
    path off (V = b = 0 gives z = 0; zero token rows give l_safe = l_unsafe = 0)."""
    if variant not in VARIANTS:
        raise InputError(f"unknown variant {variant!r}; expected one of {', '.join(VARIANTS)}")
    with torch.no_grad():
        if variant == "token":
            head.V.zero_(), head.b.zero_()
            return [head.token_out]
        if variant == "attention":
            if head.gate != "log":
                raise InputError("the attention-only variant needs the log gate")
            head.token_out.zero_()
            return [head.Q, head.V, head.b]
    return [head.Q, head.V, head.b, head.token_out]


def score(head: SafetyHead, states: list[torch.Tensor], batch_size: int = 256,
          backend: str = "auto") -> list[float]:
    device = head.Q.device
    scores = []
    with torch.no_grad():
        for start in range(0, len(states), batch_size):
            H, mask = pad_states(states[start:start + batch_size], device)
            scores += torch.softmax(safety_logits(head, H, mask, backend), -1)[:, 1].tolist()
    return scores


def fit_head(head: SafetyHead, train: tuple[list, list[int]], val: tuple[list, list[int]],
             options: TrainOptions, on_epoch: Callable[[dict], None] | None = None) -> list[dict]:
    """Adam on the safety-step cross-entropy; keeps the parameters of the lowest validation
    loss and stops after `patience` epochs without a lower one. (Keeping the best AUROC
    instead let heads at some layers run every epoch on gains in the fourth decimal while
    their validation loss doubled: overconfident heads whose threshold then sat at 0.99.)"""
    params = prepare_variant(head, options.variant)
    optimiser = torch.optim.AdamW(params, lr=options.lr, weight_decay=options.weight_decay)
    states, labels = train
    generator = random.Random(options.seed)
    device = head.Q.device
    best, best_key, since_best, history = None, None, 0, []
    for epoch in range(options.epochs):
        order = list(range(len(states)))
        generator.shuffle(order)
        total = 0.0
        for start in range(0, len(order), options.batch_size):
            chunk = order[start:start + options.batch_size]
            H, mask = pad_states([states[i] for i in chunk], device)
            y = torch.tensor([labels[i] for i in chunk], device=device)
            weight = torch.where(y == 1, options.beta, 1.0)
            loss = (F.cross_entropy(safety_logits(head, H, mask), y, reduction="none")
                    * weight).sum() / weight.sum()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += float(loss.detach()) * len(chunk)
        metrics = evaluate(head, *val)
        row = {"epoch": epoch + 1, "train_loss": total / len(states), **{
            k: metrics[k] for k in ("auroc", "loss", "tpr_at_5pct_fpr")}}
        history.append(row)
        if on_epoch:
            on_epoch(row)
        key = -metrics["loss"]
        if best_key is None or key > best_key:
            best_key, since_best = key, 0
            best = {k: v.detach().clone() for k, v in head.state_dict().items()}
        else:
            since_best += 1
            if since_best >= options.patience:
                break
    head.load_state_dict(best)
    return history


def evaluate(head: SafetyHead, states: list, labels: list[int], threshold: float = 0.5) -> dict:
    scores = score(head, states)
    probs = torch.tensor(scores).clamp(1e-7, 1 - 1e-7)
    y = torch.tensor(labels, dtype=torch.float32)
    loss = float(F.binary_cross_entropy(probs, y))
    metrics = score_metrics(labels, scores, threshold)
    metrics.pop("roc")
    # At the adapter's own threshold: attack prompts caught, benign prompts refused.
    flagged = [(y, p >= threshold) for y, p in zip(labels, scores)]
    for name, label in (("flag_rate_harmful", 1), ("flag_rate_benign", 0)):
        hits = [f for y, f in flagged if y == label]
        metrics[name] = sum(hits) / len(hits) if hits else None
    return {**metrics, "loss": loss, "n": len(labels), "harmful": int(sum(labels))}


def calibrated_threshold(labels: list[int], scores: list[float], target_fpr: float) -> float:
    """The lowest threshold whose false-positive rate on benign scores stays within target."""
    found = tpr_at_fpr(labels, scores, target_fpr)["threshold"]
    # p_unsafe strictly above the benign quantile is flagged; nudge so ">=" agrees.
    return float(min(max(math.nextafter(found, 1.0), 1e-6), 1 - 1e-6))


def require_both_labels(labels: list[int], what: str) -> None:
    """InputError unless `labels` hold harmful and benign examples: the threshold is set at a
    false-positive rate on benign prompts and the best epoch is picked by AUROC, both
    undefined on one class (it would save a NaN threshold that breaks every later verdict)."""
    missing = [name for name, y in (("harmful", 1), ("benign", 0)) if y not in labels]
    if missing:
        raise InputError(f"{what} has no {' and no '.join(missing)} examples; "
                         "it needs both harmful and benign ones")


def split_validation(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    cut = max(1, int(round(n * fraction)))
    return order[cut:], order[:cut]


def train(backbone: Backbone, examples: list[Sample], options: TrainOptions,
          val_examples: list[Sample] | None = None, heldout: dict[str, list[Sample]] | None = None,
          progress: Callable[[str, int], Callable[[int], None]] | None = None
          ) -> tuple[AdapterConfig, SafetyHead, object | None]:
    """Train an adapter; returns its config (with held-out metrics), head and LoRA model.
    With `layer="auto"` the head is first fitted at each candidate layer and the layer of
    the best validation score is kept (`sweep_layers`); everything after that (threshold,
    LoRA, held-out metrics) runs at that layer only."""
    if options.mode not in MODES:
        raise InputError(f"unknown mode {options.mode!r}; expected one of {', '.join(MODES)}")
    if options.mode == "lora" and any(s.response is not None for s in examples):
        raise InputError("records with a 'response' train a head on (prompt, response) pairs "
                         "(a response head); --mode lora trains on prompts only")
    torch.manual_seed(options.seed)
    candidates = sweep_candidates(backbone, options)
    config, head = init_adapter(backbone, heads=options.heads, gate=options.gate, seed=options.seed)
    require_both_labels([label_of(s) for s in examples], "the training data")
    tick = progress or (lambda name, total: (lambda n=1: None))
    validation = "the validation set (--val)"
    if val_examples is None:
        train_idx, val_idx = split_validation(len(examples), options.val_fraction, options.seed)
        val_examples = [examples[i] for i in val_idx]
        examples = [examples[i] for i in train_idx]
        require_both_labels([label_of(s) for s in examples],
                            "the training data less its validation split")
        validation = f"the validation split (--val-fraction {options.val_fraction:g} of the data)"
    train_y, val_y = [label_of(s) for s in examples], [label_of(s) for s in val_examples]
    require_both_labels(val_y, validation)
    all_samples = examples + val_examples
    sweep = None
    if candidates is None:
        config.layer = options.layer
        states = prompt_states(backbone, all_samples, config.layer,
                               on_batch=tick("hidden states", len(all_samples)))
        train_states, val_states = states[: len(examples)], states[len(examples):]
        head = head.float()
        history = fit_head(head, (train_states, train_y), (val_states, val_y), options)
    else:
        sweep, head, history, states = sweep_layers(backbone, candidates, examples, val_examples,
                                                    options, tick)
        config.layer = next(row["layer"] for row in sweep if row["chosen"])
        train_states, val_states = states[: len(examples)], states[len(examples):]
    val_scores = score(head, val_states)
    config.threshold = calibrated_threshold(val_y, val_scores, options.target_fpr)
    head.threshold = config.threshold
    config.trained, config.mode = True, options.mode
    config.training = {
        "options": asdict(options), "examples": summarise(examples), "validation": summarise(val_examples),
        "epochs_run": len(history), "final": history[-1] if history else None,
    }
    if sweep is not None:
        config.training["layer_sweep"] = sweep
        config.training["layer_chosen_by"] = LAYER_CHOICE
    config.metrics = {"validation": evaluate(head, val_states, val_y, config.threshold)}
    for name, samples in (heldout or {}).items():
        held_states = prompt_states(backbone, samples, config.layer,
                                    on_batch=tick(f"held-out {name}", len(samples)))
        config.metrics[name] = evaluate(head, held_states, [label_of(s) for s in samples],
                                        config.threshold)
    lora_model = None
    if options.mode == "lora":
        # Last, as the LoRA is off for the prompt (it writes only after <|unsafe|>): the
        # head's states, and so everything fitted and measured above, are the base model's.
        lora_model = fit_lora(backbone, head, examples, train_y, options,
                              on_step=tick("lora", sum(train_y) * options.lora_epochs))
    return config, head, lora_model


LAYER_CHOICE = ("of the layers whose validation AUROC is within one standard error (Hanley & "
                "McNeil) of the best, the highest validation TPR at 1% FPR, then the higher "
                "AUROC, then the deeper layer")


def choose_layer(rows: list[dict], n_harmful: int, n_benign: int) -> int:
    """Index of the row `LAYER_CHOICE` picks. AUROC alone ranks layers by noise once they
    are all good (on a few hundred validation prompts its standard error is about 0.01),
    so it only narrows the field; among the layers it cannot tell apart, the one that
    catches most harm while flagging almost no benign prompt wins, the operating point a
    safety filter is judged at."""
    best = max(row["val_auroc"] for row in rows)
    margin = auroc_standard_error(best, n_harmful, n_benign)
    close = [i for i, row in enumerate(rows) if row["val_auroc"] >= best - margin]
    return max(close, key=lambda i: (rows[i]["val_tpr_at_1pct_fpr"], rows[i]["val_auroc"],
                                     rows[i]["layer"]))


def sweep_candidates(backbone: Backbone, options: TrainOptions) -> list[int] | None:
    """The layers `options` asks to sweep, or None when one layer is forced (`layer` a
    number, or None for the last); either checked against the model before any work."""
    if options.layer != "auto":
        if options.layers:
            raise InputError("--layers lists the candidates of --layer auto; "
                             f"it cannot go with --layer {options.layer or 'last'}")
        if isinstance(options.layer, str):
            raise InputError(f"unknown layer {options.layer!r}: use auto, last or a number")
        backbone.resolve_layer(options.layer)
        return None
    candidates = sorted(set(options.layers or candidate_layers(backbone.num_layers)))
    for layer in candidates:
        backbone.resolve_layer(layer)
    return candidates


def sweep_layers(backbone: Backbone, candidates: list[int], examples: list[Sample],
                 val_examples: list[Sample], options: TrainOptions,
                 tick: Callable[[str, int], Callable[[int], None]]
                 ) -> tuple[list[dict], SafetyHead, list[dict], list[torch.Tensor]]:
    """Fit a fresh head (same options, same seed) at each candidate layer and keep the best
    on the validation set (`LAYER_CHOICE`; held-out sets are never looked at). Every
    prompt's states at all candidates come from one prefill (`layer_states`) and are read
    back one layer at a time (the chosen layer's once more at the end: the rule weighs
    every layer's scores, so the winner is known only after the last).
    Returns the sweep's rows (the chosen one marked), the chosen layer's head, its history
    and its states (examples, then validation)."""
    all_samples = examples + val_examples
    train_y, val_y = [label_of(s) for s in examples], [label_of(s) for s in val_examples]
    layer_states(backbone, all_samples, candidates, keep=False,
                 on_batch=tick("hidden states", len(all_samples)))
    step = tick("layer sweep", len(candidates))
    rows, fitted = [], []
    for layer in candidates:
        states = prompt_states(backbone, all_samples, layer)
        torch.manual_seed(options.seed)
        _, head = init_adapter(backbone, heads=options.heads, gate=options.gate,
                               seed=options.seed)
        head = head.float()
        history = fit_head(head, (states[: len(examples)], train_y),
                           (states[len(examples):], val_y), options)
        metrics = evaluate(head, states[len(examples):], val_y)
        rows.append({"layer": layer, "val_auroc": metrics["auroc"], "val_loss": metrics["loss"],
                     "val_tpr_at_1pct_fpr": metrics["tpr_at_1pct_fpr"],
                     "val_tpr_at_5pct_fpr": metrics["tpr_at_5pct_fpr"],
                     "epochs_run": len(history), "chosen": False})
        fitted.append((head, history))
        del states
        step(1)
    index = choose_layer(rows, sum(val_y), len(val_y) - sum(val_y))
    rows[index]["chosen"] = True
    head, history = fitted[index]
    return rows, head, history, prompt_states(backbone, all_samples, rows[index]["layer"])


def summarise(samples: list[Sample]) -> dict:
    harmful = sum(label_of(s) for s in samples)
    return {"n": len(samples), "harmful": harmful, "benign": len(samples) - harmful}
