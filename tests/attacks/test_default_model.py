"""Attacks on the real default model (SmolLM2-135M), p = 1: a few victims, marked slow."""

import pytest

from fedsplit.attacks import evaluate_attack

pytestmark = pytest.mark.slow


def test_vmi_recovers_most_tokens_from_one_block_and_noise_lowers_it():
    kwargs = dict(spec="smollm2-135m", head_layers=1, n=8, steps=100, progress=False)
    clean = evaluate_attack("vmi", **kwargs)
    noisy = evaluate_attack("vmi", defense_spec="gaussian:2.0", **kwargs)
    assert clean.token_f1 > 0.7
    assert noisy.token_f1 < clean.token_f1 - 0.2


def test_learned_recovers_most_tokens_from_one_block():
    result = evaluate_attack(
        "learned", spec="smollm2-135m", head_layers=1, n=8, steps=150, aux_examples=512, progress=False
    )
    assert result.token_f1 > 0.6
