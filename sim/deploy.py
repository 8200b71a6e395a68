"""A real Flower deployment on this machine (``peel-fed deploy local``).

Starts a SuperLink and N SuperNodes as separate processes on 127.0.0.1 with free ports, each
SuperNode with its own ``FLWR_HOME`` and node config (partition, data folder, memory budget),
then starts the ServerApp with ``flwr run <app> <connection> --stream``, passes its output
through, checks that the results were written, and stops every process it started, and their
children, by PID: on success, on failure and on Ctrl-C. TLS is on unless ``insecure`` is asked
for (a test CA and server certificate are made when none are given).

The processes are managed by ``sim.local_federation``; the same processes on several
machines are described in ``docs/deployment.md``.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from peel_fed.fedconfig import FedConfig
from sim.certs import Certificates
from sim.local_federation import DeploymentError, LocalFederation


def superexec_poll_interval(num_nodes: int) -> float:
    """Seconds between a SuperExec's asks for new work (Flower's default is 1 s).

    Shorter means messages start sooner, but every ask costs CPU: measured idle on 2 cores, a
    SuperNode with its SuperExec uses 4.1% of a core at 0.1 s, 1.2% at 0.5 s and 1.0% at 1 s
    (CPU times from ``/proc`` over 30 s). So 0.1 s up to 4 nodes on one machine, then longer
    in proportion (1 s from 40 nodes), so that polling CPU grows slowly with the node count.
    """
    return min(1.0, max(0.1, 0.025 * num_nodes))


SMOKE_RUN = dict(
    dataset="checkerboard-tiny",
    layers=1,
    pretrain_passes=1,
    pretrain_cohort_fraction=1.0,
    pretrain_local_steps=1,
    num_user_groups=2,
    kmeans_iters=1,
    pee_rounds=2,
    pee_cohort_fraction=1.0,
    num_item_groups=4,
    num_blocks=4,
    dim=16,
    budgets="25%,50%,100%",
    device_budgets="50%,100%",
    progress=False,
    timing=True,
)
"""The smallest full pipeline (FedConfig fields): 12 users, 18 exchanges (statistics 2,
pretraining 3, K-Means 2, grouping 1, bit-plane orders 2, PEE learning 2, serving each device's
own units 2, evaluation 2 (with the drill ranked on the served units), growing back 2). The
deployment tests and ``sim.bench_deploy`` run it."""


def _check_node_budget(budget: str, device_budgets: list[str]) -> None:
    """A SuperNode's ``device-budget`` must be one of ``device-budgets`` (the evaluation reports
    per own-budget class), for any table size: checked now rather than at the end of the run."""
    from peel_fed.blocks import BudgetError, parse_budget

    sizes = (10**9, 10**9 + 7)  # equal at two table sizes: the same budget at every size
    try:
        mine = [parse_budget(budget, f) for f in sizes]
        if any(mine == [parse_budget(b, f) for f in sizes] for b in device_budgets):
            return
    except BudgetError as exc:
        raise ValueError(f"node budget {budget!r}: {exc}") from None
    raise ValueError(
        f"node budget {budget!r} is not one of device-budgets ({', '.join(device_budgets)})"
    )


# --- the command ----------------------------------------------------------------------------------
@dataclass
class DeployResult:
    """A finished deployed run: the ServerApp's report, and every PID and port the launcher
    started or saw (all stopped by the time this is returned)."""

    report: dict
    out_dir: Path
    workdir: Path
    wall_seconds: float
    pids: list[int]
    ports: list[int]


def run_local_deployment(
    cfg: FedConfig,
    num_nodes: int,
    tls: bool = True,
    certs: Certificates | None = None,
    node_budgets: list[str] | None = None,
    workdir: str | Path | None = None,
    keep_workdir: bool = False,
    timeout_s: float | None = None,
    on_line: Callable[[str], None] = print,
    node_auth: bool = True,
) -> DeployResult:
    """Run the whole pipeline on a SuperLink and ``num_nodes`` SuperNodes on this machine.

    With ``tls`` and no ``certs``, a test CA and certificate for 127.0.0.1 are made in the work
    folder; ``node_budgets`` (cycled) sets each SuperNode's ``device-budget``. With TLS and
    ``node_auth`` (the default), the SuperLink admits only SuperNodes whose public key was
    registered: each node gets a fresh key pair, registered before it starts. Returns the
    report the ServerApp wrote; raises ``DeploymentError`` (naming the log folder) if the run
    fails. Every process is stopped before returning.
    """
    import json
    import shutil

    if num_nodes < 1:
        raise ValueError(f"--nodes must be >= 1, got {num_nodes}")
    for budget in node_budgets or []:
        _check_node_budget(budget, cfg.budget_list("device_budgets"))
    if not cfg.out_dir:
        raise ValueError("the deployed run needs an out-dir for its results")
    # the ServerApp and the SuperNodes run in their own folders: hand them absolute paths
    paths = {"out-dir": str(Path(cfg.out_dir).resolve())}
    for key, value in (("data-dir", cfg.data_dir), ("device-state-dir", cfg.device_state_dir)):
        if value:
            paths[key] = str(Path(value).resolve())
    cfg = FedConfig.from_run_config({**cfg.to_run_config(), **paths})
    out_dir = Path(cfg.out_dir)
    results = out_dir / "results.json"
    work = Path(workdir or tempfile.mkdtemp(prefix="peel-fed-deploy-"))
    t0 = time.perf_counter()
    ok = False
    if tls and certs is None:
        from sim.certs import make_test_certificates

        # this run's own throwaway CA: a reused workdir's old one is replaced
        certs = make_test_certificates(work / "certs", ["127.0.0.1"], days=1, force=True)
    fed = LocalFederation(work, certs if tls else None, log=on_line)
    if "FLWR_SUPEREXEC_TASK_POLL_INTERVAL" not in os.environ:
        fed.env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = str(superexec_poll_interval(num_nodes))
    node_auth = node_auth and tls
    try:
        fed.start_superlink(node_auth=node_auth)
        for pid in range(num_nodes):
            extra = {}
            if cfg.data_dir:
                extra["data-dir"] = cfg.data_dir
            if node_budgets:
                extra["device-budget"] = node_budgets[pid % len(node_budgets)]
            if node_auth:
                from sim.certs import make_node_key

                key = make_node_key(work / "keys", f"supernode-{pid}")
                fed.register_node(key.public_key)
                extra["auth_key"] = key.private_key
            fed.add_node(pid, num_nodes, **extra)
        if node_auth:
            on_line(f"SuperNode authentication on: {num_nodes} public keys registered")
        fed.wait_for_nodes()
        on_line(f"{num_nodes} SuperNodes connected; logs in {work / 'logs'}")
        started = time.time()
        run = fed.start_run(cfg.to_run_config())
        code = fed.stream(run, on_line, timeout_s)
        if code != 0:
            raise DeploymentError(f"flwr run exited with code {code}; logs in {work / 'logs'}")
        if not results.is_file() or results.stat().st_mtime < started:
            raise DeploymentError(f"the run wrote no {results}; logs in {work / 'logs'}")
        ok = True
    finally:
        left = fed.stop()
        pids, ports = sorted(fed.started_pids()), fed.ports()
        if left:
            on_line(f"warning: processes still alive after stopping: {left}")
        if ok and not keep_workdir:
            shutil.rmtree(work, ignore_errors=True)
    report = json.loads(results.read_text())
    return DeployResult(report, out_dir, work, time.perf_counter() - t0, pids, ports)
