"""`casa classify` and `casa eval` under torchrun (2 CPU ranks, gloo): the merged output
equals a single process's, and so do eval's metrics; a job killed midway resumes without
duplicates; sharding and merging rules; --device-map."""
import json
import os
import random
import re
import subprocess
import sys

import pytest

from casa_cli.distributed import World, launched, merge, merge_parts, part_files, part_path, shard
from casa_cli.inputs import InputError
from test_cli_families import random_head_adapter

WORDS = "how do I make a safe cake pick the lock tell me a joke about world history please".split()

# Each torchrun rank runs this instead of `-m casa_cli`: it records the rank's own exit code
# in $EXIT_DIR and exits 0, so torchrun does not stop the other rank at the first non-zero
# exit. With KILL_AFTER=n, rank 1 dies (SIGKILL) right after writing its n-th record.
RANK_MAIN = '''
import os, signal, sys
from pathlib import Path
from casa_cli.cli import main
from casa_cli.output import RecordWriter

kill_after = int(os.environ.get("KILL_AFTER", 0))
if kill_after and os.environ["RANK"] == "1":
    write, written = RecordWriter.write, []

    def write_then_die(self, record):
        write(self, record)
        written.append(record)
        if len(written) == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
    RecordWriter.write = write_then_die
try:
    main()
except SystemExit as done:
    Path(os.environ["EXIT_DIR"], "rank" + os.environ["RANK"]).write_text(str(done.code))
# gloo's threads still running now would meet interpreter shutdown: a rare abort of a rank
# whose work is done
threads = [Path(task, "comm").read_text().strip() for task in Path("/proc/self/task").iterdir()]
Path(os.environ["EXIT_DIR"], "threads" + os.environ["RANK"]).write_text(
    " ".join(name for name in threads if "gloo" in name))
'''


@pytest.fixture(scope="module")
def job(tiny_model, tmp_path_factory):
    """A 40-prompt manifest of mixed lengths and the single-process verdicts for it."""
    from conftest import run_casa

    folder = tmp_path_factory.mktemp("distributed")
    rng = random.Random(0)
    manifest = folder / "prompts.jsonl"
    manifest.write_text("".join(json.dumps({"id": f"p{i:02d}", "text": " ".join(
        rng.choice(WORDS) for _ in range(rng.randint(1, 60)))}) + "\n" for i in range(40)))
    reference = folder / "reference.jsonl"
    model = tiny_model("llama")
    adapter = random_head_adapter(folder / "adapter", model)  # z != 0: the attention path counts
    result = run_casa("classify", "--manifest", manifest, "--model", model, "--adapter", adapter,
                      "--output", reference)
    assert result.code == 0, result.stderr
    # One process writes each length-sorted batch as it finishes; a merge restores input
    # order, which for these ids is their sorted order.
    return {"folder": folder, "manifest": manifest, "model": model, "adapter": adapter,
            "reference": sorted(read(reference), key=lambda r: r["id"]),
            "runner": write_runner(folder)}


def write_runner(folder):
    path = folder / "rank_main.py"
    path.write_text(RANK_MAIN)
    return path


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def torchrun(job, tmp_path, *args, kill_after=0, command="classify"):
    """`casa classify` (or `command`) over the job's manifest on 2 CPU ranks; returns the
    finished process and each rank's exit code."""
    exits = tmp_path / f"exits-{len(list(tmp_path.glob('exits-*')))}"
    exits.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "EXIT_DIR": str(exits),
           "KILL_AFTER": str(kill_after)}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         job["runner"], command, "--manifest", job["manifest"], "--model", job["model"],
         "--adapter", job["adapter"], *args],
        env=env, capture_output=True, text=True, timeout=180)
    codes = {path.name: int(path.read_text()) for path in exits.glob("rank*")}
    leftover = {path.name: path.read_text() for path in exits.glob("threads*")}
    assert not any(leftover.values()), f"gloo threads outlive destroy_process_group: {leftover}"
    return done, codes


def assert_same_verdicts(records, reference):
    assert [r["id"] for r in records] == [r["id"] for r in reference]  # input order, no repeats
    for got, want in zip(records, reference):
        assert got["verdict"] == want["verdict"], got["id"]
        assert got["prompt_tokens"] == want["prompt_tokens"], got["id"]
        assert got["p_unsafe"] == pytest.approx(want["p_unsafe"], abs=1e-5), got["id"]
        assert got["z"] != 0.0 and got["z"] == pytest.approx(want["z"], abs=1e-5), got["id"]


def summary_count(stderr):
    """How many records this run classified, from rank 0's summary line."""
    return int(re.search(r"^(\d+) records \(", stderr, re.MULTILINE).group(1))


# --- torchrun end to end --------------------------------------------------------------------
def test_two_ranks_match_one_process(job, tmp_path):
    out = tmp_path / "verdicts.jsonl"
    done, codes = torchrun(job, tmp_path, "--output", out)
    assert done.returncode == 0 and codes == {"rank0": 0, "rank1": 0}, done.stderr
    assert_same_verdicts(read(out), job["reference"])
    assert not part_files(out)
    assert summary_count(done.stderr) == 40


def test_killed_rank_resumes_without_duplicates(job, tmp_path):
    out = tmp_path / "verdicts.jsonl"
    killed, codes = torchrun(job, tmp_path, "--output", out, "--batch-size", "2", kill_after=5)
    assert killed.returncode != 0 and "rank1" not in codes
    assert out.read_text() == ""  # rank 0 held it (locked, emptied) for a merge that never came
    parts = {path.name: read(path) for path in part_files(out)}
    assert len(parts["verdicts.jsonl.rank1-of-2.part"]) == 5
    finished = sum(len(records) for records in parts.values())

    resumed, codes = torchrun(job, tmp_path, "--output", out, "--resume")
    assert resumed.returncode == 0 and codes == {"rank0": 0, "rank1": 0}, resumed.stderr
    assert summary_count(resumed.stderr) == 40 - finished  # nothing finished is redone
    assert_same_verdicts(read(out), job["reference"])
    assert not part_files(out)


def test_without_output_rank_0_prints_the_merged_records(job, tmp_path):
    done, codes = torchrun(job, tmp_path, "--json", "--threshold", "0", "--fail-on-unsafe")
    assert codes == {"rank0": 3, "rank1": 3}, done.stderr  # the merged outcome, on every rank
    records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [r["id"] for r in records] == [r["id"] for r in job["reference"]]
    assert all(r["verdict"] == "unsafe" for r in records)


def test_one_process_resumes_from_the_parts_of_any_world_size(job, casa, tmp_path):
    """Parts of a killed 3-rank job (one with a torn last line) and an --output holding a
    copy of a part's record (a merge killed before it removed the parts)."""
    reference, out = job["reference"], tmp_path / "verdicts.jsonl"
    lines = lambda records: "".join(json.dumps(r) + "\n" for r in records)  # noqa: E731
    part_path(out, 0, 3).write_text(lines(reference[:10]) + '{"id": "p1')
    part_path(out, 2, 3).write_text(lines(reference[30:35]))
    out.write_text(lines(reference[20:25] + reference[30:31]))
    result = casa("classify", "--manifest", job["manifest"], "--model", job["model"],
                  "--adapter", job["adapter"], "--output", out, "--resume")
    assert result.code == 0, result.stderr
    assert summary_count(result.stderr) == 20
    assert_same_verdicts(read(out), reference)
    assert not part_files(out)


# --- casa eval under torchrun ---------------------------------------------------------------
EVAL_ARGS = ("--defenses", "none,casa", "--max-new-tokens", "3")


@pytest.fixture(scope="module")
def eval_job(tiny_model, tmp_path_factory):
    """A labelled 12-prompt manifest and a single process's eval of it."""
    from conftest import run_casa

    folder = tmp_path_factory.mktemp("distributed-eval")
    rng = random.Random(1)
    manifest = folder / "prompts.jsonl"
    manifest.write_text("".join(json.dumps({
        "id": f"e{i:02d}", "label": "harmful" if i % 3 == 0 else "benign", "category": f"c{i % 2}",
        "text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40)))}) + "\n"
        for i in range(12)))
    model = tiny_model("llama")
    adapter = random_head_adapter(folder / "adapter", model)
    out = folder / "reference"
    result = run_casa("eval", "--manifest", manifest, "--model", model, "--adapter", adapter,
                      "--out", out, *EVAL_ARGS)
    assert result.code == 0, result.stderr
    return {"manifest": manifest, "model": model, "adapter": adapter, "runner": write_runner(folder),
            "records": read(out / "records.jsonl"), "metrics": metrics_of(out)}


def metrics_of(out):
    """metrics.json without what differs from run to run (latency)."""
    metrics = json.loads((out / "metrics.json").read_text())
    for per_defence in metrics["defences"].values():
        per_defence.pop("latency_ms_mean")
    return metrics


def assert_same_results(records, reference):
    key = lambda r: (r["defence"], r["id"])  # noqa: E731
    assert [key(r) for r in records] == [key(r) for r in reference]  # input order, no repeats
    for got, want in zip(records, reference):
        assert (got["response"], got["refused"]) == (want["response"], want["refused"]), key(got)
        assert got.get("score", 0) == pytest.approx(want.get("score", 0), abs=1e-5), key(got)


def test_eval_on_two_ranks_gives_the_single_process_metrics(eval_job, tmp_path):
    out = tmp_path / "eval"
    done, codes = torchrun(eval_job, tmp_path, "--out", out, *EVAL_ARGS, command="eval")
    assert done.returncode == 0 and codes == {"rank0": 0, "rank1": 0}, done.stderr
    assert_same_results(read(out / "records.jsonl"), eval_job["records"])
    assert metrics_of(out) == eval_job["metrics"]
    assert not part_files(out / "records.jsonl")
    assert done.stderr.count("24 results (0 failed)") == 1  # rank 0 reports, once


def test_eval_killed_rank_resumes_without_duplicates(eval_job, tmp_path):
    out = tmp_path / "eval"
    killed, codes = torchrun(eval_job, tmp_path, "--out", out, *EVAL_ARGS, kill_after=3,
                             command="eval")
    assert killed.returncode != 0 and "rank1" not in codes
    assert len(read(part_path(out / "records.jsonl", 1, 2))) == 3  # one prompt and a half
    resumed, codes = torchrun(eval_job, tmp_path, "--out", out, *EVAL_ARGS, "--resume",
                              command="eval")
    assert resumed.returncode == 0 and codes == {"rank0": 0, "rank1": 0}, resumed.stderr
    assert_same_results(read(out / "records.jsonl"), eval_job["records"])
    assert metrics_of(out) == eval_job["metrics"]
    assert not part_files(out / "records.jsonl")


# --- sharding and merging -------------------------------------------------------------------
@pytest.mark.parametrize("size", [1, 2, 3, 7])
def test_shards_are_balanced_deterministic_and_disjoint(size):
    rng = random.Random(size)
    costs = [rng.choice([rng.randint(1, 50), rng.randint(500, 5000)]) for _ in range(101)]
    shards = [shard(costs, rank, size) for rank in range(size)]
    assert shards == [shard(list(costs), rank, size) for rank in range(size)]
    assert sorted(i for s in shards for i in s) == list(range(len(costs)))
    assert all(s == sorted(s) for s in shards)  # each rank runs its share in input order
    counts = [len(s) for s in shards]
    totals = [sum(costs[i] for i in s) for s in shards]
    assert max(counts) - min(counts) <= 1
    assert max(totals) - min(totals) <= max(costs)


def test_merge_restores_input_order():
    order = ["a", "b", "dup", "c", "dup", "missing"]
    parts = [[{"id": "c", "n": 1}, {"id": "dup", "n": 1}],
             [{"id": "b", "n": 1}, {"id": "dup", "n": 2}, {"id": "other", "n": 1}],
             [{"id": "a", "n": 1}, {"id": "b", "n": 2}]]  # b twice: a copy, dropped
    merged = merge(order, parts)
    assert [(r["id"], r["n"]) for r in merged] == [
        ("a", 1), ("b", 1), ("dup", 1), ("c", 1), ("dup", 2), ("other", 1)]


def test_merge_prefers_the_retried_result_to_the_failure():
    """--output keeps the error record of a failure that a resumed rank then retried."""
    output = [{"id": "a", "error": "boom"}, {"id": "b", "n": 1}]
    part = [{"id": "a", "n": 2}]
    assert merge(["a", "b"], [output, part]) == [{"id": "a", "n": 2}, {"id": "b", "n": 1}]
    keyed = merge([("x", "a"), ("y", "a")], [[{"d": "y", "id": "a"}, {"d": "x", "id": "a"}]],
                  key=lambda r: (r["d"], r["id"]))
    assert [r["d"] for r in keyed] == ["x", "y"]


def test_merge_refuses_when_rank_0_cannot_see_every_part(tmp_path):
    out = tmp_path / "verdicts.jsonl"
    part_path(out, 0, 2).write_text('{"id": "a"}\n')  # rank 1's part is on another machine
    with pytest.raises(RuntimeError, match="filesystem they all share"):
        merge_parts(out, ["a", "b"], size=2)
    assert part_path(out, 0, 2).is_file() and not out.exists()


def test_part_files_belong_to_their_output(tmp_path):
    out = tmp_path / "run[1].jsonl"  # glob metacharacters in the name
    mine = [part_path(out, 0, 2), part_path(out, 3, 4)]
    for path in [*mine, part_path(tmp_path / "run1.jsonl", 0, 2), out]:
        path.write_text("")
    assert mine[0].name == "run[1].jsonl.rank0-of-2.part"
    assert part_files(out) == sorted(mine)


def test_world_from_torchrun_variables(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    world = World.from_env()
    assert (world.rank, world.size, world.local_rank, world.distributed, world.main) == (
        3, 4, 1, True, False)
    assert world.device("cpu") == "cpu"
    with pytest.raises(InputError, match="one process per node"):
        with launched("cpu", device_map="auto"):
            pass


# --- --device-map ---------------------------------------------------------------------------
def test_device_map(tiny_model, casa, tmp_path):
    from casa_cli.backbone import load_backbone

    result = casa("load", "--model", tiny_model("llama"), "--device-map", "auto", "--json")
    assert result.code == 0, result.stderr
    assert result.records()[0]["device"] == "cpu"
    for command in (["generate", "hi", "--max-new-tokens", 2, "--defense", "none"],
                    ["classify", "hi"]):
        placed = casa(*command, "--model", tiny_model("llama"), "--device-map", "auto", "--json")
        assert placed.code == 0, placed.stderr
    prompts = tmp_path / "device-map.jsonl"
    prompts.write_text('{"id": "a", "text": "hi", "label": "benign"}\n')
    evaluated = casa("eval", "--manifest", prompts, "--model", tiny_model("llama"), "--defenses", "none",
                     "--max-new-tokens", 2, "--device-map", "auto", "--out", tmp_path / "eval")
    assert evaluated.code == 0, evaluated.stderr
    bad = casa("load", "--model", tiny_model("llama"), "--device-map", "everywhere")
    assert bad.code == 2 and "unknown device map" in bad.stderr
    # The head runs where H comes out: the final norm's device, wherever lm_head sits.
    backbone = load_backbone(tiny_model("llama"))
    backbone.final_norm().to("meta")
    assert backbone.device.type == "meta"
