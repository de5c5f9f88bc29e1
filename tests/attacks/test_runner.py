"""End-to-end attack runs on the tiny model, and the helpers around them."""

import pytest
import torch

from fedsplit.attacks import (
    ATTACKS,
    AttackResult,
    encode_texts,
    evaluate_attack,
    run_inversion,
    token_batches,
)

TOKEN_KEYS = {
    "attack",
    "defense",
    "head_layers",
    "n",
    "token_precision",
    "token_recall",
    "token_f1",
    "rougeL",
    "bleu4",
    "seconds",
}


def test_attack_names_are_the_public_ones():
    assert ATTACKS == ("vmi", "relaxation", "learned", "nearest", "label")


def test_nearest_end_to_end_recovers_the_victim_text_at_p0():
    result = evaluate_attack("nearest", spec="tiny-llama", head_layers=0, n=8, progress=False)
    row = result.as_dict()
    assert TOKEN_KEYS <= set(row)
    assert "label_accuracy" not in row
    assert row["token_f1"] == 1.0 and row["rougeL"] == 1.0 and row["bleu4"] == pytest.approx(1.0)
    assert row["defense"] == "none" and row["n"] == 8
    assert result.samples and result.samples[0][0] == result.samples[0][1]


def test_defence_end_to_end_lowers_nearest_f1():
    kwargs = dict(spec="tiny-llama", head_layers=0, n=8, progress=False)
    noisy = evaluate_attack("nearest", defense_spec="gaussian:5.0:relative", **kwargs)
    assert noisy.defense == "gaussian:5.0:relative"
    assert noisy.token_f1 < 0.5


def test_vmi_end_to_end_quick_run_beats_chance():
    result = evaluate_attack("vmi", spec="tiny-llama", head_layers=1, n=8, quick=True, progress=False)
    assert result.token_f1 > 0.6


def test_learned_end_to_end_quick_run_beats_chance():
    result = evaluate_attack(
        "learned",
        spec="tiny-llama",
        head_layers=1,
        n=8,
        quick=True,
        steps=40,
        aux_examples=64,
        progress=False,
    )
    assert result.token_f1 > 0.3


def test_unknown_attack_is_rejected_with_the_choices():
    with pytest.raises(ValueError, match="vmi"):
        evaluate_attack("telepathy", spec="tiny-llama")


def test_learned_without_an_inverter_is_rejected(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="train_inverter"):
        run_inversion("learned", model, torch.zeros(1, 2, 64), torch.zeros(1, dtype=torch.long))


def test_encode_texts_left_pads_truncates_and_marks_the_scored_tokens(tiny):
    _, tokenizer = tiny
    ids, pad, score = encode_texts(tokenizer, ["abcdef", "ab"], max_tokens=4)
    assert ids.shape == (2, 4)
    assert pad.tolist() == [0, 2]
    assert score.tolist() == [[True] * 4, [False, False, True, True]]
    assert tokenizer.decode(ids[0]) == "abcd"


def test_encode_texts_with_chat_template_scores_only_the_text(tiny):
    _, tokenizer = tiny
    ids, pad, score = encode_texts(tokenizer, ["hi"], max_tokens=8, chat=True)
    assert score.sum() == 2
    assert tokenizer.decode(ids[0][score[0]]) == "hi"
    assert tokenizer.decode(ids[0][~score[0]]).startswith("<|im_start|>user")


def test_token_batches_trim_pad_columns_and_keep_every_row():
    ids = torch.arange(12).view(3, 4)
    pad = torch.tensor([2, 0, 3])
    batches = token_batches(ids, pad, batch_size=2)
    assert sum(len(p) for _, p in batches) == 3
    first_ids, first_pad = batches[0]  # rows with 3 and 2 pads: one all-pad column dropped
    assert first_ids.shape == (2, 2) and first_pad.tolist() == [1, 0]


def test_attack_result_as_dict_drops_unset_scores():
    row = AttackResult("label", "none", 1, 10, 1.5, label_accuracy=0.5, auc=0.6).as_dict()
    assert row["label_accuracy"] == 0.5 and "token_f1" not in row and "samples" not in row


def test_an_attack_runs_on_a_bf16_model_and_scores_on_the_cpu():
    result = evaluate_attack("nearest", spec="tiny-llama", head_layers=0, n=8, progress=False, dtype="bf16")
    assert result.n == 8 and result.token_f1 > 0.9  # p = 0: the embedding rows survive bf16 rounding


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("attack", ["vmi", "learned"])
def test_inversion_attacks_run_with_victim_and_attacker_on_cuda(attack):
    kwargs = dict(spec="tiny-llama", head_layers=1, n=8, quick=True, progress=False)
    on_cpu = evaluate_attack(attack, device="cpu", dtype="fp32", **kwargs)
    on_gpu = evaluate_attack(attack, device="cuda", dtype="fp32", **kwargs)
    assert on_gpu.token_f1 > on_cpu.token_f1 - 0.2  # the same attack, on other hardware
