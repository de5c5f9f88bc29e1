"""The client side of federated training: a remote transport that joins rounds, and head/tail FedAvg.

:class:`FederatedTransport` is a :class:`~fedsplit.client.remote.RemoteTransport` whose
training sessions send their ``loss_weight`` with each backward (client-batch mode
weights the round's gradients by it) and which can take part in head/tail FedAvg
rounds through the ``Adapters`` RPC. :func:`train_federated` is the per-client loop.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable

import torch

from ..model.lora import load_lora_state_dict, lora_state_dict
from ..wire import codec
from ..wire import fedsplit_pb2 as pb
from .core import SplitClient
from .remote import RemoteSession, RemoteTransport

log = logging.getLogger(__name__)

MODE_NAMES = {
    pb.FEDERATION_MODE_UNSPECIFIED: "independent",
    pb.SEQUENTIAL: "sequential",
    pb.CLIENT_BATCH: "client-batch",
    pb.SERVER_HIERARCHICAL: "server-hierarchical",
}


class FederatedSession(RemoteSession):
    """A remote training session whose backward carries this step's ``loss_weight``."""

    loss_weight: float | None = None

    def backward(self, step_id: int, grad: torch.Tensor) -> torch.Tensor:
        request = pb.Backward(step_id=step_id, grad=codec.encode_tensor(grad, self.transport.wire_dtype))
        if self.loss_weight is not None:
            request.loss_weight = float(self.loss_weight)
        reply = self._request(pb.ClientMessage(backward=request))
        return codec.decode_tensor(reply.backward_result.grad, out_dtype=grad.dtype)


class FederatedTransport(RemoteTransport):
    """Sessions that take part in the server's training mode, plus head/tail FedAvg rounds."""

    def open(self, config, resume: str | None = None) -> FederatedSession:
        return self._retry(lambda: FederatedSession(self, config, resume))

    def fedavg(
        self,
        round_no: int,
        state: dict[str, torch.Tensor],
        num_examples: int,
        client_id: str | None = None,
        timeout: float = 600.0,
    ) -> tuple[dict[str, torch.Tensor], int]:
        """Upload ``state`` for ``round_no``; returns (the round's weighted average of our keys, clients in it)."""
        request = pb.AdapterUpload(
            round=round_no, num_examples=num_examples, tensors=codec.named_tensors(state, "fp32")
        )
        if client_id:
            request.client_id = client_id
        self.traffic.sent += request.ByteSize()
        reply = self._retry(lambda: self.stub.Adapters(request, metadata=self.metadata, timeout=timeout))
        self.traffic.received += reply.ByteSize()
        return codec.from_named_tensors(reply.tensors), int(reply.num_clients)


def head_tail_state(client: SplitClient) -> dict[str, torch.Tensor]:
    """The client's head and tail LoRA weights in one dict (layer indices keep the keys apart)."""
    return {**lora_state_dict(client.head), **lora_state_dict(client.tail)}


def load_head_tail(client: SplitClient, state: dict[str, torch.Tensor]) -> None:
    for segment in (client.head, client.tail):
        own = lora_state_dict(segment)
        load_lora_state_dict(segment, {k: v for k, v in state.items() if k in own})


def target_tokens(batch: dict) -> int:
    """Tokens the LM loss of ``batch`` averages over (labels shifted by one, -100 ignored)."""
    return int((batch["labels"][:, 1:] != -100).sum())


def fedavg_rounds(step: int, steps: int, every: int) -> int | None:
    """The head/tail FedAvg round to join after ``step`` (every ``every`` steps and after the last), or None."""
    if every <= 0 or not (step % every == 0 or step == steps):
        return None
    return math.ceil(step / every)


class Federation:
    """A client's part in its server's training mode, step by step.

    Before a step it gives the session the batch's ``loss_weight`` (client-batch weights the
    round's gradients by it); after a step it joins the head/tail FedAvg round that is due
    (every ``fedavg_every`` steps and after the last) and loads the average.
    """

    def __init__(
        self,
        client: SplitClient,
        transport: FederatedTransport,
        steps: int,
        fedavg_every: int,
        client_id: str = "",
        mode: str = "",
    ) -> None:
        self.client, self.transport, self.steps = client, transport, steps
        self.fedavg_every, self.client_id, self.mode = fedavg_every, client_id, mode
        self.rounds = 0  # FedAvg rounds joined
        self._since = 0  # examples since the last round

    def before_step(self, batch: dict) -> None:
        session = self.client.train_session
        if isinstance(session, FederatedSession):
            session.loss_weight = float(target_tokens(batch))

    def after_step(self, step: int, batch: dict) -> int | None:
        """Join the FedAvg round due after ``step``, if any; returns its number."""
        self._since += int(batch["input_ids"].shape[0])
        round_no = fedavg_rounds(step, self.steps, self.fedavg_every)
        if round_no is None:
            return None
        mean, joined = self.transport.fedavg(
            round_no, head_tail_state(self.client), self._since, self.client_id
        )
        load_head_tail(self.client, mean)
        self.rounds += 1
        self._since = 0
        log.debug("%s: head/tail FedAvg round %d with %d client(s)", self.client_id, round_no, joined)
        return round_no


def join_federation(client: SplitClient, steps: int, client_id: str = "") -> Federation | None:
    """The :class:`Federation` of ``client`` if its server trains in a federated mode, else None.

    The server announces its mode and FedAvg period in ``InfoReply``; a transport that is not
    a :class:`FederatedTransport`, or a server in ``independent`` mode, needs nothing.
    """
    transport = client.transport
    if not isinstance(transport, FederatedTransport):
        return None
    info = transport.info()
    mode = MODE_NAMES.get(info.federation_mode, "independent")
    if mode == "independent":
        return None
    return Federation(client, transport, steps, int(info.fedavg_every), client_id, mode)


def train_federated(
    client: SplitClient,
    transport: FederatedTransport,
    batches: Iterable[dict],
    steps: int,
    fedavg_every: int,
    client_id: str = "",
    on_step: Callable[[int, float], None] | None = None,
    clip_norm: float = 0.0,
) -> dict:
    """Run ``steps`` split training steps, joining head/tail FedAvg rounds; ``client.start_training`` first.

    Returns losses, wall times and the number of FedAvg rounds joined.
    """
    federation = Federation(client, transport, steps, fedavg_every, client_id)
    losses = []
    started = time.time()
    for step, batch in zip(range(1, steps + 1), batches):
        federation.before_step(batch)
        result = client.train_step(batch, clip_norm)
        losses.append(result.loss)
        federation.after_step(step, batch)
        if on_step is not None:
            on_step(step, result.loss)
    return {"losses": losses, "start": started, "end": time.time(), "fedavg_rounds": federation.rounds}
