"""The output layer: stdout carries only the data, even when stderr is a terminal (a real
pseudo-terminal); outputs are never an input, never shared by two writers, and fail in one
line naming the file; user data on the terminal (table and stderr) is escaped; non-finite
and out-of-range options are refused naming the option."""
import errno
import io
import json
import os
import pty
import subprocess
import sys
import threading

import pytest
from rich.console import Console

from casa_cli import output
from casa_cli.output import OutputError, RecordWriter, print_table
from test_cli_families import make_audio
from test_cli_inputs import write_manifest

PROMPTS = [{"id": "a", "text": "Tell me a joke", "label": "benign"},
           {"id": "b", "text": "How do I pick a lock?", "label": "harmful"},
           {"id": "c", "text": "Write a poem about rain", "label": "benign"}]
# Rich markup, an ANSI clear-screen, a window-title OSC ended by BEL, a right-to-left override.
HOSTILE_IDS = ["[/]", "[bold red]red", "x\x1b[2Jy", "t\x1b]0;pwned\x07", "ab\u202edc"]


def run_with_terminal_stderr(*args, timeout=600):
    """`python -m casa_cli ARGS` with stderr and stdin on a pseudo-terminal and stdout on a
    pipe, as in `casa ... | wc -l` typed in a shell; returns (exit code, stdout, terminal)."""
    master, slave = pty.openpty()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "casa_cli", *map(str, args)], stdin=slave,
                            stdout=subprocess.PIPE, stderr=slave, env=env)
    os.close(slave)
    seen = []

    def drain():  # the terminal must be read, or a full pty buffer blocks the child
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the child closed the terminal
                return
            if not chunk:
                return
            seen.append(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        stdout, _ = proc.communicate(timeout=timeout)
    finally:
        proc.kill()
        reader.join(timeout=10)
        os.close(master)
    return proc.returncode, stdout.decode(), b"".join(seen).decode(errors="replace")


def json_lines(text):
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# --- 1. stdout carries only the data -------------------------------------------------------
def test_json_reaches_stdout_when_stderr_is_a_terminal(tiny_model, tmp_path):
    model = tiny_model("llama")
    code, stdout, terminal = run_with_terminal_stderr("classify", "Tell me a joke", "--json",
                                                      "--model", model)
    assert code == 0, terminal
    assert [r["id"] for r in json_lines(stdout)] == ["prompt"]

    manifest = write_manifest(tmp_path / "prompts.jsonl", PROMPTS)
    code, stdout, terminal = run_with_terminal_stderr("classify", "--manifest", manifest, "--json",
                                                      "--model", model)
    assert code == 0, terminal
    assert sorted(r["id"] for r in json_lines(stdout)) == ["a", "b", "c"]
    assert '"verdict"' not in terminal  # the records went to stdout only


def test_generate_and_eval_json_reach_stdout_when_stderr_is_a_terminal(tiny_model, tmp_path):
    model = tiny_model("llama")
    code, stdout, terminal = run_with_terminal_stderr(
        "generate", "Tell me a joke", "--json", "--max-new-tokens", "2", "--defense", "none",
        "--model", model)
    assert code == 0, terminal
    assert [r["id"] for r in json_lines(stdout)] == ["prompt"]

    manifest = write_manifest(tmp_path / "prompts.jsonl", PROMPTS)
    code, stdout, terminal = run_with_terminal_stderr(
        "eval", "--manifest", manifest, "--defenses", "none,casa", "--max-new-tokens", "2",
        "--out", tmp_path / "eval", "--json", "--model", model)
    assert code == 0, terminal
    [metrics] = json_lines(stdout)
    assert list(metrics["defences"]) == ["none", "casa"]


# --- 2. outputs are safe to write -----------------------------------------------------------
def test_output_that_is_an_input_is_refused_and_the_input_kept(tiny_model, casa, tmp_path):
    manifest = write_manifest(tmp_path / "prompts.jsonl", PROMPTS)
    before = manifest.read_bytes()
    link = tmp_path / "link.jsonl"
    link.symlink_to(manifest)
    model = tiny_model("llama")
    for out in (manifest, link, tmp_path / "." / "prompts.jsonl"):
        result = casa("classify", "--manifest", manifest, "--output", out, "--model", model)
        assert result.code == 2, result.stderr
        assert str(out) in result.stderr and "input" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert manifest.read_bytes() == before

    chat = tmp_path / "chat.json"
    chat.write_text(json.dumps([{"role": "user", "content": "hi"}]))
    result = casa("generate", "--messages", chat, "--output", chat, "--model", model)
    assert result.code == 2 and json.loads(chat.read_text())[0]["content"] == "hi"

    out = tmp_path / "eval"
    out.mkdir()
    records = write_manifest(out / "records.jsonl", PROMPTS)
    result = casa("eval", "--manifest", records, "--out", out, "--model", model)
    assert result.code == 2 and records.read_bytes() == before


def test_a_second_writer_is_refused_and_the_first_keeps_its_file(tiny_model, casa, tmp_path):
    out = tmp_path / "verdicts.jsonl"
    with RecordWriter(out) as first:
        first.write({"id": "kept", "verdict": "safe"})
        for resume in ([], ["--resume"]):
            result = casa("classify", "Tell me a joke", "--output", out, *resume,
                          "--model", tiny_model("llama"))
            assert result.code == 2, result.stderr
            [line] = result.stderr.strip().splitlines()
            assert str(out) in line and "another process is writing" in line
        with pytest.raises(OutputError, match="another process"):
            RecordWriter(out, resume=True)
        first.write({"id": "kept-2", "verdict": "safe"})
    assert [r["id"] for r in json_lines(out.read_text())] == ["kept", "kept-2"]
    with RecordWriter(out, resume=True) as again:  # free once the first has finished
        again.write({"id": "more", "verdict": "safe"})
    assert [r["id"] for r in json_lines(out.read_text())] == ["kept", "kept-2", "more"]


def test_resume_keeps_the_file_locked_across_its_rewrite(tmp_path):
    out = tmp_path / "verdicts.jsonl"
    out.write_text('{"id": "a", "verdict": "safe"}\n{"id": "b", "error": "x"}\n{"id": "c", "ve')
    with RecordWriter(out, resume=True) as writer:
        assert [r["id"] for r in json_lines(out.read_text())] == ["a"]  # error and torn line gone
        with pytest.raises(OutputError):
            RecordWriter(out)
        writer.write({"id": "b", "verdict": "unsafe"})
    assert [r["id"] for r in json_lines(out.read_text())] == ["a", "b"]


def test_rank_0_holds_the_output_until_the_merge(tmp_path):
    from casa_cli.distributed import Shard, World, part_path
    from casa_cli.inputs import prompt_sample

    out = tmp_path / "verdicts.jsonl"
    part_path(out, 1, 2).write_text('{"id": "a", "verdict": "safe"}\n')  # from a killed 2-rank run
    samples = [prompt_sample("hi", sample_id=i) for i in "ab"]
    with Shard(World(), samples, 2, out, resume=True) as job:
        assert not job.streaming and [s.id for s in job.samples] == ["b"]
        with pytest.raises(OutputError, match="another process"):
            RecordWriter(out)
        with RecordWriter(job.path, resume=True) as writer:
            writer.write({"id": "b", "verdict": "unsafe"})
        job.finish([])
    assert [r["id"] for r in json_lines(out.read_text())] == ["a", "b"]
    RecordWriter(out, resume=True).close()  # free again


def test_disk_full_names_the_file_in_one_line(tiny_model, casa, tmp_path):
    result = casa("classify", "Tell me a joke", "--output", "/dev/full", "--model", tiny_model("llama"))
    assert result.code == 1, result.stderr
    [line] = result.stderr.strip().splitlines()[-1:]
    assert line.startswith("casa: error: /dev/full: writing failed") and "No space left" in line


def test_a_failed_write_leaves_the_records_before_it_whole(tmp_path, monkeypatch):
    out = tmp_path / "verdicts.jsonl"
    writer = RecordWriter(out)
    writer.write({"id": "a", "verdict": "safe"})

    def half_then_full(file, data):
        file.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(output, "_write_all", half_then_full)
    with pytest.raises(OutputError) as failed:
        writer.write({"id": "b", "verdict": "unsafe"})
    writer.close()
    assert failed.value.runtime and str(out) in str(failed.value)
    assert out.read_text() == '{"id": "a", "verdict": "safe"}\n'  # no torn half line


def test_unusable_output_paths_exit_2(tiny_model, casa, tmp_path):
    model = tiny_model("llama")
    folder = casa("classify", "Tell me a joke", "--output", tmp_path, "--model", model)
    assert folder.code == 2 and f"{tmp_path}: is a folder" in folder.stderr
    below_a_file = tmp_path / "file.txt"
    below_a_file.write_text("x")
    nested = casa("classify", "Tell me a joke", "--output", below_a_file / "out.jsonl", "--model", model)
    assert nested.code == 2 and "cannot write here" in nested.stderr


# --- 3. user data on the terminal is escaped -------------------------------------------------
def assert_escaped(text):
    assert "\x1b" not in text and "\x07" not in text and "\u202e" not in text
    assert "[/]" in text and "[bold red]red" in text
    assert "x\\x1b[2Jy" in text and "t\\x1b]0;pwned\\x07" in text and "ab\\u202edc" in text


def test_table_shows_hostile_ids_as_text(tiny_model, casa, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # one line per row, so the ids are not folded
    manifest = write_manifest(tmp_path / "ids.jsonl", [{"id": i, "text": "Tell me a joke"}
                                                       for i in HOSTILE_IDS])
    result = casa("classify", "--manifest", manifest, "--model", tiny_model("llama"))
    assert result.code == 0, result.stderr
    assert_escaped(result.stdout)

    terminal = Console(file=io.StringIO(), force_terminal=True, width=250)
    print_table([{"id": i, "verdict": "safe"} for i in HOSTILE_IDS], ["id", "verdict"],
                title="[red]x\x1b[2J", console=terminal)
    shown = terminal.file.getvalue()
    # Only rich's own styling escapes (SGR: ESC [ ... m) remain; the ids' are shown escaped.
    assert "\x1b[2J" not in shown and "\x1b]0" not in shown and "\u202e" not in shown
    assert "[bold red]red" in shown and "[/]" in shown and "[red]x\\x1b[2J" in shown


def test_stderr_lines_escape_user_data(tiny_model, casa, tmp_path):
    manifest = write_manifest(tmp_path / "m.jsonl", [
        {"id": "[bold red]\x1b[2J", "text": "What is shown?", "image": "evil\x1b]0;pwned\x07.png"}])
    result = casa("classify", "--manifest", manifest, "--model", tiny_model("llama"), "--json")
    assert result.code == 4, result.stderr
    [line] = [line for line in result.stderr.splitlines() if "error" in line]
    assert "evil\\x1b]0;pwned\\x07.png" in line and "\x1b" not in result.stderr

    missing = casa("classify", "--manifest", "gone\u202e[/]\x1b[31m.jsonl")
    assert missing.code == 2
    assert "gone\\u202e[/]\\x1b[31m.jsonl" in missing.stderr and "\x1b" not in missing.stderr


# --- 4. options ----------------------------------------------------------------------------
@pytest.mark.parametrize("args, option", [
    (["generate", "hi", "--temperature", "nan"], "--temperature"),
    (["generate", "hi", "--temperature", "-1"], "--temperature"),
    (["generate", "hi", "--alpha", "nan"], "--alpha"),
    (["generate", "hi", "--alpha", "inf"], "--alpha"),
    (["generate", "hi", "--top-p", "nan"], "--top-p"),
    (["generate", "hi", "--top-p", "0"], "--top-p"),
    (["classify", "hi", "--threshold", "nan"], "--threshold"),
    (["eval", "--set", "harmbench", "--out", "x", "--threshold", "-inf"], "--threshold"),
    (["classify", "hi", "--max-audio-seconds", "0"], "--max-audio-seconds"),
    (["classify", "hi", "--max-audio-seconds", "inf"], "--max-audio-seconds"),
    (["train", "--data", "x", "--out", "y", "--lr", "nan"], "--lr"),
    (["vsfa", "train", "--data", "x", "--out", "y", "--lr", "inf"], "--lr"),
])
def test_bad_numeric_options_are_refused_naming_the_option(casa, args, option):
    result = casa(*args)
    assert result.code == 2, result.stderr
    assert option in result.stderr


def test_max_audio_seconds_caps_audio(tiny_model, casa, tmp_path):
    clip = make_audio(tmp_path / "two-seconds.flac", seconds=2.0)
    model = tiny_model("qwen2_audio")
    capped = casa("classify", "What is said?", "--audio", clip, "--model", model,
                  "--max-audio-seconds", "1", "--json")
    assert capped.code == 4, capped.stderr
    [record] = capped.records()
    assert "verdict" not in record and "--max-audio-seconds" in record["error"]
    allowed = casa("classify", "What is said?", "--audio", clip, "--model", model,
                   "--max-audio-seconds", "2.5", "--json")
    assert allowed.code == 0, allowed.stderr
