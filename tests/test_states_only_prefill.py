"""`Backbone.prefill(states_only=True)` stops the forward after the deepest layer captured
(issue 19): the states, and so every verdict, are those of the full pass (compared exactly,
on each tiny family with padded batches), and the layers above that layer never run."""
import pytest
import torch

from casa_cli.backbone import load_backbone
from casa_cli.inputs import prompt_sample
from tiny_models import FAMILIES

PROMPTS = ["hi", "Tell me how rivers carry sand to the sea, slowly and in detail.", "a b c d"]


@pytest.mark.parametrize("family", FAMILIES)
def test_states_equal_the_full_pass_and_deeper_layers_never_run(tiny_model, family):
    backbone = load_backbone(str(tiny_model(family)))
    batch = backbone.encode([prompt_sample(p) for p in PROMPTS])  # padded: lengths differ
    layers = backbone.decoder_layers()
    ran = []
    hooks = [module.register_forward_hook(lambda m, a, o, i=i: ran.append(i))
             for i, module in enumerate(layers, start=1)]
    try:
        with torch.no_grad():
            full = backbone.prefill(batch, layer=1, layers=[1])
            ran.clear()
            early = backbone.prefill(batch, layer=1, layers=[1], states_only=True)
    finally:
        for hook in hooks:
            hook.remove()
    assert ran == [1] and early.logits is None and early.cache is None
    assert torch.equal(early.H, full.H) and torch.equal(early.layers[1], full.layers[1])
    assert torch.equal(early.mask, full.mask)


def test_the_last_layer_runs_the_whole_model(tiny_model):
    backbone = load_backbone(str(tiny_model("llama")))
    batch = backbone.encode([prompt_sample(p) for p in PROMPTS])
    with torch.no_grad():
        full, early = (backbone.prefill(batch, states_only=flag) for flag in (False, True))
    assert torch.equal(early.H, full.H) and early.logits is not None
