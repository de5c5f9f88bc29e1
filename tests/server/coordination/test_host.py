"""The coordinators' side of the servicer: the BodyHost interface, and nothing behind it."""

import ast
import asyncio
from pathlib import Path

import pytest

import fedsplit.server.coordination as coordination
from fedsplit.server.config import ServerConfig
from fedsplit.server.coordination.base import BodyHost
from fedsplit.server.coordination.factory import make_coordinator

HOST_MEMBERS = ("body", "pool", "config", "sessions", "run", "submit")


def test_the_body_host_interface_names_exactly_what_coordinators_may_use():
    declared = {name for name in vars(BodyHost) if not name.startswith("_")}
    assert declared == set(HOST_MEMBERS)


@pytest.mark.parametrize("mode", ["independent", "sequential", "client-batch", "server-hierarchical"])
def test_the_servicer_offers_every_member_of_the_body_host_interface(make_servicer, mode):
    servicer = make_servicer(mode)
    for name in HOST_MEMBERS:
        assert hasattr(servicer, name), name
    assert servicer.coordinator.host is servicer


# peft's LoRA layer switches (AdapterPool.activate, .rows) and torch's in-place version counter
# (BodySession: has a shared adapter stepped since the forward?), used knowingly.
THIRD_PARTY = {"_disable_adapters", "_active_adapter", "_version"}


def _private_uses(path: Path) -> list[str]:
    """``x._name`` where ``x`` is not ``self`` or ``cls``: a reach into another object's insides."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Attribute) or node.attr in THIRD_PARTY:
            continue
        private = node.attr.startswith("_") and not node.attr.startswith("__")
        own = isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")
        if private and not own:
            found.append(f"{path.name}:{node.lineno} .{node.attr}")
    return found


def test_no_server_module_uses_a_private_member_of_another_object():
    package = Path(coordination.__file__).parent.parent
    files = sorted(package.glob("*.py")) + sorted((package / "coordination").glob("*.py"))
    assert [use for path in files for use in _private_uses(path)] == []


def test_run_on_the_body_worker_returns_the_result_of_the_call(make_servicer):
    servicer = make_servicer("independent")
    assert asyncio.run(servicer.run(lambda a, b: a + b, 2, 3)) == 5


def test_an_unknown_mode_is_refused_with_the_list_of_modes():
    class Host:
        config = ServerConfig(mode="gossip")

    with pytest.raises(ValueError, match="independent, sequential, client-batch, server-hierarchical"):
        make_coordinator(Host())


@pytest.mark.parametrize(
    "mode, sync_every, fedavg_every, period",
    [
        ("server-hierarchical", 4, 0, 4),  # heads and tails follow the body sync
        ("server-hierarchical", 4, 2, 2),  # an explicit period wins
        ("server-hierarchical", 0, 0, 0),
        ("client-batch", 4, 0, 0),  # sync_every is the replicas' setting only
        ("sequential", 0, 5, 5),
    ],
)
def test_fedavg_period_follows_sync_every_only_for_server_hierarchical(
    mode, sync_every, fedavg_every, period
):
    config = ServerConfig(mode=mode, sync_every=sync_every, fedavg_every=fedavg_every)
    assert config.fedavg_period() == period


def test_the_coordinator_announces_the_fedavg_period_of_the_config(make_servicer):
    servicer = make_servicer("server-hierarchical", sync_every=3)
    assert servicer.coordinator.describe()["fedavg_every"] == 3
    assert servicer.info().fedavg_every == 3
