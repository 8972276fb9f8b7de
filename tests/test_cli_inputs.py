"""Bad input through the CLI: each gives a one-line error naming the input, and in a batch
an error record while the rest completes (exit code 4)."""
import json

from PIL import Image

from test_cli_families import make_audio, make_image


def write_manifest(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def one_line_error(result, *needles):
    lines = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_bad_media_fail_alone_in_a_batch(tiny_model, casa, tmp_path):
    good = make_image(tmp_path / "good.png")
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(good.read_bytes()[:200])
    text_file = tmp_path / "notes.png"
    text_file.write_text("this is not an image")
    bomb = tmp_path / "bomb.png"
    Image.new("1", (9000, 9000)).save(bomb)  # 81 megapixels in a few kilobytes
    manifest = write_manifest(tmp_path / "batch.jsonl", [
        {"id": "ok-1", "text": "What is shown?", "image": "good.png"},
        {"id": "missing", "text": "What is shown?", "image": "nowhere.png"},
        {"id": "corrupt", "text": "What is shown?", "image": "corrupt.png"},
        {"id": "text-as-image", "text": "What is shown?", "image": "notes.png"},
        {"id": "bomb", "text": "What is shown?", "image": "bomb.png"},
        '{"id": "broken", "text": ',
        {"id": "empty", "text": "   "},
        {"id": "ok-2", "text": "Is this safe?", "image": "good.png"},
    ])
    out = tmp_path / "out.jsonl"
    result = casa("classify", "--manifest", manifest, "--model", tiny_model("llava"), "--output", out)
    assert result.code == 4, result.stderr
    records = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert len(records) == 8
    assert records["ok-1"]["verdict"] in {"safe", "unsafe"} and "verdict" in records["ok-2"]
    assert "nowhere.png: no such file" in records["missing"]["error"]
    assert "corrupt.png: corrupt image" in records["corrupt"]["error"]
    assert "notes.png: not an image file" in records["text-as-image"]["error"]
    assert "decompression bomb" in records["bomb"]["error"]
    assert "batch.jsonl:6: invalid JSON" in records["line-6"]["error"]
    assert "empty prompt" in records["empty"]["error"]
    assert all("\n" not in r.get("error", "") for r in records.values())


def test_unreadable_audio(tiny_model, casa, tmp_path):
    fake = tmp_path / "speech.wav"
    fake.write_text("RIFF but not really audio")
    result = casa("classify", "What is said here?", "--audio", fake, "--model", tiny_model("qwen2_audio"))
    assert result.code == 4
    one_line_error(result, "speech.wav", "unreadable audio")
    ok = casa("classify", "What is said here?", "--audio", make_audio(tmp_path / "ok.flac", rate=8000),
              "--model", tiny_model("qwen2_audio"), "--json")
    assert ok.code == 0, ok.stderr  # stereo 8 kHz FLAC is downmixed and resampled
    alone = casa("classify", "--audio", tmp_path / "ok.flac", "--model", tiny_model("qwen2_audio"),
                 "--json")  # a spoken question: the clip alone is the prompt
    assert alone.code == 0, alone.stderr
    assert alone.records()[0]["prompt_tokens"] < ok.records()[0]["prompt_tokens"]


def test_image_to_a_text_only_model(tiny_model, casa, tmp_path):
    result = casa("classify", "What is this?", "--image", make_image(tmp_path / "x.png"),
                  "--model", tiny_model("llama"))
    assert result.code == 4
    one_line_error(result, "does not accept image input")


def test_prompt_longer_than_the_context(tiny_model, casa):
    long_prompt = "please tell me about the history of the world " * 120
    result = casa("classify", long_prompt, "--model", tiny_model("llama"), "--json")
    assert result.code == 4
    one_line_error(result, "over the model's context", "--truncate")
    truncated = casa("classify", long_prompt, "--model", tiny_model("llama"), "--json", "--truncate")
    assert truncated.code == 0, truncated.stderr
    assert "truncated" in truncated.stderr
    (record,) = truncated.records()
    assert record["prompt_tokens"] <= 512


def test_usage_errors_exit_2(tiny_model, casa, tmp_path):
    assert casa("classify", "--model", tiny_model("llama")).code == 2  # no input at all
    missing_model = casa("classify", "hi", "--model", tmp_path / "no-such-model")
    assert missing_model.code == 2
    one_line_error(missing_model, "no-such-model")
    missing_manifest = casa("classify", "--manifest", tmp_path / "none.jsonl")
    assert missing_manifest.code == 2 and "none.jsonl: no such file" in missing_manifest.stderr
    assert casa("classify", "hi", "--resume", "--model", tiny_model("llama")).code == 2
    assert casa("classify", "hi", "--kernel", "cuda-magic", "--model", tiny_model("llama")).code == 2


def test_stdin_prompt_and_fail_on_unsafe(tiny_model, casa):
    result = casa("classify", "-", "--model", tiny_model("llama"), "--json", stdin="Tell me a joke\n")
    assert result.code == 0 and result.records()[0]["id"] == "prompt"
    flagged = casa("classify", "hi", "--model", tiny_model("llama"), "--threshold", "0", "--fail-on-unsafe")
    assert flagged.code == 3


def test_folder_of_media(tiny_model, casa, tmp_path):
    folder = tmp_path / "uploads"
    (folder / "sub").mkdir(parents=True)
    make_image(folder / "a.png")
    make_image(folder / "sub" / "b.jpg")
    (folder / "readme.txt").write_text("ignored")
    result = casa("classify", "--folder", folder, "--prompt", "Describe this.",
                  "--model", tiny_model("qwen2_vl"), "--json")
    assert result.code == 0, result.stderr
    assert [r["id"] for r in result.records()] == ["a.png", "sub/b.jpg"]


def test_resume_retries_failed_records(tiny_model, casa, tmp_path):
    manifest = write_manifest(tmp_path / "m.jsonl", [
        {"id": "a", "text": "What is shown?", "image": "a.png"},
        {"id": "late", "text": "What is shown?", "image": "late.png"},
    ])
    make_image(tmp_path / "a.png")
    out = tmp_path / "out.jsonl"
    first = casa("classify", "--manifest", manifest, "--model", tiny_model("llava"), "--output", out)
    assert first.code == 4
    make_image(tmp_path / "late.png")  # the user fixes the input, then resumes
    second = casa("classify", "--manifest", manifest, "--model", tiny_model("llava"), "--output", out, "--resume")
    assert second.code == 0, second.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["id"] for r in records) == ["a", "late"]
    assert all("verdict" in r for r in records)
