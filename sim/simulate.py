"""Ray-backed federated simulation of the whole PEEL pipeline (``peel-fed simulate``).

Composes Flower's simulation runtime with the ServerApp (``strategies``) and the ClientApp
(``clients``): ``num_nodes`` SuperNodes, each hosting a contiguous share of the users. Prints
progress per phase and round, then the budget table; writes ``results.json``, ``results.md`` and
``recall_vs_budget.png`` under the output folder.

Ray: by default a fresh single-node Ray whose every process (GCS, raylet, agents, workers, the
driver) listens on 127.0.0.1 only; with ``ray_address`` the run attaches to a running Ray cluster
instead (``docs/federated.md``, "Ray's network").
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from peel_fed.fedconfig import FedConfig
from sim.flower_env import flower_env

LOOPBACK = "127.0.0.1"
RAY_MULTI_NODE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
"""Ray's multi-node switch (ray 2.55, ``ray._private.ray_constants.ENABLE_RAY_CLUSTER``). On
Linux it defaults to on, and then Ray turns a node address of 127.0.0.1 into the machine's outside
address (``ray._private.services.resolve_ip_for_localhost``): its servers listen on every
interface whatever ``_node_ip_address`` says. Off, the node address stays 127.0.0.1 and Ray's
C++ servers listen on loopback only."""


def ray_init_args(ray_address: str | None, num_cpus: int) -> dict:
    """``ray.init`` arguments for Flower's Ray backend (``backend_config["init_args"]``).

    No address: start a fresh Ray on 127.0.0.1 (``address="local"``: neither ``RAY_ADDRESS`` nor
    a ``ray start`` cluster found on this machine is joined by accident) with ``num_cpus``. An
    address: attach to that cluster; its nodes bring their own CPUs and addresses.
    """
    if ray_address:
        return {"address": ray_address}
    return {
        "address": "local",
        "num_cpus": num_cpus,
        "include_dashboard": False,
        "_node_ip_address": LOOPBACK,
    }


def is_loopback_address(address: str) -> bool:
    """Whether a Ray address (``host:port``, ``[v6]:port``, optionally ``ray://``) is on this
    machine's loopback interface; ``auto`` and names other than ``localhost`` are not."""
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_ray_address(address: str, timeout_s: float = 5.0) -> None:
    """A one-line ``ValueError`` unless something accepts connections at ``HOST:PORT`` (the
    cluster's GCS); ``auto`` and ``ray://`` addresses are left to Ray. Without this check a
    wrong address stalls the run: Ray's connection error stays in Flower's backend thread."""
    if address == "auto" or "://" in address:
        return
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--ray-address must be HOST:PORT, got {address!r}")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ValueError(f"no Ray cluster answers at {address}: {exc}") from None


@contextmanager
def ray_single_node(active: bool = True) -> Iterator[None]:
    """Within the block, Ray runs single-node (``RAY_MULTI_NODE`` off): a Ray started here binds
    127.0.0.1, and an address of 127.0.0.1 is dialled as given.

    Ray's child processes read the environment variable; this process's Ray reads it once, at
    import, into a constant, so the constant is set too (also when Ray is first imported inside
    the block). Both are restored afterwards, to what Ray would read from the restored
    environment."""
    if not active:
        yield
        return
    old_env = os.environ.get(RAY_MULTI_NODE)
    os.environ[RAY_MULTI_NODE] = "0"
    _set_ray_multi_node(False)
    try:
        yield
    finally:
        if old_env is None:
            os.environ.pop(RAY_MULTI_NODE, None)
        else:
            os.environ[RAY_MULTI_NODE] = old_env
        constants = sys.modules.get("ray._private.ray_constants")
        if constants is not None:
            _set_ray_multi_node(constants.env_bool(RAY_MULTI_NODE, not constants.IS_WINDOWS_OR_OSX))


def _set_ray_multi_node(value: bool) -> None:
    """Set the constant of a Ray already imported in this process (none: nothing to do)."""
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = value


def run_federated_simulation(
    cfg: FedConfig,
    num_nodes: int,
    mods: list | None = None,
    wrap_grid: Callable | None = None,
    num_cpus: int | None = None,
    ray_address: str | None = None,
    server_main: Callable | None = None,
) -> dict:
    """Run the pipeline in Flower's Ray simulation; returns the report ``run_pipeline`` built
    (or ``server_main(grid, cfg)``, which benchmarks use to run some phases only).

    ``mods`` wrap every ClientApp handler and ``wrap_grid`` wraps the server's grid (tests use
    them to inject failures and to audit uploads). ``ray_address`` attaches to a running Ray
    cluster (``num_cpus`` is then the cluster's); without it Ray starts here, on 127.0.0.1.
    """
    if num_nodes < 1:
        raise ValueError(f"num-nodes must be >= 1, got {num_nodes}")
    captured: dict = {}
    cpus = num_cpus or os.cpu_count() or 1
    if ray_address:
        check_ray_address(ray_address)
    local = not ray_address or is_loopback_address(ray_address)
    with flower_env(), ray_single_node(local), warnings.catch_warnings():
        # a FLWR_HOME made here is removed after
        from flwr.serverapp import ServerApp
        from flwr.simulation import run_simulation

        from clients.client_app import make_client_app
        from strategies.server_app import run_pipeline

        server = ServerApp()

        @server.main()
        def _main(grid, context) -> None:
            body = server_main or run_pipeline
            captured["report"] = body(wrap_grid(grid) if wrap_grid else grid, cfg)

        from sim.interrupts import Terminated, is_sigterm_exit
        from strategies.phases import STOP

        warnings.simplefilter("ignore", DeprecationWarning)
        STOP.clear()
        try:
            run_simulation(
                server_app=server,
                client_app=make_client_app(mods=mods),
                num_supernodes=num_nodes,
                backend_config={
                    "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                    "init_args": ray_init_args(ray_address, cpus),
                },
            )
        except BaseException as exc:  # Ctrl-C, SIGTERM, or an error
            STOP.set()  # the ServerApp's thread must end too, or the process cannot exit
            if isinstance(exc, SystemExit) and is_sigterm_exit(exc):  # Ray's SIGTERM: status 15
                raise Terminated from None
            raise
    if "report" not in captured:
        raise RuntimeError("the federated run did not finish; see the log above")
    return captured["report"]
