"""The five library front doors, without the CLI, on tiny random-weight models:
`casa_cli.train` -> Adapter -> `casa_cli.load` -> `Casa.classify` / `Casa.generate`, and
`casa_cli.evaluate` -> Report (resumable, FigStep refused on a text-only model, a response
monitor that cuts answers)."""
import json

import pytest

import casa_cli
from casa_cli.evaluation import NotAnImageModel
from casa_cli.judges import is_refusal
from casa_cli.monitor import MonitorOptions
from test_adapter_training import separable_manifest
from test_cli_inputs import write_manifest
from test_eval import PROMPTS
from test_monitor import START, adapter, model, plant  # noqa: F401 (fixtures)

FAST = casa_cli.DecodeOptions(max_new_tokens=3)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """A private CASA_CACHE_DIR: training caches each prompt's hidden states there."""
    monkeypatch.setenv("CASA_CACHE_DIR", str(tmp_path / "cache"))


def test_train_gives_an_adapter_that_saves_loads_classifies_and_generates(tiny_model, tmp_path):
    model = str(tiny_model("llama"))
    train = separable_manifest(tmp_path / "train.jsonl", n=16)
    val = separable_manifest(tmp_path / "val.jsonl", n=8, seed=1)
    heldout = separable_manifest(tmp_path / "heldout.jsonl", n=8, seed=2)
    adapter = casa_cli.train(model, [train], [val], [heldout],
                             options=casa_cli.TrainOptions(epochs=2, layer=None))
    assert isinstance(adapter, casa_cli.Adapter) and adapter.lora_model is None
    assert adapter.config.trained and set(adapter.config.metrics) == {"validation", "heldout"}
    assert adapter.config.training["data"] == {"source": "files", "data": [str(train)],
                                               "val": [str(val)], "heldout": [str(heldout)]}

    saved = adapter.save(tmp_path / "adapter")
    assert json.loads((saved / "casa_config.json").read_text())["threshold"] == adapter.config.threshold
    casa = casa_cli.load(model, adapter=saved)
    assert casa.trained and casa.config.threshold == adapter.config.threshold

    (record,) = casa.classify([casa_cli.prompt_sample("zebra zebra river stone")])
    assert record["verdict"] in ("safe", "unsafe") and 0 <= record["p_unsafe"] <= 1

    answer = casa.generate("zebra zebra river stone", defense="casa", options=FAST)
    assert answer.verdict in ("safe", "unsafe") and isinstance(answer.text, str)
    records = list(casa.generate([casa_cli.prompt_sample("hello", sample_id="a")], "none",
                                 options=FAST))
    assert [(r["id"], r["defence"]) for r in records] == [("a", "none")]  # eval's spelling


def test_train_refuses_unlabelled_data_before_loading_a_model(tmp_path):
    data = write_manifest(tmp_path / "data.jsonl", [{"id": "x", "text": "hello"}])
    with pytest.raises(casa_cli.InputError, match="no label"):
        casa_cli.train("no/such/model", [data])


def test_evaluate_reports_each_defence_and_resumes(tiny_model, tmp_path):
    model, out = str(tiny_model("llama")), tmp_path / "eval"
    manifest = write_manifest(tmp_path / "prompts.jsonl", PROMPTS)
    seen, loaded = [], []
    report = casa_cli.evaluate(out, model, manifest=manifest, defences=["none", "casa"],
                               max_new_tokens=3, on_loaded=loaded.append, on_result=seen.append)
    assert isinstance(report, casa_cli.Report) and len(loaded) == 1 and not loaded[0].trained
    assert (report.results, report.failed, len(seen)) == (8, 0, 8)
    assert list(report.metrics["defences"]) == ["none", "casa"]
    assert "auroc" in report.metrics["defences"]["casa"]
    written = json.loads(report.paths["metrics"].read_text())  # NaN written as null
    assert written["prompts"] == report.metrics["prompts"] == 4 and list(written["defences"]) == ["none", "casa"]
    assert all(report.paths[name].is_file() for name in ("records", "markdown", "roc", "tradeoff"))

    seen.clear()
    resumed = casa_cli.evaluate(out, model, manifest=manifest, defences=["none", "casa", "prompt"],
                                max_new_tokens=3, resume=True, on_result=seen.append)
    assert {r["defence"] for r in seen} == {"prompt"} and len(seen) == 4  # only the new pairs
    assert resumed.results == 12 and set(resumed.metrics["defences"]) == {"none", "casa", "prompt"}


def test_evaluate_with_a_monitor_that_cuts_judges_what_is_left(model, adapter, plant, tmp_path):
    """A cut answer is not replaced by the refusal text: the judge reads the tokens kept."""
    plant(START)
    manifest = write_manifest(tmp_path / "prompts.jsonl", PROMPTS)
    report = casa_cli.evaluate(tmp_path / "eval", model, adapter, manifest=manifest,
                               defences=["none"], max_new_tokens=START + 4,
                               monitor=MonitorOptions(on_flag="cut"))
    records = [json.loads(line) for line in report.paths["records"].read_text().splitlines()]
    assert records[0]["monitor"]["stopped_at"] == START == records[0]["new_tokens"]
    assert all(r["refused"] == is_refusal(r["response"]) for r in records)
    assert report.metrics["monitor"]["on_flag"] == "cut"
    assert report.metrics["defences"]["none"]["monitor_stops"] == len(PROMPTS)


def test_evaluate_refuses_bad_requests(tiny_model, tmp_path):
    manifest = write_manifest(tmp_path / "prompts.jsonl", PROMPTS[:1])
    with pytest.raises(casa_cli.InputError, match="unknown defence 'shield'"):
        casa_cli.evaluate(tmp_path / "out", manifest=manifest, defences=["none", "shield"])
    with pytest.raises(NotAnImageModel, match="takes no images"):
        casa_cli.evaluate(tmp_path / "out", str(tiny_model("llama")), manifest=manifest,
                          render="figstep", max_new_tokens=3)


def test_recorded_paths_name_no_machine_folders(tmp_path):
    """Adapter metadata and results record files in casa's cache from $CASA_CACHE_DIR and
    casa's own files relative to its install; anything else as the user gave it."""
    from casa_cli.cache import portable_path
    from casa_cli.pipeline import default_adapter_dir
    cached = tmp_path / "cache" / "data" / "v1" / "train.jsonl"
    assert portable_path(cached) == "$CASA_CACHE_DIR/data/v1/train.jsonl"
    assert portable_path(default_adapter_dir()) == "casa_cli/adapters/smollm2-135m-instruct"
    assert portable_path(tmp_path / "mine.jsonl") == str(tmp_path / "mine.jsonl")
