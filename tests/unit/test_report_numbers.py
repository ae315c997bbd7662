"""The reports' one number formatter: ε = ∞ and missing values read the same in every report."""

from __future__ import annotations

import math

import pytest

from fedllm.reports.numbers import (
    epsilon_from_wire,
    epsilon_to_json,
    format_change,
    format_count,
    format_epsilon,
    format_g,
    format_list,
    format_loss,
    format_perplexity,
    format_seconds,
    to_float,
)


@pytest.mark.parametrize("value", [math.inf, "inf"])
def test_infinite_epsilon_prints_as_infinity_sign(value):
    assert format_epsilon(value) == "∞"
    assert format_epsilon(value, digits=2) == "∞"


def test_epsilon_digits_and_missing():
    assert format_epsilon(2.41234) == "2.412"
    assert format_epsilon(2.41234, digits=2) == "2.41"
    assert format_epsilon(None) == "-"


def test_epsilon_round_trips_through_json_and_wire():
    assert epsilon_to_json(math.inf) == "inf" and to_float(epsilon_to_json(math.inf)) == math.inf
    assert epsilon_to_json(1.5) == 1.5
    assert epsilon_from_wire(-1) == math.inf and epsilon_from_wire(None) == math.inf
    assert epsilon_from_wire(0.75) == 0.75
    assert math.isnan(to_float(None))


def test_metrics_missing_or_negative_print_as_dash():
    assert format_loss(2.08149) == "2.081" and format_perplexity(8.0123) == "8.01"
    assert format_loss(None) == format_loss(-1.0) == format_perplexity(-1) == "-"


def test_general_values_counts_changes_lists_seconds():
    assert format_g(1e-5) == "1e-05" and format_g(8.0) == "8" and format_g("fixed") == "fixed"
    assert format_g(None) == format_count(None) == format_change(None) == format_seconds(None) == "-"
    assert format_count(12.0) == "12"
    assert format_change(0.0123) == "+1.2%" and format_change(-0.5) == "-50.0%"
    assert format_list([0.01, 0.02], ".4g") == "0.01, 0.02" and format_list([], "g") == "-"
    assert format_seconds(12.4) == "12s"
