"""Label inference from gradients: synthetic separable setups and the tiny model end to end."""

import pytest
import torch

from fedsplit.attacks import (
    auc,
    evaluate_attack,
    gradient_features,
    infer_labels,
    kmeans,
    match_clusters,
    victim_gradients,
)
from fedsplit.model.loading import load_model
from fedsplit.model.split import split
from fedsplit.tasks import IGNORE_INDEX


def blobs(n_per_class: int, k: int, dim: int = 16, seed: int = 0):
    """Points around ``k`` random unit directions (cosine-separable), shuffled: (x [N, dim], labels [N])."""
    gen = torch.Generator().manual_seed(seed)
    centers = torch.nn.functional.normalize(torch.randn(k, dim, generator=gen), dim=-1)
    labels = torch.arange(k).repeat_interleave(n_per_class)
    x = centers[labels] * (1 + torch.rand(len(labels), 1, generator=gen)) + 0.1 * torch.randn(
        len(labels), dim, generator=gen
    )
    order = torch.randperm(len(labels), generator=gen)
    return x[order], labels[order]


def test_kmeans_separates_cosine_blobs():
    x, labels = blobs(30, 3)
    assign, centroids = kmeans(x, 3, seed=0)
    mapping = match_clusters(assign, labels, 3)
    assert torch.equal(mapping[assign], labels)
    assert centroids.shape == (3, 16)


def test_match_clusters_finds_the_best_permutation():
    assign = torch.tensor([0, 0, 1, 1, 2, 2])
    labels = torch.tensor([2, 2, 0, 0, 1, 0])
    assert match_clusters(assign, labels, 3).tolist() == [2, 0, 1]


def test_gradient_features_take_the_position_of_largest_norm():
    grads = torch.zeros(2, 4, 3)
    grads[0, 2] = torch.tensor([1.0, 2.0, 3.0])
    grads[1, 3] = torch.tensor([-5.0, 0.0, 0.0])
    grads[1, 0] = torch.tensor([0.1, 0.0, 0.0])
    torch.testing.assert_close(gradient_features(grads), torch.tensor([[1.0, 2.0, 3.0], [-5.0, 0.0, 0.0]]))


def test_norm_attack_separates_binary_labels_by_gradient_norm():
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (200,), generator=gen)
    # Class 1 is the one the model gets wrong more often: larger gradients.
    grads = torch.randn(200, 8, generator=gen) * (1 + 2 * labels[:, None])
    known = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1])
    known_grads = torch.randn(8, 8, generator=gen) * (1 + 2 * known[:, None])
    pred, scores = infer_labels(grads, 2, known_grads, known, method="norm")
    assert (pred == labels).float().mean() > 0.85
    assert auc(scores, labels) > 0.9


def test_norm_attack_orients_itself_when_class_0_has_larger_gradients():
    gen = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 2, (200,), generator=gen)
    grads = torch.randn(200, 8, generator=gen) * (3 - 2 * labels[:, None])
    known = torch.tensor([0, 1, 0, 1])
    known_grads = torch.randn(4, 8, generator=gen) * (3 - 2 * known[:, None])
    pred, scores = infer_labels(grads, 2, known_grads, known, method="norm")
    assert (pred == labels).float().mean() > 0.85
    assert auc(scores, labels) > 0.9


@pytest.mark.parametrize("method", ["cluster", "classifier"])
def test_direction_attacks_beat_chance_on_three_classes(method):
    x, labels = blobs(40, 3, seed=2)
    victims, victim_labels, known, known_labels = x[:100], labels[:100], x[100:], labels[100:]
    pred, scores = infer_labels(victims, 3, known, known_labels, method=method)
    assert (pred == victim_labels).float().mean() > 0.9
    assert scores.shape == (100, 3)
    assert auc(scores, victim_labels) > 0.9


def test_norm_attack_rejects_more_than_two_classes():
    with pytest.raises(ValueError, match="binary"):
        infer_labels(torch.randn(4, 3), 3, torch.randn(3, 3), torch.tensor([0, 1, 2]), method="norm")


def test_victim_gradients_are_the_grad_of_the_tail_input(tiny):
    model, _ = tiny
    parts = split(model, 1, 1)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 250, (3, 6), generator=gen)
    pad = torch.tensor([0, 2, 1])
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, -1] = ids[:, -1]
    grads = victim_gradients(
        parts.head, parts.body, parts.tail, ids, labels, pad, batch_size=2, progress=False
    )
    assert grads.shape == (3, 6, model.config.hidden_size)
    # Only the position predicting the answer (and those before it) get gradient; the answer itself none.
    assert torch.all(grads[:, -1] == 0)
    assert torch.all(grads[:, -2].norm(dim=-1) > 0)
    assert all(p.grad is None for p in model.parameters())


def test_label_attack_beats_chance_on_the_tiny_model():
    result = evaluate_attack("label", spec="tiny-llama", head_layers=1, n=48, progress=False)
    row = result.as_dict()
    assert row["label_accuracy"] > 1 / 3 + 0.15
    assert row["auc"] > 0.6
    assert "token_f1" not in row


def test_strong_gradient_noise_lowers_label_auc():
    kwargs = dict(spec="tiny-llama", head_layers=1, n=48, progress=False)
    clean = evaluate_attack("label", **kwargs).auc
    noisy = evaluate_attack("label", grad_defense_spec="gaussian:100:relative", **kwargs).auc
    assert noisy < clean - 0.15


def test_norm_attack_on_binary_sentiment_with_the_tiny_model():
    result = evaluate_attack(
        "label",
        spec="tiny-llama",
        head_layers=1,
        n=32,
        label_binary=True,
        label_method="norm",
        progress=False,
    )
    assert result.n == 32
    assert result.label_accuracy > 0.65
    assert result.auc > 0.7


def test_victim_gradients_of_a_bf16_model_come_back_in_fp32_on_the_cpu():
    model, _ = load_model("tiny-llama", dtype=torch.bfloat16)
    parts = split(model, 1, 1)
    ids = torch.randint(10, 250, (2, 5), generator=torch.Generator().manual_seed(0))
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, -1] = ids[:, -1]
    grads = victim_gradients(
        parts.head, parts.body, parts.tail, ids, labels, torch.tensor([0, 1]), progress=False
    )
    assert (grads.dtype, grads.device.type) == (torch.float32, "cpu")
    assert torch.all(grads[:, -2].norm(dim=-1) > 0)
