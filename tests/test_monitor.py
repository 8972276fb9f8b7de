"""`casa generate --monitor` (issue 17): the safety head kept up to date while the answer is
decoded, on the tiny random-weight llama.

A signal is planted: the adapter's head reads one direction v (its attention score and its
value both look along v; the token rows are zero, so p_unsafe = sigmoid(z)), and a forward
hook on the final norm (the head reads the last layer) adds SIGNAL * v to the states of the
answer from token START on, in decode steps only. So p_unsafe stays near 0 until the
state of answer token START enters the monitor, and is near 1 from then on. Without the
hook the same adapter never flags. Answers are sampled with a fixed seed, so their tokens
vary, and the planted run writes the same tokens as the plain one until the signal."""
import math
from types import SimpleNamespace

import pytest
import torch

import casa_cli
from casa_cli import pipeline
from casa_cli.adapter import save_adapter
from casa_cli.commands import generate as generate_command
from casa_cli.decoding import DecodeOptions
from casa_cli.head import SafetyHead
from casa_cli.monitor import MonitorOptions

START = 4  # the answer token whose state first carries the signal
SIGNAL = 30.0
NEW_TOKENS = 12
REFUSAL = "Stopped by the monitor."
PROMPT = "Tell me how to bake bread, then describe the weather."
SAMPLING = ["--temperature", 1.0, "--seed", 11]  # token START decodes to whole characters


def direction(size: int) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(size, generator=torch.Generator().manual_seed(5)), dim=0)


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model("llama")


@pytest.fixture(scope="module")
def adapter(model, tmp_path_factory):
    """A head that fires on v: one head scores and values along v, z's bias is -10."""
    casa = casa_cli.load(model)
    v = direction(casa.backbone.hidden_size)
    with torch.no_grad():
        for param in (casa.head.Q, casa.head.V, casa.head.token_out):
            param.zero_()
        casa.head.Q[0], casa.head.V[0] = v, v
        casa.head.b.fill_(-10.0)
    casa.config.trained, casa.config.threshold, casa.config.refusal = True, 0.5, REFUSAL
    return save_adapter(tmp_path_factory.mktemp("planted") / "adapter", casa.config, casa.head)


@pytest.fixture
def plant(monkeypatch):
    """plant(start, value=SIGNAL): every model `casa generate` loads carries `value` * v on
    the final norm's output from answer token `start` on (decode steps feed one token)."""
    load = pipeline.load_backbone

    def planting(start: int, value: float = SIGNAL):
        def planted_load(*args, **kwargs):
            backbone = load(*args, **kwargs)
            v = direction(backbone.hidden_size)
            fed = {"tokens": 0}

            def add(module, args, output):
                if output.shape[1] != 1:  # the prefill: the prompt carries nothing
                    return output
                fed["tokens"] += 1
                return output + value * v if fed["tokens"] > start else output

            backbone.final_norm().register_forward_hook(add)
            return backbone
        monkeypatch.setattr(pipeline, "load_backbone", planted_load)
    return planting


def run(casa, model, adapter, *extra, defense="none", max_new_tokens=NEW_TOKENS):
    result = casa("generate", PROMPT, "--model", model, "--adapter", adapter, "--defense", defense,
                  "--max-new-tokens", max_new_tokens, *SAMPLING, "--json", *extra)
    assert result.code == 0, result.stderr
    (record,) = result.records()
    return record


def test_without_the_signal_the_answer_runs_to_the_end(model, adapter, casa):
    plain = run(casa, model, adapter)
    assert "monitor" not in plain and plain["new_tokens"] == NEW_TOKENS  # precondition: no early end
    watched = run(casa, model, adapter, "--monitor")
    assert watched["text"] == plain["text"] and watched["new_tokens"] == NEW_TOKENS
    monitor = watched["monitor"]
    assert monitor["stopped_at"] is None and monitor["checks"] == NEW_TOKENS
    assert type(monitor["p_unsafe_max"]) is float and 0.0 <= monitor["p_unsafe_max"] < 0.5
    assert type(monitor["checks"]) is int


@pytest.mark.parametrize("defense", ["none", "casa", "coca", "prompt"])
def test_the_planted_token_is_flagged_and_refused(defense, model, adapter, casa, plant):
    plant(START)
    record = run(casa, model, adapter, "--monitor", defense=defense)
    monitor = record["monitor"]
    assert monitor["stopped_at"] == START and type(monitor["stopped_at"]) is int
    assert monitor["checks"] == START + 1 and monitor["p_unsafe_max"] >= 0.5
    assert record["text"] == REFUSAL and record["new_tokens"] == 0
    if defense == "casa":  # the prompt's own verdict came first, and passed
        assert record["verdict"] == "safe" and record["refused"] is True


def test_a_prompt_refused_by_casa_is_never_decoded(model, adapter, casa):
    record = run(casa, model, adapter, "--monitor", "--threshold", 0.0, defense="casa")
    assert record["verdict"] == "unsafe" and record["text"] == REFUSAL
    assert record["monitor"] == {"stopped_at": None, "p_unsafe_max": None, "checks": 0}


def test_cut_keeps_exactly_the_tokens_before_the_flag(model, adapter, casa, plant):
    before = run(casa, model, adapter, max_new_tokens=START)  # unmonitored: token START never fed
    plant(START)
    cut = run(casa, model, adapter, "--monitor", "--on-flag", "cut")
    assert cut["monitor"]["stopped_at"] == START
    assert cut["new_tokens"] == START and cut["text"] == before["text"]


def test_checks_are_spaced_and_the_end_is_checked(model, adapter, casa, plant):
    every_3 = run(casa, model, adapter, "--monitor", "--monitor-every", 3)["monitor"]
    assert every_3["stopped_at"] is None and every_3["checks"] == NEW_TOKENS // 3
    every_5 = run(casa, model, adapter, "--monitor", "--monitor-every", 5)["monitor"]
    assert every_5["checks"] == math.ceil(NEW_TOKENS / 5)  # tokens 4, 9 and the last, 11
    plant(START)
    flagged = run(casa, model, adapter, "--monitor", "--monitor-every", 3)["monitor"]
    assert flagged["stopped_at"] == 5 and flagged["checks"] == 2  # checks after tokens 2 and 5


def test_a_flag_at_the_end_check_cuts_a_token_already_kept(model, adapter, casa, plant):
    """With every 5, the last token (11) is checked only at the answer's end."""
    before = run(casa, model, adapter, max_new_tokens=NEW_TOKENS - 1)
    plant(NEW_TOKENS - 1)
    cut = run(casa, model, adapter, "--monitor", "--monitor-every", 5, "--on-flag", "cut")
    assert cut["monitor"] == {"stopped_at": NEW_TOKENS - 1, "checks": 3,
                              "p_unsafe_max": cut["monitor"]["p_unsafe_max"]}
    assert cut["text"] == before["text"] and cut["new_tokens"] == NEW_TOKENS - 1


def test_the_threshold_option_replaces_the_adapters(model, adapter, casa):
    """Unplanted, p_unsafe stays far below the adapter's 0.5; a threshold of 0 stops at once."""
    stopped = run(casa, model, adapter, "--monitor", "--monitor-threshold", 0.0)
    assert stopped["monitor"]["stopped_at"] == 0 and stopped["monitor"]["checks"] == 1
    assert stopped["text"] == REFUSAL


def test_a_score_that_is_not_finite_fails_closed(model, adapter, casa, plant):
    plant(START, value=float("nan"))
    result = casa("generate", PROMPT, "--model", model, "--adapter", adapter, "--defense", "none",
                  "--max-new-tokens", NEW_TOKENS, "--monitor", "--json")
    assert result.code == 4
    (record,) = result.records()
    assert "cannot judge" in record["error"] and "text" not in record


def test_a_streamed_answer_stopped_is_said_on_stderr(model, adapter, casa, plant, monkeypatch):
    """On a terminal the text is shown as it is written; the stop must be said, not hidden."""
    monkeypatch.setattr(generate_command, "sys", SimpleNamespace(stdout=SimpleNamespace(isatty=lambda: True)))
    before = run(casa, model, adapter, max_new_tokens=START)
    plant(START)
    common = ["generate", PROMPT, "--model", model, "--adapter", adapter, "--defense", "none",
              "--max-new-tokens", NEW_TOKENS, *SAMPLING, "--monitor"]
    cut = casa(*common, "--on-flag", "cut")
    assert cut.code == 0, cut.stderr
    assert cut.stdout == before["text"] + "\n"  # the flagged token never reached the screen
    assert "stopped by the response monitor at token 4" in cut.stderr
    refused = casa(*common)
    assert "text above is withdrawn" in refused.stderr and REFUSAL in refused.stderr
    assert REFUSAL not in refused.stdout


@pytest.mark.parametrize("args", [["--monitor-every", 0], ["--monitor-threshold", "nan"],
                                  ["--monitor-threshold", 1.5], ["--on-flag", "later"],
                                  ["--on-flag", "cut"]])
def test_bad_monitor_options_are_usage_errors(args, casa):
    extra = [] if args == ["--on-flag", "cut"] else ["--monitor"]  # cut alone: needs --monitor
    result = casa("generate", "hi", *extra, *args)
    assert result.code == 2 and args[0] in result.stderr


@pytest.mark.parametrize("layer", [None, 1])
def test_every_step_equals_the_head_over_the_whole_sequence(layer, model, monkeypatch):
    """The monitor's p_unsafe after each token against SafetyHead.forward recomputed over
    prompt + answer states; the states it was given against a full prefill of the prompt
    and answer (no KV cache), at the head's layer through the final norm."""
    casa = casa_cli.load(model)
    casa.config.layer = layer
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in (casa.head.Q, casa.head.V):
            param.copy_(torch.randn(param.shape, generator=generator))
    steps = []
    step = SafetyHead.step

    def recording(self, state, h, valid=None):
        state, out = step(self, state, h, valid)
        steps.append((h.clone(), float(out.p_unsafe[0])))
        return state, out
    monkeypatch.setattr(SafetyHead, "step", recording)

    sample = casa_cli.prompt_sample(PROMPT)
    answer = casa.generate(sample, defense="none", monitor=MonitorOptions(threshold=1.0),
                           options=DecodeOptions(max_new_tokens=NEW_TOKENS, temperature=1.0, seed=3))
    assert answer.monitor["stopped_at"] is None and len(steps) == len(answer.tokens) == NEW_TOKENS

    backbone = casa.backbone
    batch = backbone.encode([sample], reserve=NEW_TOKENS + 1)
    prompt = backbone.prefill(batch, layer=layer).H[0]
    answered = torch.cat([h for h, _ in steps])
    for i, (_, p_unsafe) in enumerate(steps):
        states = torch.cat([prompt, answered[:i + 1]])[None]
        with torch.no_grad():
            full = casa.head(states, torch.ones(states.shape[:2], dtype=torch.bool), backend="torch")
        assert p_unsafe == pytest.approx(float(full.p_unsafe[0]), abs=1e-5)

    ids = torch.cat([batch["input_ids"], torch.tensor([answer.tokens])], dim=1)
    whole = backbone.prefill({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, layer=layer)
    torch.testing.assert_close(answered, whole.H[0, prompt.shape[0]:], rtol=1e-4, atol=1e-4)
