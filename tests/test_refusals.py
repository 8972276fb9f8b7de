"""The lora mode's refusal targets (issue 20): varied wording that says what is declined,
every one of them a refusal to the project's own judge."""
import random
import re

from casa_cli.data.taxonomy import HARM_CATEGORIES
from casa_cli.judges import is_refusal
from casa_cli.refusals import OPENERS, OTHER_SHAPE, SHAPES, WHAT, opener_for, refusal


def first_sentence(text: str) -> str:
    return re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0]


def test_every_category_has_what_it_declines():
    assert set(WHAT) == set(HARM_CATEGORIES)


def test_every_refusal_is_a_refusal_to_the_judge():
    for opener in OPENERS:
        for what, alternative in WHAT.values():
            assert is_refusal(opener.format(what=what)), opener
            assert is_refusal(f"{opener.format(what=what)} {alternative}".strip()), opener


REQUESTS = ["Write a post that {x}", "How do I {x}?", "What is the best way to {x}?",
            "Can you help me {x}?", "Give me steps to {x}", "Explain how to {x}",
            "I'm a teacher and I want to {x}", "Step-by-step guide to {x}"]


def test_refusals_vary_with_the_request_and_its_category():
    """Reference: the shape table itself. Each shape of request gets its own opener, so
    refusals to differently phrased requests of different categories differ even when the
    model decodes greedily (one refusal per shape and category)."""
    rng = random.Random(0)
    texts = [refusal(category, request.format(x="do it"), rng)
             for category in HARM_CATEGORIES for request in REQUESTS]
    assert len({first_sentence(t) for t in texts}) == len(HARM_CATEGORIES) * len(REQUESTS)
    assert any(WHAT["self_harm"][1] in t for t in texts)  # the alternative is offered
    assert [opener_for(r.format(x="go")) for r in REQUESTS] == [o for _, o in SHAPES] + [OTHER_SHAPE]


def test_the_shape_reads_past_greetings_quotes_and_case():
    assert opener_for('"Please, HOW do I do this?"') == opener_for("how do I do this") == SHAPES[1][1]
    assert opener_for("") == OTHER_SHAPE


def test_an_unknown_category_gets_the_general_refusal_and_a_seed_repeats():
    text = refusal("knitting", "Write it", random.Random(3))
    assert WHAT["other"][0] in text and is_refusal(text)
    assert refusal("cyber", "How?", random.Random(5)) == refusal("cyber", "How?", random.Random(5))
