"""Adapters (save/load, fingerprint check) and `casa train` (head and lora modes) on tiny
random-weight models."""
import json
import random

import pytest
import torch
from safetensors import safe_open

from casa_cli.adapter import init_adapter, load_adapter, save_adapter
from casa_cli.backbone import load_backbone
from casa_cli.inputs import InputError, prompt_sample
from casa_cli.pipeline import load
from casa_cli.training import TrainOptions, safety_logits, train

WORDS = "river stone cloud paper window garden music table orange yellow quiet simple".split()


def separable_manifest(path, n=48, seed=0):
    """Harmful prompts carry the marker word 'zebra', benign ones 'violin'; the rest is noise."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        harmful = i % 2 == 0
        words = rng.sample(WORDS, 5)
        words.insert(rng.randrange(6), "zebra zebra" if harmful else "violin violin")
        rows.append({"id": f"s{i}", "text": " ".join(words), "label": "harmful" if harmful else "benign"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def randomised(head, seed=1):
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))
    return head


def test_adapter_round_trip(tiny_model, tmp_path):
    backbone = load_backbone(str(tiny_model("llama")))
    config, head = init_adapter(backbone, heads=3, gate="multiply")
    randomised(head)
    config.refusal, config.threshold = "No.", 0.3
    save_adapter(tmp_path / "adapter", config, head)
    loaded_config, loaded = load_adapter(tmp_path / "adapter", backbone)
    assert loaded_config == config
    assert loaded.gate == "multiply" and loaded.heads == 3 and loaded.threshold == 0.3
    for (name, a), (_, b) in zip(head.named_parameters(), loaded.named_parameters()):
        assert torch.equal(a, b), name


def test_fingerprint_mismatch_is_refused(tiny_model, tmp_path, casa):
    backbone = load_backbone(str(tiny_model("llama")))
    save_adapter(tmp_path / "llama-adapter", *init_adapter(backbone))
    other = load_backbone(str(tiny_model("qwen2_vl")))
    with pytest.raises(InputError, match="adapter was made for"):
        load_adapter(tmp_path / "llama-adapter", other)
    result = casa("classify", "hi", "--model", tiny_model("qwen2_vl"), "--adapter", tmp_path / "llama-adapter")
    assert result.code == 2 and "adapter was made for" in result.stderr
    not_adapter = casa("classify", "hi", "--model", tiny_model("llama"), "--adapter", tmp_path)
    assert not_adapter.code == 2 and "not a CASA adapter" in not_adapter.stderr


def test_head_training_separates_a_separable_set(tiny_model, tmp_path):
    backbone = load_backbone(str(tiny_model("llama")))
    from casa_cli.inputs import read_manifest
    examples = list(read_manifest(separable_manifest(tmp_path / "train.jsonl")))
    val = list(read_manifest(separable_manifest(tmp_path / "val.jsonl", n=16, seed=1)))
    options = TrainOptions(epochs=80, lr=3e-2, patience=80, batch_size=16)
    config, head, _ = train(backbone, examples, options, val_examples=val)
    history = config.training
    assert config.trained and config.metrics["validation"]["auroc"] == 1.0
    assert history["final"]["train_loss"] < 0.1
    casa_model = load(str(tiny_model("llama")))
    casa_model.head, casa_model.config = head, config  # the config names the layer auto chose
    verdicts = list(casa_model.classify(val, threshold=0.5))
    labels = {s.id: s.label for s in val}  # records come batch by batch: match them by id
    accuracy = sum((r["verdict"] == "unsafe") == (labels[r["id"]] == "harmful") for r in verdicts) / len(val)
    assert accuracy == 1.0


def test_train_cli_head_and_lora_modes(tiny_model, tmp_path, casa):
    data = separable_manifest(tmp_path / "train.jsonl", n=24)
    heldout = separable_manifest(tmp_path / "heldout.jsonl", n=8, seed=3)
    for mode in ("head", "lora"):
        out = tmp_path / f"adapter-{mode}"
        result = casa("train", "--model", tiny_model("llama"), "--data", data, "--heldout", heldout,
                      "--mode", mode, "--epochs", 3, "--out", out, "--json")
        assert result.code == 0, result.stderr
        summary = json.loads(result.stdout)
        assert {"validation", "heldout"} <= set(summary["metrics"])
        config = json.loads((out / "casa_config.json").read_text())
        assert config["trained"] and config["mode"] == mode
        assert (out / "lora" / "adapter_model.safetensors").is_file() == (mode == "lora")
        if mode == "lora":
            # peft starts every B at zero: a LoRA that was never trained saves zeros there
            with safe_open(str(out / "lora" / "adapter_model.safetensors"), "pt") as lora:
                b = [lora.get_tensor(k) for k in lora.keys() if "lora_B" in k]
            assert b and all(t.abs().sum() > 0 for t in b)
            peft_config = json.loads((out / "lora" / "adapter_config.json").read_text())
            assert peft_config["base_model_name_or_path"] is None  # no path of this machine
        classified = casa("classify", "violin music", "--model", tiny_model("llama"), "--adapter", out, "--json")
        assert classified.code == 0, classified.stderr
        assert "untrained" not in classified.stderr


def test_explain_shares_add_up_to_z(tiny_model):
    casa_model = load(str(tiny_model("llama")))
    randomised(casa_model.head)
    sample = prompt_sample("a short prompt to explain")
    (record,) = casa_model.classify([sample], explain=1000)
    total = sum(item["contribution"] for item in record["explain"]) + float(casa_model.head.b.detach())
    assert total == pytest.approx(record["z"], abs=1e-3)
    assert len(record["explain"]) == record["prompt_tokens"]


@pytest.mark.parametrize("family", ["llama", "qwen2_vl"])
def test_head_layer_states_are_that_layer_through_the_final_norm(tiny_model, family):
    """Reference: transformers' own output_hidden_states, put through the final norm."""
    backbone = load_backbone(str(tiny_model(family)))
    batch = backbone.encode([prompt_sample("a quiet river under the stone bridge")])
    with torch.no_grad():
        reference = backbone.model(**batch, output_hidden_states=True).hidden_states
        last = backbone.prefill(batch).H
        torch.testing.assert_close(last, reference[-1], rtol=1e-5, atol=1e-5)  # already normed
        for layer in (1, backbone.num_layers - 1):
            H = backbone.prefill(batch, layer=layer).H
            torch.testing.assert_close(H, backbone.final_norm()(reference[layer]), rtol=1e-5, atol=1e-5)
            assert not torch.allclose(H, last)


def test_train_with_a_layer_ships_it_in_the_adapter(tiny_model, tmp_path, casa):
    model = tiny_model("llama")
    data = separable_manifest(tmp_path / "train.jsonl", n=24)
    out = tmp_path / "adapter"
    result = casa("train", "--model", model, "--data", data, "--layer", 1, "--epochs", 2, "--out", out)
    assert result.code == 0, result.stderr
    assert json.loads((out / "casa_config.json").read_text())["layer"] == 1
    info = casa("load", "--model", model, "--adapter", out, "--json")
    assert info.code == 0 and info.records()[0]["head_layer"] == 1
    assert info.records()[0]["verdict_prefill"].startswith("layers 1-1 of 2 ")
    # What classify reports is the head on layer 1's states, not on the last layer's.
    casa_model = load(str(model), adapter=out)
    assert casa_model.config.layer == 1
    sample = prompt_sample("violin music")
    with torch.no_grad():
        outputs = casa_model.backbone.model(**casa_model.backbone.encode([sample]),
                                            output_hidden_states=True)
        H = casa_model.backbone.final_norm()(outputs.hidden_states[1])
        expected = torch.softmax(safety_logits(casa_model.head, H, torch.ones(H.shape[:2], dtype=torch.bool)), -1)[0, 1]
    assert list(casa_model.classify([sample]))[0]["p_unsafe"] == pytest.approx(float(expected), abs=1e-5)

    too_deep = casa("train", "--model", model, "--data", data, "--layer", 99, "--out", tmp_path / "x")
    assert too_deep.code == 2 and "layer 99 is out of range" in too_deep.stderr


@pytest.mark.parametrize("family", ["llama", "qwen2_vl"])
def test_lora_training_scores_refusals_as_decoding_writes_them(tiny_model, family):
    """Reference: decoding itself (`Stream`, one prompt at a time, the LoRA switched on at
    <|unsafe|>), teacher-forced through each refusal. The training loss over a left-padded
    batch of prompts and right-padded refusals of different lengths must equal its mean
    token NLL (fp32, 1e-5): positions, masks and the gate as decoding has them."""
    from casa_cli.adapter import LoraGate
    from casa_cli.decoding import Stream
    from casa_cli.lora import decoder_lora, refusal_loss

    casa_model = load(str(tiny_model(family)))
    backbone = casa_model.backbone
    decoder_lora(backbone.model, r=4, alpha=8)
    gate = LoraGate(backbone.model)
    lora = [p for name, p in backbone.model.named_parameters() if "lora_" in name]
    assert lora and all(p.requires_grad for p in lora)  # switching the gate off must not freeze it
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in backbone.model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)  # peft starts B at zero: the LoRA would change nothing
        casa_model.head.token_in.normal_()
    samples = [prompt_sample("river stone"), prompt_sample("a much longer prompt about the quiet garden music")]
    targets = ["No.", "I can't help with that, but here is a safer idea."]
    batched = refusal_loss(backbone, gate, casa_model.head, samples, targets)

    total, count = 0.0, 0
    with torch.no_grad():
        for sample, target in zip(samples, targets):
            ids = backbone.tokenizer(target, add_special_tokens=False)["input_ids"]
            ids.append(backbone.tokenizer.eos_token_id)
            stream = Stream(backbone, [backbone.prepare(sample, reserve=len(ids))])
            with gate.on():
                logits = stream.step(inputs_embeds=casa_model.head.token_in[1][None, None])
                for token in ids:
                    total -= float(torch.log_softmax(logits[0].float(), -1)[token])
                    logits = stream.feed(token)
            count += len(ids)
    assert float(batched.detach()) == pytest.approx(total / count, abs=1e-5)
    # and the gate is off again: the plain model's logits
    plain = Stream(backbone, [backbone.prepare(samples[0])]).prefill.logits
    gate.switch(True)
    assert not torch.allclose(plain, Stream(backbone, [backbone.prepare(samples[0])]).prefill.logits)
    gate.switch(False)
