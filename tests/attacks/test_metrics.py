"""Attack metrics on hand-computed cases."""

import math

import pytest
import torch

from fedsplit.attacks.metrics import accuracy, auc, bleu4, mean_text_scores, rouge_l, token_prf


def test_token_prf_counts_multiset_overlap():
    # overlap of {1,2,2,3} and {2,2,4} is {2,2}: P = 2/4, R = 2/3
    p, r, f1 = token_prf([1, 2, 2, 3], [2, 2, 4])
    assert p == pytest.approx(0.5)
    assert r == pytest.approx(2 / 3)
    assert f1 == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))


def test_token_prf_ignores_given_ids_on_both_sides():
    assert token_prf([0, 0, 5, 6], [0, 5, 6], ignore={0}) == (1.0, 1.0, 1.0)


def test_token_prf_averages_rows_of_a_batch():
    pred = torch.tensor([[1, 2], [3, 4]])
    true = torch.tensor([[1, 2], [5, 6]])
    assert token_prf(pred, true) == pytest.approx((0.5, 0.5, 0.5))


def test_token_prf_is_zero_for_empty_prediction():
    assert token_prf([], [1, 2]) == (0.0, 0.0, 0.0)


def test_rouge_l_is_lcs_f1_of_words():
    # LCS of 6 and 5 words is 5: P = 5/6, R = 1
    assert rouge_l("the cat sat on the mat", "The cat on the mat") == pytest.approx(10 / 11)
    assert rouge_l("completely different", "nothing shared") == 0.0
    assert rouge_l("", "x") == 0.0


def test_bleu4_hand_computed():
    assert bleu4("a b c d e", "a b c d e") == pytest.approx(1.0)
    assert bleu4("x y z", "a b c") == 0.0
    # p1 = 4/5; smoothed p2 = (3+1)/(4+1), p3 = (2+1)/(3+1), p4 = (1+1)/(2+1); equal lengths: BP = 1
    expected = (0.8 * 0.8 * 0.75 * (2 / 3)) ** 0.25
    assert bleu4("a b c d e", "a b c d f") == pytest.approx(expected)


def test_bleu4_brevity_penalty_for_short_prediction():
    # identical prefix of 2 of 4 words: p1 = 1, p2 = (1+1)/(1+1), p3 = p4 = (0+1)/(0+1); BP = exp(1 - 4/2)
    assert bleu4("a b", "a b c d") == pytest.approx(math.exp(-1))


def test_mean_text_scores_averages_pairs():
    rouge, bleu = mean_text_scores(["a b c d", "x"], ["a b c d", "y"])
    assert rouge == pytest.approx(0.5)
    assert bleu == pytest.approx(0.5)


def test_auc_binary_hand_computed():
    # positives 0.35, 0.8 vs negatives 0.1, 0.4: 3 of 4 pairs ordered right
    assert auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert auc([1, 2, 3, 4], [0, 0, 1, 1]) == 1.0
    assert auc([4, 3, 2, 1], [0, 0, 1, 1]) == 0.0


def test_auc_counts_ties_as_half():
    assert auc([1, 1, 1, 1], [0, 1, 0, 1]) == pytest.approx(0.5)


def test_auc_multiclass_is_macro_one_vs_rest():
    labels = [0, 1, 2, 0]
    perfect = torch.eye(3)[labels]
    assert auc(perfect, labels) == pytest.approx(1.0)
    # class 0 scored backwards (AUC 0), classes 1 and 2 perfect -> mean 2/3
    scores = perfect.clone()
    scores[:, 0] = torch.tensor([0.0, 1.0, 1.0, 0.0])
    assert auc(scores, labels) == pytest.approx(2 / 3)


def test_auc_is_nan_with_one_class():
    assert math.isnan(auc([0.1, 0.2], [1, 1]))


def test_accuracy():
    assert accuracy(torch.tensor([0, 1, 2, 2]), [0, 1, 1, 2]) == 0.75
