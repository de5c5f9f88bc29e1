"""`fedsplit bench privacy --after-finetune --labels` on the tiny model: fine-tune over gRPC, capture the
gradients at the server, attack the labels, resume."""

import json

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from fedsplit.attacks.label import evaluate_label_attack
from fedsplit.bench import label_finetune as lf
from fedsplit.bench import privacy_finetune as ft
from fedsplit.bench.config import PrivacyBenchConfig
from fedsplit.cli.main import app
from fedsplit.privacy import parse_grad_defense

TINY = ft.Budget(steps=4, batch_size=4, max_length=64, eval_examples=8)


def cfg_for(tmp_path, **kwargs):
    return PrivacyBenchConfig(
        model="tiny-llama", after_finetune=True, labels=True, out=str(tmp_path), **kwargs
    )


def test_sweep_writes_rows_tables_and_json_and_resumes(tmp_path, monkeypatch):
    cfg = cfg_for(tmp_path)
    jobs = (("sentiment", 1, "none", "none"), ("sentiment", 1, "gaussian:1:relative", "none"))
    grid = lf.LabelGrid(TINY, jobs, known_labels=2)
    summary = lf.sweep(cfg, progress=False, grid=grid)
    rows = {r["grad_defense"]: r for r in summary["rows"]}
    assert set(rows) == {"none", "gaussian:1:relative"}
    for row in rows.values():
        assert row["metric"] == "accuracy" and 0.0 <= row["value"] <= 1.0
        assert row["gradients"] == TINY.steps * TINY.batch_size == row["known"] + row["scored"]
        assert row["known"] <= 2 * row["classes"]
        assert 0.0 <= row["label_accuracy"] <= 1.0 and 0.0 < row["chance"] <= 1.0
        assert row["label_accuracy"] == max(row["all"].values())
        assert row["attack"] in row["all"] and row["budget"]["known_labels"] == 2
    assert (tmp_path / "runs" / "labels-sentiment-p1-none-none").is_dir()
    assert rows["none"]["cost_points"] == 0.0 and rows["none"]["grad_cosine"] == 1.0
    noisy = rows["gaussian:1:relative"]
    assert noisy["cost_points"] == pytest.approx(100 * (rows["none"]["value"] - noisy["value"]), abs=0.01)
    # undefended, the label is read off the gradients; noise 1x the largest token norm per coordinate
    # leaves the sent gradient nearly orthogonal to the clean one
    assert rows["none"]["label_accuracy"] > rows["none"]["chance"]
    assert noisy["grad_cosine"] < 0.2
    table = (tmp_path / "labels.md").read_text()
    assert "| sentiment | 1 | `gaussian:1:relative` | `none` |" in table
    assert json.loads((tmp_path / "labels.json").read_text())["rows"] == summary["rows"]

    # a second run skips the finished rows
    def refuse(*args, **kwargs):
        raise AssertionError("a finished configuration ran again")

    monkeypatch.setattr(lf, "run_job", refuse)
    again = lf.sweep(cfg, progress=False, grid=grid)
    assert [r["key"] for r in again["rows"]] == [r["key"] for r in summary["rows"]]
    assert len((tmp_path / "labels.jsonl").read_text().splitlines()) == 2


def test_the_server_captures_the_gradients_sent_after_the_gradient_defence(tmp_path):
    cfg = cfg_for(tmp_path)
    capture = lf.GradientCapture(cfg)
    budget = ft.Budget(steps=2, batch_size=2, max_length=64, eval_examples=4)
    captured, clean = {}, {}
    try:
        for spec in ("none", "gaussian:1:relative"):
            defense, before = parse_grad_defense(spec), []

            def configure(client, defense=defense, before=before):
                def grad_defense(grad):
                    before.append(grad.detach().float().cpu())
                    return defense(grad) if defense is not None else grad

                client.grad_defense = grad_defense

            capture.grads.clear()
            _, client, _, _ = ft.fine_tune(
                ("sentiment", 1, "none"),
                cfg,
                budget,
                tmp_path / spec,
                False,
                server=capture.server.address,
                configure=configure,
            )
            client.train_session.close()
            client.transport.close()
            captured[spec], clean[spec] = list(capture.grads), before
    finally:
        capture.close()

    def cosines(spec):
        assert [g.shape for g in captured[spec]] == [g.shape for g in clean[spec]]
        return [
            float(F.cosine_similarity(a.flatten(), b.flatten(), 0))
            for a, b in zip(captured[spec], clean[spec])
        ]

    assert len(captured["none"]) == budget.steps
    assert min(cosines("none")) > 0.999  # what the client computed, through the fp16 wire
    assert max(cosines("gaussian:1:relative")) < 0.2  # the server never sees the clean gradient


def toy_gradients(labels, noise, seed=0, batch=4, width=6, hidden=16):
    """Per-step ``[B, T, H]`` gradients: zero but at the answer column (the last but one), where each
    class points its own way; plus Gaussian ``noise`` everywhere."""
    gen = torch.Generator().manual_seed(seed)
    directions = torch.randn(3, hidden, generator=gen)
    grads = []
    for start in range(0, len(labels), batch):
        rows = labels[start : start + batch]
        g = torch.zeros(len(rows), width, hidden)
        g[:, -2] = directions[rows] + 0.1 * torch.randn(len(rows), hidden, generator=gen)
        grads.append(g + noise * torch.randn(g.shape, generator=gen))
    return grads


def test_the_attack_beats_chance_on_separable_gradients_and_noise_brings_it_down():
    labels = torch.tensor([0] * 24 + [1] * 12 + [2] * 12)[
        torch.randperm(48, generator=torch.Generator().manual_seed(1))
    ]
    clean = lf.attack_labels(lf.label_features(toy_gradients(labels, 0.0)), labels, 3, 4, seed=0)
    assert clean["known"] == 12 and clean["scored"] == 36
    assert clean["chance"] == pytest.approx(20 / 36)  # the majority class among the scored
    assert clean["label_accuracy"] == 1.0 and clean["label_accuracy"] > clean["chance"]
    drowned = lf.attack_labels(lf.label_features(toy_gradients(labels, 30.0)), labels, 3, 4, seed=0)
    assert drowned["label_accuracy"] < 0.8


def test_the_batch_column_view_finds_the_answer_through_noise_on_single_rows():
    labels = torch.tensor([0, 1, 2, 0] * 6)
    grads = toy_gradients(labels, 0.0)
    for g in grads:  # one loud coordinate elsewhere in one row: that row's argmax moves, the column does not
        g[0, 1, 0] = 8.0
    feats = lf.label_features(grads)
    assert torch.equal(feats["column"], torch.cat([g[:, -2] for g in grads]))
    assert not torch.equal(feats["argmax"], feats["column"])


def test_the_known_labels_match_the_label_attacks_and_never_are_scored():
    assert lf.KNOWN_LABELS == 8 == lf.FULL_GRID.known_labels
    assert lf.KNOWN_LABELS == evaluate_label_attack.__kwdefaults__["known_labels"]
    labels = torch.tensor([0] * 10 + [1] * 3 + [2] * 20)
    known, scored = lf.known_split(labels, 3, 8, seed=0)
    assert torch.bincount(labels[known], minlength=3).tolist() == [8, 3, 8]
    assert set(known.tolist()).isdisjoint(scored.tolist()) and len(known) + len(scored) == len(labels)


def test_grad_configurations_parse_and_bad_ones_are_refused():
    assert lf.parse_grad_configs("none; gaussian:0.3:relative@textdx:4+bypass;gaussian:1", "sentiment") == (
        ("sentiment", 2, "none", "none"),
        ("sentiment", 2, "gaussian:0.3:relative", "textdx:4+bypass"),
        ("sentiment", 2, "gaussian:1", "none"),
    )
    with pytest.raises(ValueError, match="gradient-defence spec"):
        lf.parse_grad_configs("laplace:1", "sentiment")
    with pytest.raises(ValueError, match="defence spec"):
        lf.parse_grad_configs("none@nonsense:1", "sentiment")
    with pytest.raises(ValueError, match="no configuration"):
        lf.parse_grad_configs(" ; ", "sentiment")
    grid = lf.grid_for(PrivacyBenchConfig(after_finetune=True, labels=True, quick=True, steps=3))
    assert grid.budget.steps == 3 and grid.jobs[0] == ("sentiment", 2, "none", "none")


def test_the_cost_and_target_compare_with_the_undefended_fine_tune():
    def row(grad, defense, value, attack, chance=0.4):
        return {
            "key": f"{grad}@{defense}",
            "task": "t",
            "head_layers": 2,
            "grad_defense": grad,
            "defense": defense,
            "value": value,
            "label_accuracy": attack,
            "chance": chance,
        }

    rows = [
        row("none", "none", 0.50, 1.0),
        row("a", "none", 0.495, 0.42),  # passes
        row("b", "none", 0.48, 0.40),  # costs 2 points
        row("c", "none", 0.50, 0.60),  # the attack still well above chance
        row("none", "textdx:4", 0.45, 1.0),  # no gradient defence: not a label defence
    ]
    assert [r["cost_points"] for r in lf.with_costs(rows)] == [0.0, 0.5, 2.0, 0.0, 5.0]
    assert lf.target_rows(rows) == ["a@none"]


def test_the_cli_refuses_labels_without_after_finetune_and_bad_grad_configs(tmp_path):
    runner = CliRunner()
    for args in (
        ["--labels"],
        ["--after-finetune", "--labels", "--grad-configs", "laplace:1"],
        ["--after-finetune", "--grad-configs", "none"],  # ignored without --labels: refused instead
    ):
        result = runner.invoke(
            app, ["bench", "privacy", "--model", "tiny-llama", "--out", str(tmp_path), *args]
        )
        assert result.exit_code != 0 and "error:" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "labels.jsonl").exists()
