"""vlcache.cli: what the commands share (here: parsing --budgets)."""

from __future__ import annotations

import pytest

from vlcache.cli import parse_budgets


def test_budgets_keep_their_order_without_repeats() -> None:
    assert parse_budgets("1.0, 0.1,,0.05,0.1") == [1.0, 0.1, 0.05]
    assert parse_budgets("1") == [1.0]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0.1,0", "budget 0 is outside (0, 1] in --budgets"),
        ("1.5", "budget 1.5 is outside (0, 1] in --budgets"),
        ("nan", "budget nan is outside (0, 1]"),
        ("abc", "bad budget 'abc' in --budgets"),
        (" , ", "--budgets is empty"),
    ],
)
def test_bad_budgets_are_one_line_value_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError) as e:
        parse_budgets(text)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_the_message_names_the_flag() -> None:
    with pytest.raises(ValueError, match="in --alphas"):
        parse_budgets("2", flag="--alphas")
