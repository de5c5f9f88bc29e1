"""`fedsplit bench privacy --after-finetune` on the tiny model: fine-tune, capture over gRPC, tiers, resume."""

import json

import pytest
import torch

from fedsplit.attacks.tiers import TierConfig
from fedsplit.bench import privacy_finetune as ft
from fedsplit.bench.config import PrivacyBenchConfig
from fedsplit.client.config import TrainConfig
from fedsplit.client.train import build_client

TINY = ft.Budget(
    attacks_at=(),
    steps=2,
    batch_size=2,
    max_length=64,
    eval_examples=8,
    victims=8,
    known=4,
    public_texts=32,
    attacks=("probe", "nearest"),
    tiers=TierConfig(probe_steps=20, finetune_steps=5),
)


def test_sweep_writes_rows_tables_and_plot_and_resumes(tmp_path, monkeypatch):
    cfg = PrivacyBenchConfig(model="tiny-llama", after_finetune=True, out=str(tmp_path))
    grid = ft.Grid(TINY, (("sentiment", 1, "none"), ("sentiment", 1, "gaussian:30:relative")))
    summary = ft.sweep(cfg, progress=False, grid=grid)
    rows = {r["defense"]: r for r in summary["rows"]}
    assert set(rows) == {"none", "gaussian:30:relative"}
    for row in rows.values():
        assert row["metric"] == "accuracy" and 0.0 <= row["value"] <= 1.0
        assert set(row["tiers"]) == {"public", "known-plaintext", "oracle"}
        f1 = [row["tiers"][t]["token_f1"] for t in ("public", "known-plaintext", "oracle")]
        assert f1 == sorted(f1), "a tier's strongest attack counts the tiers below it"
        assert row["victims"] == 8 and row["known_pairs"] == 4
        assert (tmp_path / "runs").is_dir()
    assert rows["none"]["cost_points"] == 0.0
    assert rows["gaussian:30:relative"]["cost_points"] == pytest.approx(
        100 * (rows["none"]["value"] - rows["gaussian:30:relative"]["value"]), abs=0.01
    )
    # undefended, the tiny model's head is nearly invertible; 30x noise hides most of it
    assert rows["none"]["tiers"]["public"]["token_f1"] > 0.5
    assert (
        rows["gaussian:30:relative"]["tiers"]["public"]["token_f1"]
        < rows["none"]["tiers"]["public"]["token_f1"]
    )
    table = (tmp_path / "privacy_ft.md").read_text()
    assert "| sentiment | 1 | `gaussian:30:relative` |" in table
    assert json.loads((tmp_path / "privacy_ft.json").read_text())["rows"] == summary["rows"]
    assert (tmp_path / "frontier.png").stat().st_size > 1000

    # a second run skips the finished rows
    def refuse(*args, **kwargs):
        raise AssertionError("a finished configuration ran again")

    monkeypatch.setattr(ft, "run_job", refuse)
    again = ft.sweep(cfg, progress=False, grid=grid)
    assert [r["key"] for r in again["rows"]] == [r["key"] for r in summary["rows"]]
    assert len((tmp_path / "rows.jsonl").read_text().splitlines()) == 2


def test_capture_records_at_the_server_exactly_what_the_client_sends():
    cfg = PrivacyBenchConfig(model="tiny-llama", after_finetune=True)
    capture = ft.Capture(cfg)
    try:
        client = build_client(TrainConfig(model="tiny-llama", head_layers=1, tail_layers=1, defense="none"))
        ids = torch.randint(5, 200, (5, 7))
        pad = torch.tensor([0, 2, 0, 3, 1])
        got, got_pad = capture.sent_states(client, ids, pad, wire_dtype="fp32", batch=2)
        with torch.no_grad():
            want = client.send(client.run_head(ids, pad), pad)
        assert torch.equal(got_pad, pad)
        real = torch.arange(7)[None] >= pad[:, None]
        torch.testing.assert_close(got[real], want[real].float())
    finally:
        capture.close()


def test_configurations_parse_and_bad_ones_are_refused():
    assert ft.parse_configs("2:none; 4:adv:1,noise=1+bypass", "sentiment") == (
        ("sentiment", 2, "none"),
        ("sentiment", 4, "adv:1,noise=1+bypass"),
    )
    with pytest.raises(ValueError, match="P:SPEC"):
        ft.parse_configs("adv:1", "sentiment")


def test_the_target_needs_both_tiers_low_and_the_cost_within_a_point():
    def row(defense, value, public, known):
        tiers = {"public": {"token_f1": public}, "known-plaintext": {"token_f1": known}}
        return {
            "key": defense,
            "task": "t",
            "head_layers": 2,
            "defense": defense,
            "value": value,
            "tiers": tiers,
        }

    rows = [
        row("none", 0.80, 0.9, 0.95),
        row("a", 0.795, 0.1, 0.15),  # passes
        row("b", 0.78, 0.1, 0.1),  # costs 2 points
        row("c", 0.80, 0.1, 0.3),  # known-plaintext too high
    ]
    assert ft.target_rows(rows) == ["a"]


def test_epsilon_is_reported_where_the_mechanism_has_one():
    from fedsplit.model.split import load_part
    from fedsplit.privacy import parse_defense

    table = load_part("tiny-llama", "head", head_layers=1, tail_layers=0).embed_tokens.weight.detach()

    def eps(spec):
        return ft.epsilon_of(parse_defense(spec, hidden_size=64, embedding=table))

    assert eps("textdx:4+bypass") == "4·d per token (metric DP)"
    assert eps("dx:20") == "20·d per vector (metric DP)"
    assert eps("dp:clip=50,sigma=0.05").endswith("-DP per vector")
    assert eps("gaussian:1:relative+bypass") == "" and ft.epsilon_of(None) == ""
