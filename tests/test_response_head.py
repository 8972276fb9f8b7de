"""A response head (issue 17): an adapter of its own in the adapter's `response/` folder,
trained by `casa train` on records with a `response`, that judges (prompt, response) pairs
in classify and in the response monitor, while prompts keep the prompt head. Tiny
random-weight llama; the planted signal is a marker word in the response only."""
import json

import torch

import casa_cli
from casa_cli.adapter import RESPONSE_DIR, load_adapter, save_adapter
from casa_cli.decoding import DecodeOptions
from casa_cli.inputs import Sample, prompt_sample
from casa_cli.metrics import score_metrics
from test_adapter_training import separable_manifest
from test_cli_families import random_head_adapter

PROMPTS = ["Tell me about your weekend plans", "What should I cook tonight",
           "Describe the view from the hill"]


def pairs_manifest(path, n=48, seed=0):
    """`separable_manifest`'s marker texts as the responses ('zebra' harmful, 'violin'
    safe), under the same three prompts for both labels."""
    rows = [json.loads(line) for line in separable_manifest(path, n, seed).read_text().splitlines()]
    rows = [{**r, "text": PROMPTS[i % 3], "response": r["text"]} for i, r in enumerate(rows)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def forced_response_head(adapter, model, bias: float, layer=None):
    """A response head whose verdict the bias forces (V = 0: z = b), in `adapter`."""
    casa = casa_cli.load(model)
    casa.config.trained, casa.config.layer = True, layer
    with torch.no_grad():
        casa.head.b.fill_(bias)
    return save_adapter(adapter / RESPONSE_DIR, casa.config, casa.head)


def test_casa_train_on_pairs_learns_from_the_response(tiny_model, tmp_path, casa):
    model = tiny_model("llama")
    rows = pairs_manifest(tmp_path / "pairs.jsonl")
    pairs_manifest(tmp_path / "val.jsonl", n=24, seed=1)
    out = tmp_path / "adapter" / RESPONSE_DIR
    result = casa("train", "--model", model, "--data", tmp_path / "pairs.jsonl",
                  "--val", tmp_path / "val.jsonl", "--layer", 2, "--epochs", 30, "--out", out)
    assert result.code == 0, result.stderr
    pairs = casa_cli.load(model, out)
    samples = [Sample(id=r["id"], messages=[{"role": "user", "content": r["text"]}],
                      response=r["response"]) for r in rows]
    scores = [r["p_unsafe"] for r in sorted(pairs.classify(samples), key=lambda r: int(r["id"][1:]))]
    labels = [int(r["label"] == "harmful") for r in rows]
    assert score_metrics(labels, scores)["auroc"] >= 0.9  # the marker is in the response only
    # the prompts alone carry no signal: the same three texts for both labels
    alone = {r["p_unsafe"] for r in pairs.classify([prompt_sample(p) for p in PROMPTS])}
    assert len(alone) == 3


def test_the_response_head_judges_pairs_and_the_monitor(tiny_model, tmp_path, casa):
    model = tiny_model("llama")
    adapter = random_head_adapter(tmp_path / "adapter", model)
    forced_response_head(adapter, model, bias=50.0)
    loaded = casa_cli.load(model, adapter)
    prompt_head = casa_cli.load(model, adapter)  # the same, without its response head
    prompt_head.response = None
    (alone,) = loaded.classify([prompt_sample(PROMPTS[0])])
    (as_before,) = prompt_head.classify([prompt_sample(PROMPTS[0])])
    assert alone["p_unsafe"] == as_before["p_unsafe"] < 0.99  # prompts: the prompt head
    (pair,) = loaded.classify([Sample(id="p", messages=[{"role": "user", "content": PROMPTS[0]}],
                                      response="Sure.")])
    assert pair["scored"] == "response" and pair["verdict"] == "unsafe" and pair["p_unsafe"] > 0.99
    answer = loaded.generate(PROMPTS[0], "none", monitor=True,
                             options=DecodeOptions(max_new_tokens=4, ignore_eos=True))
    assert answer.monitor["stopped_at"] == 0 and answer.text == loaded.config.refusal
    plain = prompt_head.generate(PROMPTS[0], "none", monitor=True,
                                 options=DecodeOptions(max_new_tokens=4, ignore_eos=True))
    assert plain.monitor["p_unsafe_max"] < 0.99
    info = casa("load", "--model", model, "--adapter", adapter, "--json")
    assert info.code == 0 and info.records()[0]["response_head"]["threshold"] == 0.5


def test_a_response_head_reading_another_layer_is_refused(tiny_model, tmp_path, casa):
    model = tiny_model("llama")
    adapter = random_head_adapter(tmp_path / "adapter", model)
    forced_response_head(adapter, model, bias=0.0, layer=1)
    assert load_adapter(adapter / RESPONSE_DIR, casa_cli.load(model).backbone)[0].layer == 1
    result = casa("classify", "hi", "--model", model, "--adapter", adapter)
    assert result.code == 2
    assert "the response head reads layer 1" in result.stderr and "same layer" in result.stderr


def test_a_response_is_part_of_the_cache_key():
    def sample(response):
        return Sample(id="a", messages=[{"role": "user", "content": "hi"}], response=response)
    assert sample(None).key == prompt_sample("hi").key
    assert len({sample(None).key, sample("yes").key, sample("no").key}) == 3
