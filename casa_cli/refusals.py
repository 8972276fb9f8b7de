"""Refusals for the lora mode's harmful targets (issue 20): the model learns to write, after
<|unsafe|>, a short refusal that says what it will not help with and, where one fits, points
to a safe alternative, in varied wording, so it does not learn one fixed string.

A refusal is an opener naming what is declined (by harm category, the shared taxonomy of
`casa_cli.data.taxonomy`), worded by the request's shape, then the category's alternative.
Every opener states inability or unwillingness with a helping verb, so the phrase judge
(`judges.is_refusal`) reads each one as a refusal (a test checks all of them).
"""
from __future__ import annotations

import random

# The opener follows the request's shape (its first word), which the model sees: with an
# opener drawn at random, greedy decoding settles on the likeliest one for every prompt (12
# distinct first sentences over 88 held-out refusals); tied to the request, the wording
# varies as the requests do.
SHAPES = (
    (("write", "compose", "draft", "create", "generate", "produce", "come", "design", "develop"),
     "I won't write this, because it asks for {what}."),
    (("how",), "I can't explain how to do this, because it asks for {what}."),
    (("what", "which", "where", "who", "when", "why"), "I can't answer that: it asks for {what}."),
    (("can", "could", "would", "will", "is", "are", "do", "does", "should"),
     "Sorry, but I can't assist with {what}."),
    (("give", "provide", "list", "tell", "show", "suggest", "share", "find", "recommend"),
     "I won't provide {what}."),
    (("explain", "describe", "outline", "detail", "teach", "walk"), "I'm not able to help with {what}."),
    (("i", "i'm", "im", "my", "me", "we", "our"), "I hear you, but I can't help with {what}."),
)
OTHER_SHAPE = "I must decline: this asks for {what}."
OPENERS = tuple(opener for _, opener in SHAPES) + (OTHER_SHAPE,)
_POLITE = {"please", "hey", "hi", "hello", "ok", "okay", "so"}


def opener_for(request: str) -> str:
    """The opener for a request of this shape: its first word, past greetings and "please"."""
    words = [w.strip("\"'.,!?:;()[]*-").lower() for w in request.split()[:6]]
    first = next((w for w in words if w and w not in _POLITE), "")
    return next((opener for starts, opener in SHAPES if first in starts), OTHER_SHAPE)


# What each harm category's request asks for, and a safe direction to offer instead.
WHAT = {
    "weapons_violence": ("instructions that could be used to hurt people or make weapons",
                         "If you're worried about someone's safety, please contact local emergency services."),
    "cyber": ("help breaking into systems or accounts, or writing malicious code",
              "I'm glad to help you secure your own systems or learn security legally."),
    "drugs": ("instructions for making, getting or hiding illegal drugs",
              "If you or someone you know is struggling with drugs, a doctor or local support service can help."),
    "fraud": ("help with fraud, theft or deceiving people for money",
              "I can help with budgeting, legitimate ways to earn, or protecting yourself from scams."),
    "hate": ("content that demeans or excludes people for who they are",
             "I'm happy to help write something respectful about the topic instead."),
    "harassment": ("help harassing, threatening or intimidating someone",
                   "If there's a conflict, I can help you think through a calm, direct way to address it."),
    "self_harm": ("information that could help someone hurt themselves",
                  "If you're having a hard time, please reach out to someone you trust or a local crisis line."),
    "sexual": ("sexual content involving non-consent, exploitation or minors",
               "If someone is at risk, please contact the police or a child protection service."),
    "privacy": ("help finding, tracking or exposing someone's private information",
                "I can help you protect your own privacy online instead."),
    "misinformation": ("false or misleading content meant to deceive people",
                       "I'm happy to help you write an accurate, well-sourced piece instead."),
    "other": ("help with something that could cause real harm", ""),
}


def refusal(category: str | None, request: str, rng: random.Random) -> str:
    """A refusal for the harmful `request` of `category` (a taxonomy category; anything else
    is "other"): the opener by the request's shape, the safe alternative added or not by
    `rng`."""
    what, alternative = WHAT.get(category or "other", WHAT["other"])
    opener = opener_for(request).format(what=what)
    return f"{opener} {alternative}".strip() if alternative and rng.random() < 0.8 else opener
