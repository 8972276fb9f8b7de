"""`casa train --layer auto`: the head is fitted at each candidate layer, all of them read in
one prefill per prompt, and the layer of the best validation AUROC is kept and recorded.

The signal is planted at ONE layer of a 6-layer tiny llama: a forward hook adds +v (harmful)
or -v (benign) along a fixed direction to that layer's output, and a pre-hook on the next
layer takes it away again, so no other layer carries it. The prompts themselves carry no
label (random words, random labels)."""
import json
import random

import pytest
import torch

from casa_cli import backbone as backbone_module, pipeline, recipes
from casa_cli.backbone import load_backbone
from casa_cli.inputs import prompt_sample
from casa_cli.training import candidate_layers, choose_layer

PLANTED = 4
LAYERS = 6
WORDS = ("river stone cloud paper window garden music table orange yellow quiet simple "
         "bridge forest candle mirror").split()


@pytest.fixture(scope="module")
def deep_model(tiny_model, tmp_path_factory):
    """The tiny llama's tokenizer and config with 6 decoder layers (random weights)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    source = tiny_model("llama")
    config = LlamaConfig.from_pretrained(source)
    config.num_hidden_layers = LAYERS
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("llama6")
    LlamaForCausalLM(config).eval().save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    return out


def manifest(path, n, seed):
    """Distinct random-word prompts with random labels (balanced): no word marks a label."""
    rng = random.Random(seed)
    texts = set()
    while len(texts) < n:
        texts.add(" ".join(rng.sample(WORDS, 6)))
    labels = ["harmful", "benign"] * (n // 2)
    rng.shuffle(labels)
    rows = [{"id": f"{path.stem}{i}", "text": t, "label": y}
            for i, (t, y) in enumerate(zip(sorted(texts), labels))]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


@pytest.fixture
def planted(deep_model, tmp_path, monkeypatch):
    """Train/val manifests, a private cache, and `load_backbone` patched so every model it
    loads carries the planted signal at layer PLANTED and counts its forward passes (and the
    prompts in them)."""
    monkeypatch.setenv("CASA_CACHE_DIR", str(tmp_path / "cache"))
    rows = manifest(tmp_path / "train.jsonl", 40, 0) + manifest(tmp_path / "val.jsonl", 20, 1)
    counts = {"forward": 0, "prompts": 0}
    load = backbone_module.load_backbone

    def planted_load(*args, **kwargs):
        backbone = load(*args, **kwargs)
        sign = {tuple(backbone.encode([prompt_sample(r["text"])])["input_ids"][0].tolist()):
                1.0 if r["label"] == "harmful" else -1.0 for r in rows}
        direction = torch.nn.functional.normalize(
            torch.randn(backbone.hidden_size, generator=torch.Generator().manual_seed(7)), dim=0)
        current = {}

        def count(module, args, kwargs):
            ids, mask = kwargs["input_ids"], kwargs["attention_mask"].bool()
            counts["forward"] += 1
            counts["prompts"] += ids.shape[0]
            current["shift"] = 4.0 * torch.tensor(
                [sign.get(tuple(row[m].tolist()), 0.0) for row, m in zip(ids, mask)]
            )[:, None, None] * direction

        def add(module, args, output):
            if isinstance(output, tuple):
                return (output[0] + current["shift"], *output[1:])
            return output + current["shift"]

        def remove(module, args, kwargs):
            return (args[0] - current["shift"], *args[1:]), kwargs

        layers = backbone.decoder_layers()
        backbone.model.register_forward_pre_hook(count, with_kwargs=True)
        layers[PLANTED - 1].register_forward_hook(add)
        layers[PLANTED].register_forward_pre_hook(remove, with_kwargs=True)
        return backbone

    # pipeline and recipes (casa_cli.train) hold their own references: patched too, so
    # training loads the planted model and a later test never inherits this one.
    monkeypatch.setattr(backbone_module, "load_backbone", planted_load)
    monkeypatch.setattr(pipeline, "load_backbone", planted_load)
    monkeypatch.setattr(recipes, "load_backbone", planted_load)
    return tmp_path, counts


def run_train(casa, deep_model, folder, out, *extra):
    return casa("train", "--model", deep_model, "--data", folder / "train.jsonl",
                "--val", folder / "val.jsonl", "--epochs", 4, "--lr", 3e-2,
                "--out", out, "--json", *extra)


def test_candidates_spread_over_the_depth():
    assert candidate_layers(30) == [9, 12, 15, 18, 21, 24, 27, 30]  # the README's hand sweep
    assert candidate_layers(6) == [2, 3, 4, 5, 6]
    assert candidate_layers(2) == [1, 2]
    for n in range(1, 200):
        chosen = candidate_layers(n)
        assert chosen[-1] == n and 4 * chosen[0] >= n and len(chosen) <= 8


def test_prefill_reads_several_layers_in_one_pass(deep_model):
    backbone = load_backbone(str(deep_model))
    batch = backbone.encode([prompt_sample("a quiet river"), prompt_sample("stone bridge in a forest")])
    with torch.no_grad():
        reference = backbone.model(**batch, output_hidden_states=True).hidden_states
    out = backbone.prefill(batch, layer=3, layers=[2, 5, LAYERS])
    assert sorted(out.layers) == [2, 5, LAYERS]
    for layer in (2, 5):
        torch.testing.assert_close(out.layers[layer], backbone.final_norm()(reference[layer]),
                                   rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.layers[LAYERS], reference[-1], rtol=1e-5, atol=1e-5)
    # The head's own H (inference) is untouched by the extra layers.
    torch.testing.assert_close(out.H, backbone.final_norm()(reference[3]), rtol=1e-5, atol=1e-5)
    assert backbone.prefill(batch).layers is None
    assert backbone.prefill(batch, capture=False, layers=[1]).H is None


def test_auto_finds_the_planted_layer_in_one_prefill_per_prompt(deep_model, planted, casa):
    folder, counts = planted
    result = run_train(casa, deep_model, folder, folder / "adapter")  # no --layer: auto
    assert result.code == 0, result.stderr
    # Every prompt went through the model once for all five candidates (and nothing else).
    assert counts["prompts"] == 60 and counts["forward"] == 4  # batches of 16
    summary = json.loads(result.stdout)
    assert summary["layer"] == PLANTED
    config = json.loads((folder / "adapter" / "casa_config.json").read_text())
    assert config["layer"] == PLANTED
    sweep = config["training"]["layer_sweep"]
    assert [r["layer"] for r in sweep] == candidate_layers(LAYERS) == [2, 3, 4, 5, 6]
    assert [r["layer"] for r in sweep if r["chosen"]] == [PLANTED]
    by_layer = {r["layer"]: r for r in sweep}
    assert by_layer[PLANTED]["val_auroc"] == 1.0
    assert all(by_layer[layer]["val_auroc"] < 0.95 for layer in by_layer if layer != PLANTED)
    assert {"val_loss", "val_tpr_at_1pct_fpr"} <= set(by_layer[PLANTED])
    assert summary["layer_sweep"] == sweep
    assert config["metrics"]["validation"]["auroc"] == 1.0

    # Second run: every state comes from the cache, for the sweep and for one forced layer.
    counts.update(forward=0, prompts=0)
    again = run_train(casa, deep_model, folder, folder / "again")
    assert again.code == 0, again.stderr
    assert json.loads(again.stdout)["layer"] == PLANTED
    forced = run_train(casa, deep_model, folder, folder / "forced", "--layer", 3)
    assert forced.code == 0, forced.stderr
    assert counts["forward"] == 0
    # A candidate list of one's own, printed as a table.
    table = casa("train", "--model", deep_model, "--data", folder / "train.jsonl", "--val",
                 folder / "val.jsonl", "--epochs", 4, "--lr", 3e-2,
                 "--layers", "5,4,2", "--out", folder / "listed")
    assert table.code == 0, table.stderr
    assert "layer sweep" in table.stdout and f"{PLANTED} *" in table.stdout
    listed = json.loads((folder / "listed" / "casa_config.json").read_text())
    assert [r["layer"] for r in listed["training"]["layer_sweep"]] == [2, 4, 5]
    assert listed["layer"] == PLANTED and counts["forward"] == 0


def test_a_forced_layer_records_no_sweep(deep_model, planted, casa):
    folder, counts = planted
    one = run_train(casa, deep_model, folder, folder / "one", "--layer", 1)
    assert one.code == 0, one.stderr
    assert json.loads(one.stdout)["layer"] == 1 and json.loads(one.stdout)["layer_sweep"] is None
    config = json.loads((folder / "one" / "casa_config.json").read_text())
    assert config["layer"] == 1 and "layer_sweep" not in config["training"]
    assert counts["prompts"] == 60  # one layer, one pass
    last = run_train(casa, deep_model, folder, folder / "last", "--layer", "last")
    assert last.code == 0, last.stderr
    assert json.loads((folder / "last" / "casa_config.json").read_text())["layer"] is None
    info = casa("load", "--model", deep_model, "--adapter", folder / "last", "--json")
    assert info.code == 0 and info.records()[0]["head_layer"] == LAYERS

    for bad, message in ((("--layer", "middle"), "use auto, last or a layer number"),
                         (("--layer", 2, "--layers", "3,4"), "cannot go with --layer 2"),
                         (("--layers", "3,99"), "layer 99 is out of range"),
                         (("--layers", "3,x"), "separated by commas")):
        refused = run_train(casa, deep_model, folder, folder / "bad", *bad)
        assert refused.code == 2 and message in refused.stderr, refused.stderr


def row(layer, auroc, tpr):
    return {"layer": layer, "val_auroc": auroc, "val_tpr_at_1pct_fpr": tpr}


def test_the_choice_weighs_tpr_among_layers_auroc_cannot_tell_apart():
    """On 200 + 200 validation prompts one standard error at AUROC 0.967 is about 0.009:
    0.960 is within it, 0.950 is not."""
    rows = [row(9, 0.967, 0.59), row(15, 0.960, 0.74), row(21, 0.950, 0.90), row(30, 0.963, 0.66)]
    assert rows[choose_layer(rows, 200, 200)]["layer"] == 15
    # With 20 times the prompts the margin is 0.002: only the best AUROC is left.
    assert rows[choose_layer(rows, 4000, 4000)]["layer"] == 9
    # Equal TPR: the higher AUROC, then the deeper layer.
    tied = [row(12, 0.961, 0.7), row(18, 0.964, 0.7), row(24, 0.964, 0.7)]
    assert tied[choose_layer(tied, 200, 200)]["layer"] == 24
