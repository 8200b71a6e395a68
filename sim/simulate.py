"""Ray-backed federated simulation of the whole PEEL pipeline (``peel-fed simulate``).

Composes Flower's simulation runtime with the ServerApp (``strategies``) and the ClientApp
(``clients``): ``num_nodes`` SuperNodes, each hosting a contiguous share of the users. Prints
progress per phase and round, then the budget table; writes ``results.json``, ``results.md`` and
``recall_vs_budget.png`` under the output folder.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

from peel_fed.fedconfig import FedConfig
from sim.flower_env import flower_env


def run_federated_simulation(
    cfg: FedConfig,
    num_nodes: int,
    mods: list | None = None,
    wrap_grid: Callable | None = None,
    num_cpus: int | None = None,
) -> dict:
    """Run the pipeline in Flower's Ray simulation; returns the report ``run_pipeline`` built.

    ``mods`` wrap every ClientApp handler and ``wrap_grid`` wraps the server's grid (tests use
    them to inject failures and to audit uploads).
    """
    if num_nodes < 1:
        raise ValueError(f"num-nodes must be >= 1, got {num_nodes}")
    captured: dict = {}
    cpus = num_cpus or os.cpu_count() or 1
    with flower_env(), warnings.catch_warnings():  # a FLWR_HOME made here is removed after
        from flwr.serverapp import ServerApp
        from flwr.simulation import run_simulation

        from clients.client_app import make_client_app
        from strategies.server_app import run_pipeline

        server = ServerApp()

        @server.main()
        def _main(grid, context) -> None:
            captured["report"] = run_pipeline(wrap_grid(grid) if wrap_grid else grid, cfg)

        warnings.simplefilter("ignore", DeprecationWarning)
        run_simulation(
            server_app=server,
            client_app=make_client_app(mods=mods),
            num_supernodes=num_nodes,
            backend_config={
                "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                "init_args": {"num_cpus": cpus, "include_dashboard": False},
            },
        )
    if "report" not in captured:
        raise RuntimeError("the federated run did not finish; see the log above")
    return captured["report"]
