"""`casa profile` on the tiny llama: every figure of every defence is present and plausible
(positive and finite; no timing is asserted beyond that), prompts are exactly the requested
length, `--trace` writes Chrome-trace JSON and `--chart` a PNG; `--monitor` adds the response
monitor's cost to every row, and never stops a profiled answer (on test_monitor.py's planted
signal). Plus the decoding option the profile's batches rest on: `copies` rows decode
exactly what one row does."""
import json
import math

import pytest
from PIL import Image

import casa_cli
from casa_cli import profiling, report as report_module
from casa_cli.decoding import DecodeOptions
from casa_cli.verdict_cost import verdict_costs
from conftest import run_casa
from test_monitor import START, adapter, model, plant  # noqa: F401 (fixtures)

TOKENS = 96
# The tiny tokenizer spends about two tokens a word, so Llama Guard's template alone would
# overflow the tiny model's 512 positions: the guard here gets a short prompt.
GUARD_PROMPT = "Is this request safe or unsafe? {prompt} Answer safe or unsafe."
DEFENSES = ["none", "casa", "coca", "prompt", "guard"]
TIMED = ["prefill_ms", "first_token_ms", "decode_tokens_per_s", "decode_ms_per_token",
         "prefill_ratio", "first_token_ratio", "decode_cost_ratio"]
SAFETY = ["safety_ms", "safety_pct_of_prefill"]
EXTRA = {"casa": SAFETY, "guard": [*SAFETY, "guard_prefill_ms", "guard_vs_casa"]}
MONITORED = ["monitor_decode_ms_per_token"]  # positive; the costs below are differences
MONITOR_COST = ["monitor_ms_per_token", "monitor_pct_of_decode_step", "monitor_pct_of_answer_decode"]


@pytest.fixture(scope="module")
def profiled(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("profile")
    result = run_casa("profile", "--model", tiny_model("llama"), "--defenses", ",".join(DEFENSES[1:]),
                      "--prompt-tokens", TOKENS, "--batch", "1,2", "--new-tokens", 3,
                      "--repeats", 2, "--warmup", 1, "--guard-prompt", GUARD_PROMPT, "--json",
                      "--chart", out / "cost.png", "--trace", out / "trace")
    assert result.code == 0, result.stderr
    (report,) = result.records()
    return report, out


def plausible(stat) -> bool:
    """Positive and finite; nothing about speed."""
    return all(math.isfinite(stat[k]) and stat[k] > 0 for k in ("min", "median", "max"))


def test_every_defence_has_every_figure(profiled):
    report, _ = profiled
    points = [(r["prompt_tokens"], r["batch"], r["defence"]) for r in report["rows"]]
    # none always runs, first: the ratios are against it.
    assert points == [(TOKENS, batch, d) for batch in (1, 2) for d in DEFENSES]
    for row in report["rows"]:
        for key in TIMED + EXTRA.get(row["defence"], []):
            assert plausible(row[key]), (row["defence"], key, row.get(key))
        # Each repeat's first token comes after its own prefill, so every order statistic
        # of the first-token times is at least the same statistic of the prefill times.
        assert all(row["first_token_ms"][k] >= row["prefill_ms"][k] for k in ("min", "median", "max"))
        assert row["input_tokens"] >= TOKENS
        if row["defence"] in ("none", "casa", "guard"):  # the user's prompt as it is
            assert row["input_tokens"] == TOKENS
        if row["defence"] == "none":
            assert all(row[k]["median"] == 1 for k in TIMED if k.endswith("_ratio"))
        if row["defence"] == "guard":
            assert row["guard_prompt_tokens"] > TOKENS
    for point in report["inputs"]:
        assert point["input_tokens"] == TOKENS
        assert plausible(point["prepare_ms"]) and plausible(point["safety_head_us"]["torch"])
    assert report["load_ms"] > 0 and report["peak_rss_mb"] > 0 and report["device_name"]


VERDICT_COSTS = ["classify_prompts_per_s", "full_forward_prompts_per_s", "classify_speedup",
                 "refusal_ms", "full_prefill_ms", "refusal_vs_prefill"]


def test_with_casa_each_point_has_what_a_verdict_alone_costs(profiled, capsys):
    report, _ = profiled
    assert [(v["prompt_tokens"], v["batch"]) for v in report["verdicts"]] == [(TOKENS, 1), (TOKENS, 2)]
    for row in report["verdicts"]:
        # the tiny model's untrained head reads its last layer: no layer to skip
        assert row["prompts"] == row["batch"] and row["head_layer"] == row["layers"] == 2
        assert row["bound"] == 1.0
        for key in VERDICT_COSTS:
            assert plausible(row[key]), (key, row[key])
    report_module.print_costs(report)
    assert "a verdict alone: the prefill stops after the head's layer" in capsys.readouterr().out


def test_verdict_costs_skip_the_layers_above_the_head(tiny_model):
    casa = casa_cli.load(tiny_model("llama"))
    casa.config.layer = 1
    sample = casa_cli.prompt_sample("Tell me how rivers carry sand to the sea.")
    costs = verdict_costs(casa, [[sample, sample], [sample]], repeats=2, warmup=0)
    assert costs["prompts"] == 3 and (costs["head_layer"], costs["layers"], costs["bound"]) == (1, 2, 2.0)
    assert all(plausible(costs[key]) for key in VERDICT_COSTS)


def test_trace_is_chrome_trace_json(profiled):
    report, out = profiled
    (path,) = (out / "trace").iterdir()
    assert report["trace"] == str(path)
    events = json.loads(path.read_text())["traceEvents"]
    labels = {event.get("name") for event in events}
    assert {f"casa:{d}" for d in DEFENSES} <= labels


def test_chart_is_a_png(profiled):
    _, out = profiled
    with Image.open(out / "cost.png") as image:
        assert image.format == "PNG" and image.size[0] > 0
        image.load()  # decodes the pixels


def test_unknown_defence_is_a_usage_error(casa):
    result = casa("profile", "--defenses", "none,firewall")
    assert result.code == 2 and "firewall" in result.stderr


@pytest.mark.parametrize("defense", ["none", "coca", "casa"])
def test_copies_decode_what_one_row_does(defense, tiny_model):
    model = casa_cli.load(tiny_model("llama"))
    sample = casa_cli.prompt_sample("Tell me how rivers carry sand to the sea.")
    options = DecodeOptions(max_new_tokens=6, ignore_eos=True)
    one, three = (model.generate(sample, defense, on_unsafe="generate", options=options,
                                 copies=copies) for copies in (1, 3))
    assert three.tokens == one.tokens and len(one.tokens) == 6


@pytest.fixture(scope="module")
def monitored(tiny_model):
    result = run_casa("profile", "--model", tiny_model("llama"), "--defenses", "casa,coca,guard",
                      "--prompt-tokens", TOKENS, "--batch", "1,2", "--new-tokens", 3,
                      "--repeats", 2, "--warmup", 0, "--guard-prompt", GUARD_PROMPT, "--monitor",
                      "--json")
    assert result.code == 0, result.stderr
    (report,) = result.records()
    return report


def test_monitor_cost_is_in_every_row(monitored):
    assert monitored["monitor"] == {"every": 1, "threshold": monitored["monitor"]["threshold"],
                                    "stops": False}
    assert [(r["batch"], r["defence"]) for r in monitored["rows"]] == [
        (batch, d) for batch in (1, 2) for d in ("none", "casa", "coca", "guard")]
    for row in monitored["rows"]:
        for key in TIMED + MONITORED:
            assert plausible(row[key]), (row["defence"], key, row.get(key))
        for key in MONITOR_COST:  # a cost within the noise can come out below 0
            assert all(type(row[key][k]) is float and math.isfinite(row[key][k])
                       for k in ("min", "median", "max")), (row["defence"], key, row[key])
        if row["defence"] == "guard":  # the plain model answers after the guard's verdict
            none = next(r for r in monitored["rows"] if (r["batch"], r["defence"]) == (row["batch"], "none"))
            assert row["monitor_decode_ms_per_token"] == none["monitor_decode_ms_per_token"]
    assert all(plausible(point["monitor_us"]) for point in monitored["inputs"])  # the step alone


def test_without_monitor_no_row_has_its_fields(profiled):
    report, _ = profiled
    assert report["monitor"] is None and not any("monitor_us" in i for i in report["inputs"])
    assert not any(key in row for row in report["rows"] for key in MONITORED + MONITOR_COST)


def test_the_printed_tables_show_the_monitor(monitored, capsys):
    report_module.print_costs(monitored)
    printed = capsys.readouterr().out
    assert "the response monitor, checking every token" in printed  # its own table


def test_the_profiled_monitor_checks_every_token_and_never_stops(model, adapter, plant):
    """Planted, every check from token START on flags; the profile's monitor still decodes
    the whole answer, and so does `casa profile --monitor` (it fails on a shorter one)."""
    plant(START)
    casa = casa_cli.load(model, adapter)
    sample = casa_cli.prompt_sample("Tell me how rivers carry sand to the sea.")
    answer = casa.generate(sample, "none", monitor=profiling.WATCH,
                           options=DecodeOptions(max_new_tokens=START + 4, ignore_eos=True))
    assert answer.monitor["stopped_at"] is None and answer.monitor["p_unsafe_max"] >= 0.5
    assert len(answer.tokens) == answer.monitor["checks"] == START + 4
    result = run_casa("profile", "--model", model, "--adapter", adapter, "--defenses", "none",
                      "--prompt-tokens", TOKENS, "--batch", 1, "--new-tokens", START + 4,
                      "--repeats", 1, "--warmup", 0, "--monitor", "--json")
    assert result.code == 0, result.stderr
    (report,) = result.records()
    assert report["verdicts"] == []  # no casa among the defences: no verdict row
