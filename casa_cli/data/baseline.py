"""A bag-of-words baseline: how far do surface words alone separate harmful from benign?

TF-IDF over lower-cased words *and punctuation* (so "?" is a feature: the form confound is
visible in the weights) -> L2-regularised logistic regression fitted with LBFGS in torch.
Trained on the train split and scored by AUROC on the held-out sources, once with the
train set in its natural forms and once form-balanced, each on the test set as the sources
wrote it ("natural") and with every prompt also in its other form ("balanced"). The
"form only" row scores a prompt by being a command, the shortcut a classifier can take.

    python -m casa_cli.data.baseline
"""
from __future__ import annotations

import argparse
import json
import math
import re
from collections import Counter

import numpy as np
import torch

from casa_cli.data.assemble import assemble
from casa_cli.data.grouping import DEFAULT_HELDOUT
from casa_cli.metrics import auroc

_TOKEN = re.compile(r"[a-z0-9]+|[?!.:]")


def tokenize(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


class BagOfWords:
    """TF-IDF features + logistic regression; ``fit`` on records, ``score`` gives P(harmful)."""

    def __init__(self, min_df: int = 2, l2: float = 1e-3):
        self.min_df, self.l2 = min_df, l2

    def _features(self, texts: list[str]) -> torch.Tensor:
        x = torch.zeros(len(texts), len(self.vocab))
        for i, text in enumerate(texts):
            for tok, n in Counter(tokenize(text)).items():
                j = self.vocab.get(tok)
                if j is not None:
                    x[i, j] = 1.0 + math.log(n)  # sublinear term frequency
        x *= self.idf
        return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def fit(self, records: list[dict]) -> "BagOfWords":
        texts = [r["text"] for r in records]
        df = Counter(tok for t in texts for tok in set(tokenize(t)))
        self.vocab = {tok: i for i, tok in enumerate(sorted(t for t, n in df.items() if n >= self.min_df))}
        self.idf = torch.tensor([math.log((1 + len(texts)) / (1 + df[t])) + 1 for t in self.vocab])
        x = self._features(texts)
        y = torch.tensor([r["label"] == "harmful" for r in records], dtype=torch.float32)
        self.w = torch.zeros(x.shape[1], requires_grad=True)
        self.b = torch.zeros((), requires_grad=True)
        opt = torch.optim.LBFGS([self.w, self.b], max_iter=200, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ self.w + self.b, y)
            loss = loss + self.l2 * self.w.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        return self

    @torch.no_grad()
    def score(self, records: list[dict]) -> np.ndarray:
        return torch.sigmoid(self._features([r["text"] for r in records]) @ self.w + self.b).numpy()

    def top_features(self, k: int = 10) -> dict[str, list[str]]:
        inv = {i: t for t, i in self.vocab.items()}
        order = torch.argsort(self.w.detach())
        return {"harmful": [inv[int(i)] for i in order.flip(0)[:k]],
                "benign": [inv[int(i)] for i in order[:k]]}


def _original(records: list[dict]) -> list[dict]:
    return [r for r in records if not r.get("rewritten_from")]


def run(heldout_sources=DEFAULT_HELDOUT, seed: int = 0) -> dict:
    """AUROCs of the baseline for {natural, balanced} train x {natural, balanced} test."""
    parts = assemble(heldout_sources=heldout_sources, balance=True, seed=seed)
    # Rewrites join their original's group, so dropping them gives the unbalanced pipeline's
    # split exactly: both conditions see the same prompts, only the forms differ.
    trains = {"natural": _original(parts["train"]), "balanced": parts["train"]}
    tests = {"natural": _original(parts["test"]), "balanced": parts["test"]}
    labels = {k: [r["label"] == "harmful" for r in v] for k, v in tests.items()}
    result = {"heldout_sources": list(heldout_sources), "auroc": {}, "top_features": {},
              "sizes": {f"train_{k}": len(v) for k, v in trains.items()}
              | {f"test_{k}": len(v) for k, v in tests.items()}}
    result["auroc"]["form only"] = {k: auroc(labels[k], [r["form"] == "command" for r in v])
                                    for k, v in tests.items()}
    for name, train in trains.items():
        model = BagOfWords().fit(train)
        result["auroc"][f"BoW, {name} train"] = {k: auroc(labels[k], model.score(v))
                                                 for k, v in tests.items()}
        result["top_features"][name] = model.top_features()
    # rho_refusal alone: harmful and benign are both questions on matched themes
    rho = [r for r in tests["natural"] if r["source"] == "rho_refusal"]
    if rho:
        y = [r["label"] == "harmful" for r in rho]
        result["auroc_rho_refusal_natural"] = {
            name: auroc(y, BagOfWords().fit(train).score(rho)) for name, train in trains.items()}
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Bag-of-words AUROC on held-out sources.")
    parser.add_argument("--heldout", nargs="*", default=list(DEFAULT_HELDOUT))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the full result as JSON")
    args = parser.parse_args(argv)
    result = run(args.heldout, args.seed)
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f"held out: {', '.join(result['heldout_sources'])}   sizes: {result['sizes']}")
    print(f"{'AUROC':28s} {'test natural':>13s} {'test balanced':>14s}")
    for name, row in result["auroc"].items():
        print(f"{name:28s} {row['natural']:13.3f} {row['balanced']:14.3f}")
    for name, row in result.get("auroc_rho_refusal_natural", {}).items():
        print(f"rho_refusal pairs only, {name} train: {row:.3f}")
    for name, feats in result["top_features"].items():
        print(f"top features ({name} train): harmful {feats['harmful']}  benign {feats['benign']}")


if __name__ == "__main__":
    main()
