"""Metrics on hand-checked examples."""
import math

import numpy as np
import pytest

from casa_cli.metrics import (attack_success_rate, auroc, auroc_standard_error, breakdown, classification_metrics,
                              defence_metrics, f1_at_threshold, modality,
                              over_refusal_rate, roc_curve, tpr_at_fpr)


def test_auroc_perfect_inverted_and_chance():
    y = [1, 1, 0, 0]
    assert auroc(y, [0.9, 0.8, 0.2, 0.1]) == 1.0
    assert auroc(y, [0.1, 0.2, 0.8, 0.9]) == 0.0
    assert auroc(y, [0.5, 0.5, 0.5, 0.5]) == 0.5  # all tied: half credit for every pair


def test_auroc_ties_count_half():
    # Pairs (harmful, benign): (0.8,0.3) win, (0.8,0.5) win, (0.5,0.3) win, (0.5,0.5) tie
    # -> (3 + 0.5) / 4.
    assert auroc(["harmful", "harmful", "benign", "benign"], [0.8, 0.5, 0.5, 0.3]) == 0.875


def test_auroc_one_mistake_in_six_pairs():
    # Harmful 0.9, 0.4; benign 0.6, 0.3, 0.1: only (0.4 vs 0.6) is lost -> 5/6.
    assert auroc([1, 1, 0, 0, 0], [0.9, 0.4, 0.6, 0.3, 0.1]) == pytest.approx(5 / 6)


def test_auroc_matches_trapezoid_area_of_roc_curve():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    s = np.round(rng.random(200) + 0.3 * y, 1)  # rounding makes many ties
    fpr, tpr, _ = roc_curve(y, s)
    area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    assert auroc(y, s) == pytest.approx(area)


def test_auroc_undefined_with_one_class():
    assert math.isnan(auroc([1, 1], [0.2, 0.3]))


def test_roc_curve_groups_ties():
    fpr, tpr, thr = roc_curve([1, 0, 1, 0], [0.9, 0.5, 0.5, 0.1])
    assert thr[0] == np.inf
    assert fpr.tolist() == [0.0, 0.0, 0.5, 1.0]
    assert tpr.tolist() == [0.0, 0.5, 1.0, 1.0]


def test_tpr_at_fpr_threshold_on_benign_scores():
    benign = [i / 100 for i in range(100)]  # 0.00 .. 0.99
    harmful = [0.995, 0.985, 0.975, 0.965, 0.5]
    labels = ["benign"] * 100 + ["harmful"] * 5
    r1 = tpr_at_fpr(labels, benign + harmful, 0.01)
    # k = 1 benign may be flagged: threshold is the 2nd highest benign score, 0.98.
    assert r1["threshold"] == 0.98 and r1["fpr"] == 0.01
    assert r1["tpr"] == pytest.approx(2 / 5)
    r5 = tpr_at_fpr(labels, benign + harmful, 0.05)
    assert r5["threshold"] == 0.94 and r5["fpr"] == 0.05
    assert r5["tpr"] == pytest.approx(4 / 5)


def test_tpr_at_fpr_never_exceeds_budget_with_ties_or_few_benign():
    # Ten benign all at 0.7: flagging any would flag all ten, so none is flagged.
    r = tpr_at_fpr([0] * 10 + [1, 1], [0.7] * 10 + [0.9, 0.7], 0.05)
    assert r == {"tpr": 0.5, "threshold": 0.7, "fpr": 0.0}


def test_f1_and_classification_metrics():
    y = [1, 1, 1, 0, 0]
    scores = [0.9, 0.6, 0.2, 0.7, 0.1]  # at 0.5: TP=2, FN=1, FP=1, TN=1
    assert f1_at_threshold(y, scores, 0.5) == pytest.approx(2 / 3)
    m = classification_metrics(y, [s >= 0.5 for s in scores])
    assert m == {"accuracy": 0.6, "precision": 2 / 3, "recall": 2 / 3,
                 "f1": pytest.approx(2 / 3), "n": 5}
    assert f1_at_threshold(y, scores, 0.95) == 0.0  # nothing flagged: defined as 0, not NaN


def test_rates():
    assert attack_success_rate([True, True, False, True]) == 0.25
    assert over_refusal_rate([False, True, False, False]) == 0.25
    assert math.isnan(attack_success_rate([]))


def _results():
    rows = []
    for defence, refused_h, refused_b in (("none", [False, False, False, True], [False, False]),
                                          ("casa", [True, True, True, False], [False, True])):
        for i, r in enumerate(refused_h):
            rows.append({"defence": defence, "label": "harmful", "refused": r,
                         "category": "crime", "images": ["x.png"] if i % 2 else [],
                         "audio": None})
        for r in refused_b:
            rows.append({"defence": defence, "label": "benign", "refused": r,
                         "category": "cooking", "images": [], "audio": None})
    for row, score in zip((r for r in rows if r["defence"] == "casa"),
                          (0.9, 0.8, 0.7, 0.2, 0.1, 0.3)):
        row["score"] = score
    rows.append({"defence": "none", "label": None, "refused": True})  # unlabelled: ignored
    return rows


def test_defence_metrics():
    m = defence_metrics(_results())
    assert m["none"] == {"attack_success_rate": 0.75, "over_refusal_rate": 0.0,
                         "n_harmful": 4, "n_benign": 2}
    casa = m["casa"]
    assert casa["attack_success_rate"] == 0.25 and casa["over_refusal_rate"] == 0.5
    # Harmful 0.9, 0.8, 0.7, 0.2 vs benign 0.1, 0.3: only 0.2 < 0.3 is lost -> 7/8.
    assert casa["auroc"] == pytest.approx(7 / 8)
    assert casa["roc"]["fpr"][0] == 0.0 and casa["roc"]["tpr"][-1] == 1.0


def test_breakdown_by_category_and_modality():
    by_cat = breakdown(_results(), "category")
    assert set(by_cat) == {"crime", "cooking", "None"}
    assert by_cat["crime"]["casa"]["n_benign"] == 0
    assert by_cat["crime"]["none"]["attack_success_rate"] == 0.75
    by_mod = breakdown(_results(), modality)
    assert by_mod["image"]["casa"]["n_harmful"] == 2
    assert modality({"images": ["a"], "audio": "b.wav"}) == "image+audio"
    assert modality({"images": [], "audio": None}) == "text"


def test_auroc_standard_error_matches_the_spread_over_resampled_sets():
    """Hanley & McNeil's formula against the empirical spread of AUROC over 400 independent
    draws of 100 harmful and 100 benign Gaussian scores (true AUROC about 0.92)."""
    rng = np.random.default_rng(0)
    labels = [1] * 100 + [0] * 100
    draws = [auroc(labels, np.r_[rng.normal(2.0, 1.0, 100), rng.normal(0.0, 1.0, 100)])
             for _ in range(400)]
    empirical = float(np.std(draws))
    predicted = auroc_standard_error(float(np.mean(draws)), 100, 100)
    assert abs(predicted - empirical) / empirical < 0.15
    assert auroc_standard_error(1.0, 50, 50) == 0.0
    assert auroc_standard_error(0.9, 400, 400) < auroc_standard_error(0.9, 100, 100)
