"""How the server trains the body for many clients (``fedsplit serve --mode``).

``independent``
    Every training session has its own body adapter and optimiser and nothing is
    coordinated (one client, or clients that do not federate). The default.
``sequential``
    One body adapter and one AdamW shared by all clients, one client step at a time —
    classic split learning with many clients, and the baseline of the others
    (:mod:`.sequential`).
``client-batch``
    The shared adapter again, but the forwards of a round are gathered and run as one
    batch, the gradients as one backward, then one optimiser step (:mod:`.client_batch`).
``server-hierarchical``
    One body replica per client on the shared frozen base weights; clients proceed
    independently and concurrently; every ``sync_every`` steps the server averages the
    replicas (FedAvg weighted by the examples each trained on since the last sync)
    (:mod:`.hierarchical`).

In every mode the server also runs head/tail FedAvg rounds (the ``Adapters`` RPC); it
tells clients how often to join them in ``InfoReply.fedavg_every``
(:meth:`~fedsplit.server.config.ServerConfig.fedavg_period`).

A coordinator works only through the :class:`~fedsplit.server.coordination.base.BodyHost`
the servicer hands it (run on the body worker, the adapter pool, the session registry, the
settings); :func:`~fedsplit.server.coordination.factory.make_coordinator` builds the one of a
mode. This package's ``__init__`` imports nothing, so its modules never import each other
through it.
"""
