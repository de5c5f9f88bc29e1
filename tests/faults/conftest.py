"""Fixtures for the fault tests; the terminal summary reports how many fuzz cases ran."""

import pytest

from fedsplit.model.loading import model_fingerprint


@pytest.fixture
def fingerprint():
    return model_fingerprint("tiny-llama")


def pytest_terminal_summary(terminalreporter):
    from faultkit import CASES

    if CASES:
        total = sum(CASES.values())
        parts = ", ".join(f"{name} {n}" for name, n in sorted(CASES.items()))
        terminalreporter.write_line(
            f"fedsplit fault suite: {total} generated cases against a live server ({parts})"
        )
