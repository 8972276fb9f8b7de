"""Refusals for the lora mode's harmful targets (issue 20): the model learns to write, after
<|unsafe|>, a short refusal that says what it will not help with and, where one fits, points
to a safe alternative, in varied wording, so it does not learn one fixed string.

A refusal is an opener naming what is declined (by harm category, the shared taxonomy of
`casa_cli.data.taxonomy`), then the category's alternative. Every opener states inability or
unwillingness with a helping verb, so the phrase judge (`judges.is_refusal`) reads each one
as a refusal (a test checks all of them).
"""
from __future__ import annotations

import random

OPENERS = (
    "I can't help with {what}.",
    "I won't provide {what}.",
    "Sorry, but I can't assist with {what}.",
    "I'm not able to help with {what}.",
    "I can't give you {what}.",
    "I must decline: this asks for {what}.",
    "I'm sorry, I can't provide {what}.",
    "That's a request for {what}, and I can't help with it.",
    "I'm not going to provide {what}.",
    "I can't assist with this, because it asks for {what}.",
    "Sorry, I won't help with {what}.",
    "I'm unable to help with {what}.",
)

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


def refusal(category: str | None, rng: random.Random) -> str:
    """A refusal for a harmful request of `category` (a taxonomy category; anything else is
    "other"), its wording drawn with `rng`."""
    what, alternative = WHAT.get(category or "other", WHAT["other"])
    opener = rng.choice(OPENERS).format(what=what)
    return f"{opener} {alternative}".strip() if alternative and rng.random() < 0.8 else opener
