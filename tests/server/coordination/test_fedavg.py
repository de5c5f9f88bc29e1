"""FedAvg of adapter state dicts: weighted by examples, key by key."""

import pytest
import torch

from fedsplit.server.coordination.fedavg import layer_of, restrict, weighted_average


def test_average_is_weighted_by_examples():
    a, b = {"w": torch.full((2, 2), 1.0)}, {"w": torch.full((2, 2), 5.0)}
    mean = weighted_average([a, b], [1, 3])
    assert torch.allclose(mean["w"], torch.full((2, 2), 4.0))


def test_average_of_identical_states_changes_nothing():
    state = {"layers.1.q.lora_A.weight": torch.randn(4, 8), "layers.1.q.lora_B.weight": torch.randn(8, 4)}
    mean = weighted_average([state, {k: v.clone() for k, v in state.items()}], [7, 2])
    for key, value in state.items():
        assert torch.equal(mean[key], value)


def test_each_key_is_averaged_over_the_states_that_hold_it():
    p1 = {"layers.0.q.lora_A.weight": torch.ones(2), "layers.1.q.lora_A.weight": torch.ones(2)}
    p2 = {"layers.0.q.lora_A.weight": torch.full((2,), 3.0)}  # a client with one head layer fewer
    mean = weighted_average([p1, p2], [1, 1])
    assert torch.allclose(mean["layers.0.q.lora_A.weight"], torch.full((2,), 2.0))
    assert torch.allclose(mean["layers.1.q.lora_A.weight"], torch.ones(2))  # not diluted


def test_zero_weights_count_equally_and_bad_input_is_refused():
    mean = weighted_average([{"w": torch.zeros(1)}, {"w": torch.ones(1)}], [0, 0])
    assert mean["w"].item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="shape"):
        weighted_average([{"w": torch.zeros(1)}, {"w": torch.zeros(2)}], [1, 1])
    with pytest.raises(ValueError):
        weighted_average([{"w": torch.zeros(1)}], [-1])


def test_restrict_keeps_the_layers_of_a_span():
    state = {f"layers.{i}.self_attn.q_proj.lora_A.weight": torch.zeros(1) for i in range(4)}
    assert [layer_of(k) for k in restrict(state, (1, 3))] == [1, 2]
