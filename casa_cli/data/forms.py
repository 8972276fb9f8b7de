"""Style that tracks the label, taken out of the prompts (steps of ``assemble``).

Harmful sets are mostly commands ("Write a tutorial on how to ...") and benign sets mostly
questions, so a classifier can score well by reading the "?" alone. ``normalise`` cleans
the text and drops its closing punctuation (style as well); ``balance_forms`` writes every
prompt that lacks a twin in the other form through fixed templates, so both labels carry
both forms in similar shares (``python -m casa_cli.data.baseline`` shows the effect on a
bag-of-words model).
"""
from __future__ import annotations

import re
import unicodedata
import zlib

from casa_cli.data.prompt_sets import detect_form

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
