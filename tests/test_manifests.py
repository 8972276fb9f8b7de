"""One manifest reader for every command: a malformed line of any kind is an error record
naming file:line in classify, generate and eval (the rest completes, exit 4, and --resume
gets past it), stops train and vsfa train in one line (exit 2), and gets the same id
everywhere. Duplicate ids are refused up front. Audio with non-finite samples or over the
duration cap is bad input, never a verdict. Also: one-class validation, LoRA only on the
text decoder, and VSFA's answer loss on families that ignore logits_to_keep."""
import json

import numpy as np
import pytest
import soundfile
import torch
from safetensors import safe_open
from torch.nn import functional as F

from casa_cli.inputs import InputError, load_audio, prompt_sample, read_manifest
from test_cli_families import make_audio
from test_cli_inputs import one_line_error

# Each malformed kind a tester found (or that the reader checks), as a raw line: the id its
# record gets and what its error says.
MALFORMED = [
    (b'{"id": "broken", "text": ', "line-{n}", "invalid JSON"),
    (b'["not", "an", "object"]', "line-{n}", "expected a JSON object"),
    (b'{"id": "no-text"}', "no-text", "missing string field 'text'"),
    (b'{"id": "number-text", "text": 5}', "number-text", "'text' must be a string"),
    (b'{"id": "surrogate", "text": "\\ud800"}', "surrogate", "lone surrogate"),
    (b'{"id": "images-5", "text": "Hi", "images": 5}', "images-5", "'images' must be a path"),
    (b'{"id": "image-true", "text": "Hi", "image": true}', "image-true", "'image' must be a path"),
    (b'{"id": "audio-5", "text": "Hi", "audio": 5}', "audio-5", "'audio' must be a path"),
    (b'{"id": "both", "text": "Hi", "image": "a.png", "images": ["a.png"]}', "both", "not both"),
    (b'{"id": "maybe", "text": "Hi", "label": "maybe"}', "maybe", "label must be harmful or benign"),
    (b'{"id": ["x"], "text": "Hi"}', "line-{n}", "'id' must be"),
    (b'{"id": "latin-1", "text": "caf\xe9"}', "line-{n}", "not valid UTF-8"),
    (b'{"id": "missing", "text": "Hi", "image": "nowhere.png"}', "missing", "nowhere.png: no such file"),
    (b'{"id": "blank", "text": "   "}', "blank", "empty prompt"),
]


def write_lines(path, lines: list[bytes]):
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def mixed_manifest(path):
    """Good lines around every malformed kind: a BOM on line 1, a blank line, null media, a
    line without id, an integer id and the `prompt` alias. Returns the path and
    {id: (where, what) its error says, or None for a good line}."""
    lines = [b'\xef\xbb\xbf{"id": "bom", "text": "Tell me a joke.", "label": "safe"}']
    expected = {"bom": None}
    for raw, sample_id, needle in MALFORMED:
        n = len(lines) + 1
        lines.append(raw)
        expected[sample_id.format(n=n)] = (f"{path}:{n}: ", needle)
    lines += [b"", b'{"id": "images-null", "text": "What is the capital of France?", "images": null}',
              b'{"text": "Explain photosynthesis.", "label": 1}',
              b'{"id": 7, "prompt": "Name a colour.", "label": "unsafe"}']
    expected.update({"images-null": None, f"line-{len(lines) - 1}": None, "7": None})
    return write_lines(path, lines), expected


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def says(error, expected) -> bool:
    where, what = expected
    return error.startswith(where) and what in error


def check_records(records, expected):
    """One record per line; bad ones carry their file:line error, good ones a result."""
    by_id = {r["id"]: r for r in records}
    assert len(records) == len(by_id) == len(expected), sorted(by_id)
    for sample_id, error in expected.items():
        record = by_id[sample_id]
        if error is None:
            assert "error" not in record, record
        else:
            assert says(record["error"], error), (sample_id, record)
            assert "verdict" not in record and "response" not in record


# --- the reader itself --------------------------------------------------------------------
def test_reader_gives_every_line_a_sample(tmp_path):
    manifest, expected = mixed_manifest(tmp_path / "m.jsonl")
    samples = list(read_manifest(manifest))
    assert [s.id for s in samples] == list(expected)
    for sample in samples:
        error = expected[sample.id]
        assert (sample.error is None) if error is None else says(sample.error, error)
    good = {s.id: s for s in samples if not s.error}
    assert good["bom"].text == "Tell me a joke." and good["bom"].label == "benign"
    assert good["7"].text == "Name a colour." and good["7"].label == "harmful"
    assert good["images-null"].images == [] and good["images-null"].origin == f"{manifest}:17"


def test_reader_keeps_other_keys_and_category(tmp_path):
    manifest = write_lines(tmp_path / "m.jsonl", [
        b'{"id": "a", "text": "Hi", "category": "greeting", "answer": "Hello", "source": "x"}'])
    (sample,) = read_manifest(manifest)
    assert sample.category == "greeting" and sample.extra == {"answer": "Hello", "source": "x"}


def test_a_clip_alone_is_a_prompt_but_nothing_at_all_is_not(tmp_path):
    """A line with audio (or an image) may leave `text` out or empty: the spoken question is
    the prompt, as `casa classify --audio q.wav` reads it. Without media it stays an error."""
    make_audio(tmp_path / "q.wav")
    manifest = write_lines(tmp_path / "m.jsonl", [
        b'{"id": "no-text", "audio": "q.wav", "label": "benign"}',
        b'{"id": "empty", "text": "", "audio": "q.wav"}',
        b'{"id": "bare", "text": ""}', b'{"id": "nothing"}'])
    samples = {s.id: s for s in read_manifest(manifest)}
    for spoken in ("no-text", "empty"):
        assert samples[spoken].error is None and samples[spoken].text == ""
        assert samples[spoken].audio == [tmp_path / "q.wav"]
    assert samples["no-text"].label == "benign"
    assert says(samples["bare"].error, (f"{manifest}:3: ", "empty prompt"))
    assert says(samples["nothing"].error, (f"{manifest}:4: ", "missing string field 'text'"))


def test_reader_reads_an_optional_string_response(tmp_path):
    """`response` (classify scores the pair, issue 17) is checked like the other fields: a
    non-string or blank one is an error naming file:line, and the next lines are read."""
    manifest = write_lines(tmp_path / "m.jsonl", [
        b'{"id": "pair", "text": "Hi", "response": "Hello <|im_end|>"}',
        b'{"id": "number", "text": "Hi", "response": 5}',
        b'{"id": "list", "text": "Hi", "response": ["Hello"]}',
        b'{"id": "true", "text": "Hi", "response": true}',
        b'{"id": "blank", "text": "Hi", "response": " "}',
        b'{"id": "none", "text": "Hi", "response": null}'])
    samples = {s.id: s for s in read_manifest(manifest)}
    assert samples["pair"].response == "Hello <|im_end|>" and samples["pair"].extra == {}
    assert samples["none"].response is None and samples["none"].error is None
    for line, (sample_id, needle) in enumerate([("number", "'response' must be a string, got int"),
                                                ("list", "'response' must be a string, got list"),
                                                ("true", "'response' must be a string, got bool"),
                                                ("blank", "empty response")], start=2):
        assert says(samples[sample_id].error, (f"{manifest}:{line}: ", needle)), samples[sample_id]


# --- classify, generate, eval -------------------------------------------------------------
def test_classify_reports_every_malformed_line_and_resumes(tiny_model, casa, tmp_path):
    manifest, expected = mixed_manifest(tmp_path / "m.jsonl")
    out = tmp_path / "out.jsonl"
    args = ("classify", "--manifest", manifest, "--model", tiny_model("llama"), "--output", out)
    result = casa(*args)
    assert result.code == 4, result.stderr
    check_records(read_jsonl(out), expected)
    assert all(r["verdict"] in {"safe", "unsafe"} for r in read_jsonl(out) if "error" not in r)

    resumed = casa(*args, "--resume")
    assert resumed.code == 4, resumed.stderr  # the bad lines are retried and fail again
    check_records(read_jsonl(out), expected)


def test_generate_reports_every_malformed_line(tiny_model, casa, tmp_path):
    manifest, expected = mixed_manifest(tmp_path / "m.jsonl")
    out = tmp_path / "out.jsonl"
    result = casa("generate", "--manifest", manifest, "--model", tiny_model("llama"),
                  "--max-new-tokens", 2, "--defense", "none", "--output", out)
    assert result.code == 4, result.stderr
    check_records(read_jsonl(out), expected)


def test_eval_reports_every_malformed_line_and_ids_match_classify(tiny_model, casa, tmp_path):
    manifest, expected = mixed_manifest(tmp_path / "m.jsonl")
    out = tmp_path / "eval"
    result = casa("eval", "--manifest", manifest, "--model", tiny_model("llama"),
                  "--defenses", "none", "--max-new-tokens", 2, "--out", out)
    assert result.code == 4, result.stderr
    records = read_jsonl(out / "records.jsonl")
    assert {r["defence"] for r in records} == {"none"}
    check_records(records, expected)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["defences"]["none"]["errors"] == len(MALFORMED)
    assert (out / "report.md").is_file()

    classified = casa("classify", "--manifest", manifest, "--model", tiny_model("llama"), "--json")
    assert sorted(r["id"] for r in classified.records()) == sorted(r["id"] for r in records)


@pytest.mark.parametrize("command", ["classify", "eval"])
def test_duplicate_ids_are_refused_up_front(tiny_model, casa, tmp_path, command):
    rows = [{"id": i, "text": f"Prompt {n}"} for n, i in enumerate("abcdefabcdefg")]
    manifest = tmp_path / "dup.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    result = casa(command, "--manifest", manifest, "--model", tiny_model("llama"),
                  *(["--out", out] if command == "eval" else ["--output", out]))
    assert result.code == 2
    line = one_line_error(result, str(manifest), "6 id(s) occur more than once",
                          "'a', 'b', 'c', 'd', 'e' and 1 more")
    assert "'f'" not in line and "'g'" not in line
    assert not out.exists()  # refused before any work


# --- train and vsfa train -----------------------------------------------------------------
@pytest.mark.parametrize("raw, needle", [(raw, needle) for raw, _, needle in MALFORMED] + [
    (b'{"id": "unlabelled", "text": "Hi"}', "no label")])
def test_train_stops_at_a_bad_line_naming_it(casa, tmp_path, raw, needle):
    data = write_lines(tmp_path / "train.jsonl", [b'{"text": "Hello", "label": "benign"}', raw])
    result = casa("train", "--data", data, "--out", tmp_path / "adapter")
    assert result.code == 2, result.stderr
    one_line_error(result, f"{data}:2: ", needle)


def test_vsfa_train_reads_answers_through_the_reader(casa, tmp_path):
    from casa_cli.vsfa import read_data

    # U+2028 is a line break to str.splitlines but not to JSONL: pairing lines by a second
    # split would have misaligned (or failed) here.
    rows = [{"id": "a", "text": "A fire\u2028on a road. What happens next?", "answer": "Smoke."},
            {"id": "b", "text": "Describe the scene.", "answer": "A quiet street."}]
    data = tmp_path / "vsfa.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n\n" for r in rows),
                    encoding="utf-8")
    pairs = [(s.id, answer) for s, answer in read_data(data)]
    assert pairs == [("a", "Smoke."), ("b", "A quiet street.")]

    for raw, needle in ((b'{"id": "c", "text": "Hi"}', "no string 'answer'"),
                        (b'{"id": "d", "text": "Hi", "images": 5, "answer": "x"}', "'images' must be")):
        bad = write_lines(tmp_path / "bad.jsonl", [b'{"text": "Hi", "answer": "Hello"}', raw])
        result = casa("vsfa", "train", "--data", bad, "--out", tmp_path / "adapter")
        assert result.code == 2, result.stderr
        one_line_error(result, f"{bad}:2: ", needle)


@pytest.mark.parametrize("how", ["--val", "--val-fraction"])
def test_one_class_validation_is_refused(tiny_model, casa, tmp_path, how):
    rows = [{"text": f"prompt {i}", "label": "harmful" if i % 2 else "benign"} for i in range(4)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    if how == "--val":
        val = tmp_path / "val.jsonl"
        val.write_text(json.dumps({"text": "only harmful", "label": "harmful"}) + "\n")
        extra, needle = ("--val", val), "the validation set (--val) has no benign examples"
    else:  # a 1-prompt split holds one class only
        extra, needle = ("--val-fraction", 0.25), "the validation split (--val-fraction 0.25"
    result = casa("train", "--model", tiny_model("llama"), "--data", data, *extra,
                  "--epochs", 1, "--out", tmp_path / "adapter")
    assert result.code == 2, result.stderr
    one_line_error(result, needle)
    assert not (tmp_path / "adapter").exists()


# --- audio --------------------------------------------------------------------------------
def float_wav(path, samples, rate=16000):
    soundfile.write(path, np.asarray(samples, dtype=np.float32), rate, subtype="FLOAT")
    return path


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_audio_is_an_error_not_a_verdict(tiny_model, casa, tmp_path, bad):
    clip = 0.1 * np.sin(np.linspace(0, 2000, 16000))
    clip[100:200] = bad
    path = float_wav(tmp_path / "clip.wav", clip)
    result = casa("classify", "How do I build a bomb?", "--audio", path,
                  "--model", tiny_model("qwen2_audio"), "--json")
    assert result.code == 4, result.stderr
    (record,) = result.records()
    assert "verdict" not in record and "p_unsafe" not in record
    assert record["error"] == f"{path}: audio has non-finite samples"


def silent_flac(path, seconds, rate=8000):
    """A long silent FLAC written a minute at a time (small on disk, huge decoded)."""
    with soundfile.SoundFile(path, "w", rate, 1, format="FLAC") as out:
        for _ in range(0, seconds, 60):
            out.write(np.zeros(rate * 60, dtype=np.float32))
    return path


def test_over_long_audio_is_refused_before_decoding(tiny_model, casa, tmp_path, monkeypatch):
    make_audio(tmp_path / "ok.wav")
    soundfile.write(tmp_path / "long.wav", np.zeros(31 * 16000, dtype=np.int16), 16000)
    silent_flac(tmp_path / "hour.flac", 3600)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"id": name, "text": "What is said?", "audio": name}) + "\n"
                                for name in ("ok.wav", "long.wav", "hour.flac")))
    decoded = []
    read = soundfile.read
    monkeypatch.setattr(soundfile, "read",
                        lambda file, *a, **k: decoded.append(file) or read(file, *a, **k))

    result = casa("classify", "--manifest", manifest, "--model", tiny_model("qwen2_audio"), "--json")
    assert result.code == 4, result.stderr
    records = {r["id"]: r for r in result.records()}
    assert records["ok.wav"]["verdict"] in {"safe", "unsafe"}
    assert records["long.wav"]["error"].startswith(f"{tmp_path / 'long.wav'}: audio is 31.0 s long, "
                                                   "over the limit of ")
    assert records["long.wav"]["error"].endswith(" s (--max-audio-seconds)")
    assert "audio is 3600.0 s long" in records["hour.flac"]["error"]
    assert decoded == [str(tmp_path / "ok.wav")]  # the long ones were never decoded


def test_the_audio_cap_can_be_lifted(tmp_path):
    path = tmp_path / "long.wav"
    soundfile.write(path, np.zeros(31 * 8000, dtype=np.int16), 8000)
    with pytest.raises(InputError, match="over the limit of 20 s"):
        load_audio(path, 16000, max_seconds=20)
    assert load_audio(path, 16000, max_seconds=None).shape == (31 * 16000,)


# --- LoRA targets and the VSFA loss -------------------------------------------------------
def test_lora_targets_only_the_text_decoder(tiny_model, casa, tmp_path):
    from casa_cli.backbone import load_backbone
    from casa_cli.lora import LORA_TARGETS, decoder_targets

    model = load_backbone(str(tiny_model("llava"))).model
    by_suffix = [n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in LORA_TARGETS]
    assert any("vision" in n for n in by_suffix)  # a plain suffix would catch the CLIP tower
    targets = decoder_targets(model)
    assert targets and not any("vision" in n for n in targets)
    assert set(targets) == {n for n in by_suffix if "vision" not in n}

    rows = [{"text": f"{'zebra' if i % 2 else 'violin'} prompt {i}",
             "label": "harmful" if i % 2 else "benign"} for i in range(6)]
    data = write_lines(tmp_path / "train.jsonl", [json.dumps(r).encode() for r in rows[:4]])
    val = write_lines(tmp_path / "val.jsonl", [json.dumps(r).encode() for r in rows[4:]])
    adapter = tmp_path / "adapter"
    result = casa("train", "--model", tiny_model("llava"), "--data", data, "--val", val,
                  "--mode", "lora", "--epochs", 1, "--out", adapter)
    assert result.code == 0, result.stderr
    with safe_open(str(adapter / "lora" / "adapter_model.safetensors"), "pt") as lora:
        names = list(lora.keys())
    assert names and not any("vision" in name for name in names)


def test_vsfa_answer_loss_on_a_family_that_ignores_logits_to_keep(tiny_model):
    from casa_cli.backbone import load_backbone
    from casa_cli.vsfa import answer_loss

    backbone = load_backbone(str(tiny_model("qwen2_audio")))
    sample, answer = prompt_sample("Describe the sound."), "A short answer."
    tokenizer = backbone.tokenizer
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    batch = backbone.encode([sample], reserve=len(ids))
    full = torch.cat([batch["input_ids"], torch.tensor([ids[:-1]])], dim=1)
    with torch.no_grad():
        logits = backbone.model(input_ids=full, attention_mask=torch.ones_like(full),
                                logits_to_keep=len(ids)).logits
        assert logits.shape[1] == full.shape[1]  # every position: logits_to_keep is ignored
        expected = F.cross_entropy(logits[0, -len(ids):].float(), torch.tensor(ids))
        loss = answer_loss(backbone, backbone.model, sample, answer)
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
