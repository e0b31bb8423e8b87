"""The champion gate's decision and the reason it gives, on scores that differ, tie, or look alike."""

import math

import pytest

from tasks.registry import ChampionScore, promotion_decision

METRIC = "test MASE"


def test_no_champion_promotes():
    assert promotion_decision(0.9, ChampionScore(None), METRIC) == (True, "no champion yet")


def test_a_lower_score_promotes_and_says_by_how_much():
    promoted, reason = promotion_decision(0.5, ChampionScore("2", 0.7), METRIC)
    assert promoted and reason == "test MASE 0.5 beats champion v2's 0.7 on the same test data"


def test_scores_equal_to_four_digits_are_shown_with_the_digits_that_differ():
    promoted, reason = promotion_decision(0.715412, ChampionScore("2", 0.715438), METRIC)
    assert promoted and reason == "test MASE 0.71541 beats champion v2's 0.71544 on the same test data"
    promoted, reason = promotion_decision(0.715438, ChampionScore("2", 0.715412), METRIC)
    assert not promoted and reason == ("kept champion v2: its test MASE 0.71541 is better than the challenger's "
                                       "0.71544 on the same test data")


@pytest.mark.parametrize("challenger", [0.7154, 0.7154 * (1 + 1e-12), 0.7154 * (1 - 3e-7)])
def test_a_tie_keeps_the_champion_and_says_so(challenger):
    promoted, reason = promotion_decision(challenger, ChampionScore("2", 0.7154), METRIC)
    assert not promoted and reason == "kept champion v2: the challenger's test MASE 0.7154 ties it on the same test data"


def test_an_unscorable_champion_or_challenger_keeps_the_champion():
    assert promotion_decision(0.1, ChampionScore("3", None, "it was trained on other columns"), METRIC) == (
        False, "kept champion v3: it was trained on other columns")
    assert promotion_decision(math.nan, ChampionScore("3", 0.5), METRIC) == (
        False, "kept champion v3: challenger test MASE is nan")
