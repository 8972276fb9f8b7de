"""benchmarks/spoken_detection.py's tables: each voice's figures come from that voice's prompts
alone, and a set with one class only scores no AUROC (None, never NaN in the JSON)."""
import json

from benchmark_scripts import load_benchmark


def _script():
    return load_benchmark("spoken_detection")


def row(voice, label, p, wer):
    """One prompt: the speech and reading scores rank as `p`, the text and Whisper ones
    inversely, so every scoring's AUROC is known."""
    return {"voice": voice, "label": label, "wer_reading": wer, "wer_whisper": 2 * wer,
            "p_speech": p, "p_reading": p, "p_text": 1 - p, "p_whisper": 1 - p}


def test_each_voice_is_scored_on_its_own_prompts():
    script = _script()
    rows = [row("a", "harmful", 0.9, 0.1), row("a", "harmful", 0.8, 0.3),
            row("a", "benign", 0.2, 0.2), row("b", "harmful", 0.1, 0.5),
            row("b", "benign", 0.7, 0.7)]
    table = script.by_voice(rows, threshold=0.5)
    assert set(table) == {"a", "b"}
    assert table["a"]["prompts"] == 3 and table["b"]["prompts"] == 2
    assert abs(table["a"]["wer_reading"] - 0.2) < 1e-9 and abs(table["b"]["wer_whisper"] - 1.2) < 1e-9
    # "a" ranks its harmful prompts above its benign one in speech and reading; "b" the reverse
    assert (table["a"]["speech"], table["a"]["reading"], table["a"]["text"]) == (1.0, 1.0, 0.0)
    assert (table["b"]["speech"], table["b"]["whisper"]) == (0.0, 1.0)


def test_a_set_of_one_class_has_no_auroc():
    script = _script()
    assert script.summary(["harmful", "harmful"], [0.9, 0.2], threshold=0.5) == {"auroc": None}
    table = script.by_voice([row("a", "harmful", 0.9, 0.1)], threshold=0.5)
    assert table["a"]["speech"] is None
    json.dumps(table, allow_nan=False)  # raises on a NaN
    full = script.summary(["harmful", "benign", "benign"], [0.9, 0.6, 0.1], threshold=0.5)
    assert full["auroc"] == 1.0 and full["flagged_harmful"] == 1.0 and full["flagged_benign"] == 0.5
