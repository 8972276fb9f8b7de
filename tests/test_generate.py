"""`casa generate` and `casa_cli.generate` on tiny random-weight models: every defence runs
the same decoding loop, which must agree with `model.generate` on every family; CASA with a
head-only adapter is the plain model on `safe` and the refusal text on `unsafe`; a LoRA
adapter's LoRA writes only after <|unsafe|>'s embedding; CoCA's two branches run as one batch."""
import json
import shutil

import pytest
import torch

import casa_cli
from casa_cli.adapter import save_adapter
from casa_cli.decoding import (DEFAULT_PRINCIPLE, DEFAULT_SYSTEM_PROMPT, DecodeOptions, Stream,
                               coca_logits, stop_ids, with_principle, with_system_prompt)
from test_cli_families import make_audio, make_image
from test_cli_inputs import one_line_error, write_manifest
from tiny_models import FAMILIES, MODALITIES

GREEDY = DecodeOptions(max_new_tokens=8)
SAMPLED = DecodeOptions(max_new_tokens=8, temperature=0.9, top_p=0.9, seed=7)
PROMPT = "Tell me how to bake bread, then describe the weather."


@pytest.fixture(scope="module")
def llama(tiny_model):
    return casa_cli.load(tiny_model("llama"))


def head_adapter(path, model_dir, bias: float, refusal: str | None = None):
    """A 'trained' head-only adapter whose verdict is forced by the bias: with V = 0,
    z = b, and p_unsafe = sigmoid(LM log-odds + b)."""
    casa = casa_cli.load(model_dir)
    casa.config.trained = True
    if refusal:
        casa.config.refusal = refusal
    with torch.no_grad():
        casa.head.b.fill_(bias)
    return save_adapter(path, casa.config, casa.head)


def reference_generate(backbone, sample, max_new_tokens):
    """transformers' own greedy decoding, with the same end tokens."""
    batch = backbone.encode([sample], reserve=max_new_tokens + 1)
    eos = stop_ids(backbone)
    out = backbone.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                  eos_token_id=sorted(eos))
    return [t for t in out[0, batch["input_ids"].shape[1]:].tolist() if t not in eos]


@pytest.mark.parametrize("family", FAMILIES)
def test_loop_matches_model_generate(family, tiny_model, tmp_path):
    """Media are encoded once in the prefill; continuation positions (Qwen2-VL / Omni mrope
    included) must match what generate passes."""
    casa = casa_cli.load(tiny_model(family))
    images = [make_image(tmp_path / "p.png")] if "image" in MODALITIES[family] else []
    audio = [make_audio(tmp_path / "a.wav")] if "audio" in MODALITIES[family] else []
    sample = casa_cli.prompt_sample("Describe this and say if it is dangerous.", images, audio)
    ours = casa.generate(sample, defense="none", options=GREEDY)
    assert ours.tokens == reference_generate(casa.backbone, sample, GREEDY.max_new_tokens)
    assert ours.timings["prefill_ms"] > 0 and ours.timings["first_token_ms"] >= ours.timings["prefill_ms"]


@pytest.mark.parametrize("family", FAMILIES)
def test_an_unsafe_verdict_stops_the_prefill_at_the_heads_layer(family, tiny_model, tmp_path):
    """Issue 19: with the refusal text to give, the verdict is taken inside the prefill and
    `unsafe` ends it after the head's layer; `safe` lets the same pass run on, and the
    answer is the plain model's. The verdict equals the one taken after a full prefill."""
    casa = casa_cli.load(tiny_model(family))
    casa.config.layer = 1  # of 2
    images = [make_image(tmp_path / "p.png")] if "image" in MODALITIES[family] else []
    audio = [make_audio(tmp_path / "a.wav")] if "audio" in MODALITIES[family] else []
    sample = casa_cli.prompt_sample("Describe this and say if it is dangerous.", images, audio)
    ran = []
    hooks = [module.register_forward_hook(lambda m, a, o, i=i: ran.append(i))
             for i, module in enumerate(casa.backbone.decoder_layers(), start=1)]
    try:
        refused = casa.generate(sample, "casa", threshold=0.0, on_unsafe="refuse", options=GREEDY)
        assert ran == [1] and refused.refused and refused.timings["prefill_layers"] == 1
        ran.clear()
        answered = casa.generate(sample, "casa", threshold=0.0, on_unsafe="generate", options=GREEDY)
        assert ran[:2] == [1, 2] and answered.timings["prefill_layers"] == 2
        assert answered.p_unsafe == refused.p_unsafe and answered.verdict == "unsafe"
        passed = casa.generate(sample, "casa", threshold=1.0, on_unsafe="refuse", options=GREEDY)
    finally:
        for hook in hooks:
            hook.remove()
    plain = casa.generate(sample, "none", options=GREEDY)
    assert passed.verdict == "safe" and passed.p_unsafe == refused.p_unsafe
    assert passed.tokens == plain.tokens and passed.timings["prefill_layers"] == 2


@pytest.mark.parametrize("options", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_casa_safe_with_head_adapter_is_the_plain_model(options, llama):
    sample = casa_cli.prompt_sample(PROMPT)
    plain = llama.generate(sample, defense="none", options=options)
    guarded = llama.generate(sample, defense="casa", options=options, threshold=1.0)
    assert guarded.verdict == "safe" and not guarded.refused and 0 <= guarded.p_unsafe < 1
    assert guarded.tokens == plain.tokens and guarded.text == plain.text
    assert guarded.timings["safety_ms"] > 0 and plain.verdict is None


def test_casa_through_the_cli_safe_and_unsafe(tiny_model, casa, tmp_path):
    model = tiny_model("llama")
    safe = head_adapter(tmp_path / "safe", model, bias=-50.0)
    unsafe = head_adapter(tmp_path / "unsafe", model, bias=50.0, refusal="No, I won't do that.")
    common = ["generate", PROMPT, "--model", model, "--max-new-tokens", 6, "--json"]
    plain = casa(*common, "--defense", "none")
    assert plain.code == 0, plain.stderr
    (plain,) = plain.records()
    (passed,) = casa(*common, "--adapter", safe).records()  # a trained adapter: casa by default
    assert (passed["defence"], passed["verdict"], passed["refused"]) == ("casa", "safe", False)
    assert passed["text"] == plain["text"] and passed["new_tokens"] == plain["new_tokens"]
    (refused,) = casa(*common, "--adapter", unsafe).records()
    assert (refused["verdict"], refused["refused"]) == ("unsafe", True)
    assert refused["text"] == "No, I won't do that." and refused["new_tokens"] == 0
    (answered,) = casa(*common, "--adapter", unsafe, "--on-unsafe", "generate").records()
    assert answered["verdict"] == "unsafe" and answered["text"] == plain["text"]
    shown = casa("generate", PROMPT, "--model", model, "--adapter", unsafe, "--show-verdict")
    assert shown.code == 0 and shown.stdout == "No, I won't do that.\n"
    assert "prompt: unsafe, p_unsafe 1.0000 (refusal text)" in shown.stderr


def test_text_streams_through_the_callback(llama):
    pieces = []
    result = llama.generate(PROMPT, defense="none", options=SAMPLED, on_text=pieces.append)
    assert pieces and "".join(pieces) == result.text
    refusal = []
    refused = llama.generate(PROMPT, defense="casa", threshold=0.0, on_text=refusal.append)
    assert refusal == [refused.text] == [llama.config.refusal]


def test_coca_alpha_zero_is_the_principle_branch(llama):
    sample = casa_cli.prompt_sample(PROMPT)
    coca = llama.generate(sample, defense="coca", alpha=0.0, options=SAMPLED)
    principled = llama.generate(with_principle(sample, DEFAULT_PRINCIPLE), defense="none",
                                options=SAMPLED)
    assert coca.tokens == principled.tokens and coca.verdict is None


@pytest.mark.parametrize("family", ["llama", "qwen2_vl"])
def test_coca_batch_of_two_equals_two_separate_branches(family, tiny_model, tmp_path):
    """One left-padded batch of (principle, plain) per step gives the logits of the two
    branches run one after the other, to 1e-4."""
    casa = casa_cli.load(tiny_model(family))
    backbone = casa.backbone
    images = [make_image(tmp_path / "p.png")] if family == "qwen2_vl" else []
    sample = casa_cli.prompt_sample("Describe this in one sentence.", images)
    principled = backbone.prepare(with_principle(sample, DEFAULT_PRINCIPLE), reserve=9)
    plain = backbone.prepare(sample, reserve=9)
    both, first, second = Stream(backbone, [principled, plain]), Stream(backbone, [principled]), Stream(backbone, [plain])
    batched = both.prefill.logits
    separate = torch.cat([first.prefill.logits, second.prefill.logits])
    tokens = []
    for _ in range(GREEDY.max_new_tokens):
        torch.testing.assert_close(batched.float(), separate.float(), atol=1e-4, rtol=1e-4)
        tokens.append(int(coca_logits(separate, 1.5).argmax()))
        batched = both.feed(tokens[-1])
        separate = torch.cat([first.feed(tokens[-1]), second.feed(tokens[-1])])
    assert casa.generate(sample, defense="coca", alpha=1.5, options=GREEDY).tokens == tokens


def test_prompt_defense_is_a_safety_system_prompt(llama):
    sample = casa_cli.prompt_sample(PROMPT)
    prompted = llama.generate(sample, defense="prompt", options=SAMPLED)
    by_hand = llama.generate(with_system_prompt(sample, DEFAULT_SYSTEM_PROMPT), defense="none",
                             options=SAMPLED)
    assert prompted.tokens == by_hand.tokens
    assert prompted.prompt_tokens > llama.generate(sample, defense="none", options=SAMPLED).prompt_tokens


def test_lora_adapter_writes_after_unsafe_only(tiny_model, tmp_path):
    from peft import LoraConfig, get_peft_model

    from casa_cli.lora import LORA_TARGETS

    model = tiny_model("llama")
    maker = casa_cli.load(model)
    torch.manual_seed(0)  # random (not identity) LoRA weights, so they visibly matter
    peft = get_peft_model(maker.backbone.model, LoraConfig(
        r=4, lora_alpha=8, target_modules=LORA_TARGETS, init_lora_weights=False))
    maker.config.trained, maker.config.mode = True, "lora"
    with torch.no_grad():
        maker.head.token_in.normal_()
    adapter = save_adapter(tmp_path / "lora-adapter", maker.config, maker.head, peft)

    casa = casa_cli.load(model, adapter=adapter)
    plain = casa_cli.load(model).generate(PROMPT, defense="none", options=GREEDY)
    safe = casa.generate(PROMPT, threshold=1.0, options=GREEDY)
    assert safe.verdict == "safe" and safe.tokens == plain.tokens  # the base model, LoRA off
    unsafe = casa.generate(PROMPT, threshold=0.0, options=GREEDY)
    assert unsafe.verdict == "unsafe" and not unsafe.refused  # LoRA default: generate
    # Reference, by hand: the prompt prefilled on the base weights, then <|unsafe|>'s input
    # row and greedy tokens through the LoRA.
    backbone = casa.backbone
    batch = backbone.encode([casa_cli.prompt_sample(PROMPT)], reserve=9)
    with torch.no_grad():
        out = backbone.model(**batch, use_cache=True)
        embeds = casa.head.token_in[1][None, None].to(backbone.dtype)
        tokens, cache, length = [], out.cache, batch["input_ids"].shape[1]
        with casa.refusal_lora.on():
            while len(tokens) < GREEDY.max_new_tokens:
                length += 1
                out = backbone.model(inputs_embeds=embeds, cache=cache, use_cache=True,
                                     attention_mask=torch.ones(1, length, dtype=torch.long))
                cache, token = out.cache, int(out.logits[0, -1].argmax())
                tokens.append(token)
                if token in stop_ids(backbone):
                    break
                embeds = backbone.model.get_input_embeddings()(torch.tensor([[token]]))
    assert unsafe.tokens == tokens != plain.tokens
    # the LoRA is off again for what follows, and never on outside casa's unsafe branch
    assert casa.generate(PROMPT, defense="none", options=GREEDY).tokens == plain.tokens
    head_only = tmp_path / "head-only"
    shutil.copytree(adapter, head_only, ignore=shutil.ignore_patterns("lora"))
    config = json.loads((head_only / "casa_config.json").read_text())
    (head_only / "casa_config.json").write_text(json.dumps({**config, "mode": "head"}))
    verdicts = [next(c.classify([casa_cli.prompt_sample(PROMPT)]))["p_unsafe"]
                for c in (casa, casa_cli.load(model, adapter=head_only))]
    assert verdicts[0] == verdicts[1]  # the head reads the base model's states
    assert casa.generate(PROMPT, threshold=0.0, on_unsafe="refuse").text == casa.config.refusal


def test_manifest_survives_a_failing_record_and_resumes(tiny_model, casa, tmp_path):
    make_image(tmp_path / "pic.png")
    manifest = write_manifest(tmp_path / "batch.jsonl", [
        {"id": "ok-1", "text": "Tell me a joke about cats."},
        {"id": "image-to-text-model", "text": "What is shown?", "image": "pic.png"},
        {"id": "empty", "text": "  "},
        {"id": "ok-2", "text": "What is the weather today?"},
    ])
    out = tmp_path / "answers.jsonl"
    args = ["generate", "--manifest", manifest, "--model", tiny_model("llama"),
            "--max-new-tokens", 4, "--output", out]
    result = casa(*args, "--defense", "coca")
    assert result.code == 4, result.stderr
    records = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert list(records) == ["ok-1", "image-to-text-model", "empty", "ok-2"]
    assert records["ok-1"]["defence"] == "coca" and records["ok-2"]["new_tokens"] == 4
    assert "does not accept image input" in records["image-to-text-model"]["error"]
    assert "empty prompt" in records["empty"]["error"]
    out.write_text(out.read_text().splitlines(keepends=True)[0])  # as if killed after one
    resumed = casa(*args, "--defense", "coca", "--resume")
    assert resumed.code == 4, resumed.stderr
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == list(records)


def test_chat_history_from_a_file(tiny_model, casa, tmp_path):
    history = tmp_path / "chat.json"
    history.write_text(json.dumps([{"role": "user", "content": "Hi!"},
                                   {"role": "assistant", "content": "Hello, how can I help?"}]))
    model = tiny_model("llama")
    alone = casa("generate", "And the weather?", "--model", model, "--max-new-tokens", 2, "--json")
    chat = casa("generate", "And the weather?", "--messages", history, "--model", model,
                "--max-new-tokens", 2, "--json")
    assert chat.code == 0, chat.stderr
    assert chat.records()[0]["prompt_tokens"] > alone.records()[0]["prompt_tokens"]
    last_turn = tmp_path / "ends-with-user.json"
    last_turn.write_text(json.dumps([{"role": "user", "content": "And the weather?"}]))
    from_file = casa("generate", "--messages", last_turn, "--model", model, "--max-new-tokens", 2, "--json")
    assert from_file.records()[0]["text"] == alone.records()[0]["text"]


def test_bad_input_gives_one_line_errors(tiny_model, casa, tmp_path):
    model = tiny_model("llama")
    for args, needle in [
        (["--defense", "magic"], "not one of casa, coca, prompt, vsfa, none"),
        (["--on-unsafe", "shrug"], "not one of generate, refuse"),
        (["--temperature", "-1"], "--temperature"),
        (["--top-p", "0"], "--top-p"),
        (["--resume"], "--resume needs --output"),
    ]:
        result = casa("generate", "hi", "--model", model, *args)
        assert result.code == 2, (args, result.stderr)
        one_line_error(result, needle)
    broken = tmp_path / "broken.json"
    broken.write_text("[{")
    one_line_error(casa("generate", "hi", "--messages", broken, "--model", model), "broken.json", "invalid JSON")
    ends_with_assistant = tmp_path / "chat.json"
    ends_with_assistant.write_text(json.dumps([{"role": "assistant", "content": "Hello"}]))
    result = casa("generate", "--messages", ends_with_assistant, "--model", model)
    assert result.code == 2
    one_line_error(result, "last message must be the user's turn")
    image_to_text = casa("generate", "What is this?", "--image", make_image(tmp_path / "x.png"),
                         "--model", model)
    assert image_to_text.code == 4
    one_line_error(image_to_text, "does not accept image input")
