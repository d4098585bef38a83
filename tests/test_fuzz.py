"""Every outside input through its fuzz target for a short budget (tests/fuzz_targets.py;
`make soak` runs the same targets for a long one)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings

from tests.fuzz_targets import TARGETS, Target

# Examples per target in `make test`; the slow readers (files, YAML) take fewer.
BUDGET = {"codec": 400, "key-reader": 400}


@pytest.mark.parametrize("target", TARGETS, ids=lambda target: target.name)
def test_no_input_escapes_its_reader(target: Target) -> None:
    @settings(
        max_examples=BUDGET.get(target.name, 60),
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(target.strategy)
    def run(value: Any) -> None:
        target.run(value)

    run()
