"""MID: the variational information bottleneck with a KL term."""

import torch

from fedsplit.privacy import MIDDefense


def test_output_shape_equals_input_shape(hidden):
    mid = MIDDefense(hidden_size=32, bottleneck_dim=8)
    assert mid(hidden).shape == hidden.shape


def test_extra_loss_is_none_before_forward_then_positive():
    mid = MIDDefense(hidden_size=32, bottleneck_dim=8, beta=0.1)
    assert mid.extra_loss() is None
    mid(torch.randn(2, 5, 32))
    loss = mid.extra_loss()
    assert loss.dim() == 0 and loss.item() > 0


def test_extra_loss_is_differentiable_wrt_the_encoder(hidden):
    mid = MIDDefense(hidden_size=32, bottleneck_dim=8, beta=0.1)
    mid(hidden)
    mid.extra_loss().backward()
    assert mid.encoder.weight.grad is not None and mid.encoder.weight.grad.abs().sum() > 0


def test_task_loss_trains_encoder_and_decoder(hidden):
    mid = MIDDefense(hidden_size=32, bottleneck_dim=8)
    h = hidden.clone().requires_grad_(True)
    out = mid(h)
    (out.pow(2).mean() + mid.extra_loss()).backward()
    assert all(p.grad is not None for p in mid.parameters())
    assert h.grad is not None


def test_extra_loss_scales_with_beta(hidden):
    torch.manual_seed(0)
    a = MIDDefense(32, 8, beta=0.1)
    b = MIDDefense(32, 8, beta=0.2)
    b.load_state_dict(a.state_dict())
    a.eval()(hidden)
    b.eval()(hidden)
    assert torch.allclose(b.extra_loss(), 2 * a.extra_loss())


def test_eval_mode_is_deterministic_and_training_mode_samples(hidden):
    mid = MIDDefense(32, 8)
    mid.eval()
    assert torch.equal(mid(hidden), mid(hidden))
    mid.train()
    assert not torch.equal(mid(hidden), mid(hidden))


def test_training_mode_is_reproducible_under_manual_seed(hidden):
    torch.manual_seed(1)
    mid = MIDDefense(32, 8)
    torch.manual_seed(2)
    a = mid(hidden)
    torch.manual_seed(2)
    assert torch.equal(mid(hidden), a)


def test_parameters_are_exposed_for_the_clients_optimiser():
    mid = MIDDefense(hidden_size=32, bottleneck_dim=8)
    shapes = sorted(tuple(p.shape) for p in mid.parameters())
    assert shapes == sorted([(16, 32), (16,), (32, 8), (32,)])
    assert mid.privacy_spent(10) is None
