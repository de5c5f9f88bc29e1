"""One defence option everywhere hidden states leave: train, eval, generate and the API; trained
defence state saved with a run and picked up with it; the default defence; the undefended warning."""

import logging
import shutil
from dataclasses import asdict

import pytest
import torch

from fedsplit.client.api import SplitModelForCausalLM
from fedsplit.client.config import EvalConfig, TrainConfig
from fedsplit.client.train import (
    build_client,
    build_eval_client,
    defense_option_for_run,
    load_run_adapters,
    run_defense_spec,
    save_run,
)
from fedsplit.privacy import GaussianDefense, defaults
from fedsplit.wire.protocol import SessionConfig

ADV = "adv:0.1,rank=4,buckets=64"  # canonical: defaults left out, as the defence's name writes it
TINY = {"model": "tiny-llama", "head_layers": 1, "tail_layers": 1, "device": "cpu"}


def batches(n):
    for step in range(n):
        gen = torch.Generator().manual_seed(42 + step)
        ids = torch.randint(10, 250, (3, 10), generator=gen)
        pad = torch.tensor([0, 2, 5])
        ids[1, :2], ids[2, :5] = 0, 0
        labels = ids.masked_fill(torch.arange(10)[None] <= (pad[:, None] + 3), -100)
        yield {"input_ids": ids, "labels": labels, "pad_lengths": pad}


@pytest.fixture(scope="module")
def adv_run(tmp_path_factory):
    """A split run trained three steps with an ``adv`` defence, saved by save_run: (folder, defence state)."""
    out = tmp_path_factory.mktemp("adv-run")
    cfg = TrainConfig(**TINY, defense=ADV, out=str(out), seed=1)
    client = build_client(cfg)
    client.start_training(
        SessionConfig(span=client.span, mode="train", lora=cfg.lora, lr=1e-2, seed=1), lr=1e-2
    )
    for batch in batches(3):
        client.train_step(batch)
    save_run(client, cfg, {"config": asdict(cfg)})
    state = {k: v.detach().clone() for k, v in client.defense.state_dict().items()}
    assert state["adapter_up.weight"].abs().sum() > 0  # trained: no longer the zero initialisation
    return out, state


def same_state(defense, state) -> bool:
    got = defense.state_dict()
    return got.keys() == state.keys() and all(torch.equal(got[k], state[k]) for k in state)


def test_a_trained_adv_defense_round_trips_through_save_run_and_load_run_adapters(adv_run):
    run, state = adv_run
    assert (run / "defense" / "defense.safetensors").exists()
    assert run_defense_spec(run) == ADV
    assert defense_option_for_run(None, run) == ADV  # no --defense: the run's own
    client = build_client(TrainConfig(**TINY, defense=defense_option_for_run(None, run)), lora=False)
    assert not same_state(client.defense, state)  # a fresh defence
    load_run_adapters(client, run)
    assert same_state(client.defense, state)


def test_another_defense_than_the_runs_does_not_load_its_weights_and_says_so(adv_run, caplog):
    run, state = adv_run
    assert defense_option_for_run("adv:0.2,rank=4,buckets=64", run) == "adv:0.2,rank=4,buckets=64"
    client = build_client(TrainConfig(**TINY, defense="adv:0.2,rank=4,buckets=64"), lora=False)
    with caplog.at_level(logging.WARNING, logger="fedsplit.client.train"):
        load_run_adapters(client, run)
    assert not same_state(client.defense, state)
    assert "trained defence weights are not used" in caplog.text


def test_the_api_takes_the_runs_defense_a_spec_or_a_module(adv_run):
    run, state = adv_run
    lm = SplitModelForCausalLM.from_pretrained("tiny-llama", head_layers=1, tail_layers=1, adapters=run)
    assert lm.client.defense.name == ADV and same_state(lm.client.defense, state)
    assert not lm.client.defense.training  # generation
    lm = SplitModelForCausalLM.from_pretrained(
        "tiny-llama", head_layers=1, tail_layers=1, adapters=run, defense=ADV.replace("0.1", "0.10")
    )
    assert same_state(lm.client.defense, state)  # the same defence, written differently
    module = GaussianDefense(std=0.5)
    lm = SplitModelForCausalLM.from_pretrained("tiny-llama", None, 1, 1, None, None, "fp16", module)
    assert lm.client.defense is module  # positional, as before
    lm = SplitModelForCausalLM.from_pretrained("tiny-llama", head_layers=1, tail_layers=1, defense="none")
    assert lm.client.defense is None


def test_eval_with_a_run_uses_its_trained_defense_unless_told_otherwise(adv_run):
    run, state = adv_run
    client = build_eval_client(EvalConfig(**TINY, adapters=str(run)))
    assert client.defense.name == ADV and same_state(client.defense, state)
    client = build_eval_client(EvalConfig(**TINY, adapters=str(run), defense="none"))
    assert client.defense is None


def test_the_default_defense_applies_to_train_generate_and_eval_and_none_turns_it_off(adv_run, monkeypatch):
    monkeypatch.setattr(defaults, "DEFAULT_DEFENSE", "gaussian:0.1:relative")
    assert build_client(TrainConfig(**TINY), lora=False).defense.name == "gaussian:0.1:relative"
    assert build_client(TrainConfig(**TINY, defense="none"), lora=False).defense is None
    assert build_client(TrainConfig(**TINY, noise=0.3), lora=False).defense.name == "gaussian:0.3"
    assert build_client(TrainConfig(**TINY, centralized=True), lora=False).defense is None

    lm = SplitModelForCausalLM.from_pretrained("tiny-llama", head_layers=1, tail_layers=1)
    assert lm.client.defense.name == "gaussian:0.1:relative"
    lm = SplitModelForCausalLM.from_pretrained("tiny-llama", head_layers=1, tail_layers=1, defense="none")
    assert lm.client.defense is None

    # a run that records no defence (adapters only): the default; "none": none
    run, _ = adv_run
    bare = run.parent / "bare-run"
    shutil.copytree(run, bare)
    shutil.rmtree(bare / "defense")
    (bare / "summary.json").unlink()
    assert build_eval_client(EvalConfig(**TINY, adapters=str(bare))).defense.name == "gaussian:0.1:relative"
    assert build_eval_client(EvalConfig(**TINY, adapters=str(bare), defense="none")).defense is None
    assert EvalConfig(**TINY, server="host:1").train_config().defense_spec() == "gaussian:0.1:relative"
    assert EvalConfig(**TINY, server="host:1", defense="none").train_config().defense_spec() is None
    assert EvalConfig(**TINY).train_config().centralized  # unsplit: nothing leaves, no defence


def test_an_undefended_split_client_warns_once_per_process(monkeypatch, caplog):
    monkeypatch.setattr(defaults, "_warned", False)
    with caplog.at_level(logging.WARNING, logger="fedsplit.privacy"):
        build_client(TrainConfig(**TINY, centralized=True), lora=False)  # sends nothing: no warning
        build_client(TrainConfig(**TINY, defense="gaussian:0.1"), lora=False)  # defended: no warning
        assert not [r for r in caplog.records if r.name == "fedsplit.privacy"]
        build_client(TrainConfig(**TINY, defense="none"), lora=False)
        SplitModelForCausalLM.from_pretrained("tiny-llama", head_layers=1, tail_layers=1, defense="none")
    records = [r for r in caplog.records if r.name == "fedsplit.privacy"]
    assert len(records) == 1 and records[0].levelno == logging.WARNING
    message = records[0].getMessage()
    assert (
        "undefended" in message and "p=2 (the nearest measured to p=1)" in message and "--defense" in message
    )
    measured = f"{defaults.UNDEFENDED_F1[2]:.0%}"
    assert f"at p=2 a curious server's strongest public attack recovers about {measured} of the tokens" in (
        defaults.undefended_message(2)
    )
    assert f"about {defaults.UNDEFENDED_F1[4]:.0%}" in defaults.undefended_message(5)  # a tie: shallower
    assert "at p=6 (the nearest measured to p=7) a curious" in defaults.undefended_message(7)


def test_resolve_defense_spec(monkeypatch):
    monkeypatch.setattr(defaults, "DEFAULT_DEFENSE", "dx:50")
    assert defaults.resolve_defense_spec(None) == "dx:50"
    assert defaults.resolve_defense_spec("None") is None
    assert defaults.resolve_defense_spec("gaussian:1") == "gaussian:1"
