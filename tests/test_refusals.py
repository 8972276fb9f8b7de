"""The lora mode's refusal targets (issue 20): varied wording that says what is declined,
every one of them a refusal to the project's own judge."""
import random
import re

from casa_cli.data.taxonomy import HARM_CATEGORIES
from casa_cli.judges import is_refusal
from casa_cli.refusals import OPENERS, WHAT, refusal


def first_sentence(text: str) -> str:
    return re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0]


def test_every_category_has_what_it_declines():
    assert set(WHAT) == set(HARM_CATEGORIES)


def test_every_refusal_is_a_refusal_to_the_judge():
    for opener in OPENERS:
        for what, alternative in WHAT.values():
            assert is_refusal(opener.format(what=what)), opener
            assert is_refusal(f"{opener.format(what=what)} {alternative}".strip()), opener


def test_refusals_vary_over_a_hundred_harmful_prompts():
    rng = random.Random(0)
    texts = [refusal(HARM_CATEGORIES[i % len(HARM_CATEGORIES)], rng) for i in range(100)]
    assert len({first_sentence(t) for t in texts}) >= 20
    assert any(WHAT["self_harm"][1] in t for t in texts)  # the alternative is offered


def test_an_unknown_category_gets_the_general_refusal_and_a_seed_repeats():
    text = refusal("knitting", random.Random(3))
    assert WHAT["other"][0] in text and is_refusal(text)
    assert refusal("cyber", random.Random(5)) == refusal("cyber", random.Random(5))
