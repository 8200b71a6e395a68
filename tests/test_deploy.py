"""Real deployment: a SuperLink and SuperNode processes on 127.0.0.1 (``sim.deploy``).

End-to-end runs of the whole pipeline on ``checkerboard-tiny`` with few rounds: one whose
SuperLink and ServerApp are killed mid-pretraining and which is resumed on a new federation with
TLS, SuperNode authentication and per-node memory budgets (two rogue SuperNodes try to join), and
one in which a SuperNode is killed mid-run and a replacement joins late. Both check the results
and that no process or port is left behind.
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest
from test_federated import assert_same_metrics

from peel_fed.fedconfig import FedConfig
from sim.certs import Certificates, make_test_certificates
from sim.deploy import SMOKE_RUN, run_local_deployment
from sim.local_federation import LocalFederation, descendants, pid_alive, port_in_use
from sim.local_grid import LocalGrid
from strategies.server_app import run_pipeline


def _processes_using(folder: Path) -> list[int]:
    """PIDs of live processes whose environment or command line names ``folder`` (Linux)."""
    needle = str(folder).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            blob = (entry / "environ").read_bytes() + (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if needle in blob and state != "Z":
            found.append(int(entry.name))
    return found


def _assert_nothing_left(pids: list[int], ports: list[int], folder: Path) -> None:
    assert pids and ports
    assert [p for p in pids if pid_alive(p)] == []
    assert [p for p in ports if port_in_use(p)] == []
    assert _processes_using(folder) == []


def _kill_server_at(fed: LocalFederation, checkpoint: Path, at: str, killed: dict) -> None:
    """Once the checkpoint says ``at``, SIGKILL the SuperLink and the ServerApp it runs (by
    PID, as a crash: no goodbye to anyone)."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if json.loads(checkpoint.read_text())["at"] == at:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    else:
        return
    killed["pids"] = [fed.superlink.popen.pid, *descendants(fed.superlink.popen.pid)]
    killed["commands"] = [Path(f"/proc/{p}/cmdline").read_bytes() for p in killed["pids"]]
    fed.kill(fed.superlink)


BUDGETS = ["50%", "100%"]  # each SuperNode's device-budget, cycled


def _crash_mid_pretraining(tmp_path: Path, cfg: FedConfig) -> list[int]:
    """Start the run on a plain local federation and kill the SuperLink and the ServerApp by
    PID once pretraining round 1 is checkpointed; stop the rest. Returns the nodes' ids."""
    killed: dict = {}
    with LocalFederation(tmp_path / "w1", certs=None, log=lambda _: None) as fed:
        fed.start_superlink()
        for p in range(3):
            fed.add_node(p, 3, **{"device-budget": BUDGETS[p % 2]})
        fed.wait_for_nodes()
        ids = sorted(n.node_id for n in fed.nodes)
        proc = fed.start_run(cfg.to_run_config())
        checkpoint = Path(cfg.out_dir) / "checkpoint.json"
        killer = threading.Thread(
            target=_kill_server_at, args=(fed, checkpoint, "pretrain round 1", killed)
        )
        killer.start()
        code = fed.stream(proc, lambda _: None, timeout_s=300)
        killer.join()
        pids, ports = sorted(fed.started_pids()), fed.ports()
    assert code != 0 and not (Path(cfg.out_dir) / "results.json").exists()
    assert any(b"flwr-serverapp" in c for c in killed["commands"])  # the ServerApp died too
    _assert_nothing_left(pids, ports, tmp_path / "w1")
    return ids


def test_a_run_killed_mid_pretraining_resumes_on_tls_and_leaves_nothing_behind(
    tmp_path, server_identity
):
    """The SuperLink and the ServerApp are killed after pretraining round 1 of 2; the run is
    resumed with ``deploy local``'s defaults: a new federation (new node ids) with TLS and
    SuperNode authentication, while two rogue SuperNodes try to join. The devices read their
    state back from file; the metrics equal an uninterrupted run's (the same pipeline in
    process on the same partitions and budgets: a deployment gives the same numbers, only
    slower); no process, port or work folder is left behind."""
    run = dict(SMOKE_RUN, pretrain_passes=2, min_nodes=3)
    reference_grid = LocalGrid(3)
    for p, ctx in enumerate(reference_grid.contexts.values()):
        ctx.node_config["device-budget"] = BUDGETS[p % 2]
    reference = run_pipeline(reference_grid, FedConfig(**run))  # sparse pretraining downloads
    work, out = tmp_path / "work", tmp_path / "out"
    # full downloads here (fewer exchanges, and the same numbers as the sparse reference; the
    # ask messages of sparse downloads run through the ClientApp in tests/test_sparse_downloads)
    cfg = FedConfig(
        **run, out_dir=str(out), device_state_dir=str(out / "device-state"),
        pretrain_download="full", pee_download="full",
    )  # fmt: skip
    first_ids = _crash_mid_pretraining(tmp_path, cfg)

    probes: dict[str, object] = {}
    lines: list[str] = []
    rogue: list[subprocess.Popen] = []

    def on_line(line: str) -> None:
        lines.append(line)
        if line.startswith("SuperLink on 127.0.0.1:"):
            probes["port"] = port = int(line.split(":")[1].split()[0])
            ca = work / "certs" / "ca.crt"
            with urllib.request.urlopen(
                f"https://127.0.0.1:{port}/health",
                timeout=5,
                context=ssl.create_default_context(cafile=str(ca)),
            ) as r:
                probes["https"] = r.status
            try:  # plain HTTP must not be served
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
                probes["http"] = "served"
            except Exception:  # noqa: BLE001 (reset, bad status line: any failure will do)
                probes["http"] = "refused"
        if line.startswith("SuperNode authentication on") and not rogue:
            # SuperNodes that trust the CA try to join on a taken partition: one with only the
            # CA (the rogue of the bug report), one with a key nobody registered
            for name, key in (("no-key", False), ("unknown-key", True)):
                rogue.append(_rogue_supernode(tmp_path / name, probes["port"], work, key))

    try:
        result = run_local_deployment(
            replace(cfg, resume=True), 3, tls=True, node_budgets=BUDGETS, workdir=work,
            on_line=on_line,
        )  # fmt: skip
        assert [proc.wait(timeout=120) != 0 for proc in rogue] == [True, True]  # gave up
    finally:
        for proc in rogue:
            proc.kill()
            proc.wait()
    for name in ("no-key", "unknown-key"):
        log = (tmp_path / name / "log").read_text()
        assert "Failed to initialize the connection" in log and "SuperNode ID" not in log
    assert probes == {"https": 200, "http": "refused", "port": probes["port"]}
    assert any("[peel-fed] evaluation" in ln for ln in lines)  # progress was streamed
    report = result.report
    assert json.loads((out / "results.json").read_text()) == report
    assert (out / "results.md").is_file() and (out / "recall_vs_budget.png").is_file()
    # resumed on a new federation, with the metrics of the uninterrupted run
    assert report["resumed_after"] in ("pretrain round 1", "pretrain round 2")
    assert not set(report["nodes"]) & set(first_ids)
    assert_same_metrics(reference, report)
    for a, b in zip(report["pretrain"], reference["pretrain"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    saved = sorted(p.name for p in (out / "device-state").rglob("*.npz"))
    assert {"pretrain.npz", "pee.npz", "served.npz"} <= set(saved)
    assert len(report["nodes"]) == 3 and sorted(report["evaluated_nodes"]) == report["nodes"]
    assert report["dataset"]["users"] == 12
    assert {r["budget_fraction"] for r in report["rows"]} == {0.25, 0.5, 1.0}
    assert sum(f["failed_replies"] for f in report["failures"].values()) == 0
    for node in map(str, report["nodes"]):
        per_phase = report["participation"]["nodes"][node]
        assert all(p["replied"] == p["sent"] > 0 for p in per_phase.values())
    # device-budget from each SuperNode's node config: nodes 0 and 2 (4 users each) at 50%,
    # node 1 at 100%, whatever each user would have drawn
    own = {d["own_budget"]: d["users"] for d in report["drill"] if d["fraction_of_own"] == 1}
    assert own == {"50%": 8, "100%": 4}
    # 21 exchanges x 3 nodes: those before the checkpoint (statistics 2, init 1, round 1)
    # and the resumed run's (statistics again 2, round 2, final, K-Means 2, grouping, planes 2,
    # PEE 2, serving 2, evaluation 2, growing back 2)
    assert report["timing"]["replies"] == 21 * 3
    # each node got its own units: per group its 4 users joined, what its SuperNode's
    # device-budget holds (50%, 100%, 50%)
    served = report["serve"]["nodes"].values()
    full = report["layout"]["full_table_bytes"]
    per_group = sorted(c["budget_bytes"] / len(c["groups"]) for c in served)
    assert per_group == [full // 2, full // 2, full]
    assert all(c["payload_bytes"] <= c["budget_bytes"] for c in served)
    _assert_nothing_left(result.pids, result.ports, work)
    assert not work.exists()  # a successful run removes its work folder


def _rogue_supernode(home: Path, port: int, work: Path, with_key: bool) -> subprocess.Popen:
    """A SuperNode on partition 0 with only the CA, or also a fresh key nobody registered;
    its output in ``home/log``. The CA is copied: the run's work folder goes when it ends."""
    from sim.certs import make_node_key
    from sim.flower_env import configure_flower_env
    from sim.local_federation import _tool, free_port

    home.mkdir(parents=True)
    ca = home / "ca.crt"
    ca.write_bytes((work / "certs" / "ca.crt").read_bytes())
    key = make_node_key(home, "rogue")
    config = home / "node-config.toml"
    config.write_text("partition-id = 0\nnum-partitions = 3\n")
    cmd = [
        _tool("flower-supernode"),
        "--root-certificates",
        str(ca),
        "--superlink",
        f"127.0.0.1:{port}",
        "--port",
        str(free_port()),
        "--node-config",
        str(config),
        *(["--auth-supernode-private-key", str(key.private_key)] if with_key else []),
    ]
    with open(home / "log", "wb") as fh:
        return subprocess.Popen(
            cmd,
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=configure_flower_env(dict(os.environ), flwr_home=home, keep_set=False),
            cwd=home,
        )


def test_killed_supernode_and_late_joiner_do_not_stop_the_run(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    # full downloads: no ask exchanges (the asks' messages are the same in process, where
    # tests/test_sparse_downloads.py runs them); a dead node costs a round timeout per exchange
    # until its heartbeats lapse, so the timeout is short (a good exchange takes ~5 s)
    cfg = FedConfig(
        **SMOKE_RUN, min_nodes=2, round_timeout_s=12.0, evaluate_timeout_s=60.0, out_dir=str(out),
        pretrain_download="full", pee_download="full",
    )  # fmt: skip
    events: dict = {}
    with LocalFederation(work, certs=None, log=lambda _: None) as fed:
        fed.start_superlink()
        nodes = [fed.add_node(i, 3) for i in range(3)]
        fed.wait_for_nodes()
        run = fed.start_run(cfg.to_run_config())

        def on_line(line: str) -> None:
            if line.startswith("[peel-fed] stats") and "late" not in events:
                fed.kill(nodes[2])  # SIGKILL, as a crash: no goodbye to the SuperLink
                # the device comes back as a new SuperNode (a new node id) while the run goes on
                events["late"] = fed.add_node(2, 3)

        code = fed.stream(run, on_line, timeout_s=400)
        fed.wait_for_nodes([events["late"]])
        pids, ports = sorted(fed.started_pids()), fed.ports()
    assert code == 0, (work / "logs" / "flwr-run.log").read_text()[-3000:]
    report = json.loads((out / "results.json").read_text())
    killed, late = nodes[2].node_id, events["late"].node_id
    survivors = sorted(n.node_id for n in nodes[:2])
    assert sorted(report["nodes"]) == sorted([*survivors, killed])
    assert sorted(report["evaluated_nodes"]) == survivors
    part = report["participation"]
    assert str(late) in part["late"] and str(killed) in part["gone"]
    assert part["nodes"][str(killed)]["stats"] == {"sent": 2, "replied": 2, "failed": 0}
    # killed after the statistics: its next exchange (pretraining's init step) fails
    killed_phases = part["nodes"][str(killed)]
    assert sum(p["failed"] for k, p in killed_phases.items() if k.startswith("pretrain")) >= 1
    for node in survivors:
        assert all(p["failed"] == 0 for p in part["nodes"][str(node)].values())
    failed_nodes = {n for f in report["failures"].values() for n in f["by_node"]}
    assert failed_nodes == {str(killed)}
    assert report["pretrain"] and len(report["pee"]) == cfg.pee_rounds  # rounds were not skipped
    assert all(r["users"] == 8 for r in report["rows"])  # the killed node's 4 users are gone
    md = (out / "results.md").read_text()
    assert f"Node {late} connected late" in md and f"Node {killed} left" in md
    _assert_nothing_left(pids, ports, work)


def test_stop_ends_every_process_it_started_and_their_children(tmp_path):
    fed = LocalFederation(tmp_path, certs=None, log=lambda _: None)
    spawn = "import subprocess, time; subprocess.Popen(['sleep', '300']); time.sleep(300)"
    proc = fed._start("parent", [sys.executable, "-c", spawn], tmp_path / "p", 0)
    fed.nodes.append(proc)
    for _ in range(100):
        if fed.started_pids() - {proc.popen.pid}:
            break
        subprocess.run(["sleep", "0.05"])
    pids = fed.started_pids()
    assert len(pids) == 2
    assert fed.stop(grace_s=5) == []
    assert not any(pid_alive(p) for p in pids)


def test_interrupt_mid_run_stops_every_process(tmp_path):
    work = tmp_path / "work"
    cfg = FedConfig(**SMOKE_RUN, out_dir=str(tmp_path / "out"))

    def on_line(line: str) -> None:
        if "SuperNodes connected" in line:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_local_deployment(cfg, 2, tls=False, workdir=work, on_line=on_line)
    assert _processes_using(work) == []
    assert (work / "logs" / "superlink.log").is_file()  # logs are kept when a run fails


def test_test_certificates_name_the_hosts_and_chain_to_the_ca(tmp_path):
    from cryptography import x509

    certs = make_test_certificates(tmp_path, ["10.1.2.3", "lab.example.org"], days=2)
    assert Certificates.in_dir(tmp_path) == certs
    ca = x509.load_pem_x509_certificate(certs.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(certs.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = {str(v) for v in san.get_values_for_type(x509.IPAddress)}
    names |= set(san.get_values_for_type(x509.DNSName))
    assert names == {"10.1.2.3", "127.0.0.1", "lab.example.org", "localhost"}
    assert oct(certs.server_key.stat().st_mode & 0o777) == "0o600"
    with pytest.raises(ValueError, match="not a host name or IP address"):
        make_test_certificates(tmp_path / "bad", ["two words"])
    with pytest.raises(FileNotFoundError, match="TLS file missing"):
        Certificates.in_dir(tmp_path / "none")


def test_deploy_cli_errors_are_one_line(tmp_path, capsys):
    from sim.cli import main

    assert main(["deploy", "certs", "--out", str(tmp_path)]) == 2
    assert "give at least one --host" in capsys.readouterr().err
    code = main(["deploy", "local", "--certs", str(tmp_path / "missing"), "--num-nodes", "2"])
    assert code == 2 and "TLS file missing" in capsys.readouterr().err
    assert main(["deploy", "certs", "--host", "127.0.0.1", "--out", str(tmp_path / "c")]) == 0
    assert (tmp_path / "c" / "server.pem").is_file()
    code = main(["deploy", "local", "--insecure", "--node-budgets", "30%", "--timeout-s", "5"])
    assert code == 2 and "node budget '30%' is not one of device-budgets" in capsys.readouterr().err


def test_deploy_certs_refuses_to_replace_a_ca_unless_forced(tmp_path, capsys):
    from sim.cli import main

    out = tmp_path / "c"
    assert main(["deploy", "certs", "--host", "10.0.0.1", "--out", str(out)]) == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(["deploy", "certs", "--host", "10.0.0.2", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("peel-fed: error: ")
    assert f"{out / 'ca.crt'} exists" in err and "--force" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing replaced
    (out / "ca.crt").unlink()  # any file of the set is enough to refuse
    assert main(["deploy", "certs", "--host", "10.0.0.2", "--out", str(out)]) == 2
    assert f"{out / 'ca.key'} exists" in capsys.readouterr().err
    assert main(["deploy", "certs", "--host", "10.0.0.2", "--out", str(out), "--force"]) == 0
    assert (out / "ca.key").read_bytes() != before["ca.key"]
    assert oct((out / "ca.key").stat().st_mode & 0o777) == "0o600"
    assert oct((out / "ca.crt").stat().st_mode & 0o777) == "0o644"


def test_failing_run_is_a_one_line_error_and_stops_every_process(tmp_path):
    """The ServerApp refuses the config (more user groups than users) after the statistics:
    the launcher reports a DeploymentError naming the logs and stops everything."""
    from sim.deploy import DeploymentError

    work = tmp_path / "work"
    cfg = FedConfig(**{**SMOKE_RUN, "num_user_groups": 50}, out_dir=str(tmp_path / "out"))
    lines: list[str] = []
    with pytest.raises(DeploymentError, match="logs in"):
        run_local_deployment(cfg, 2, tls=False, workdir=work, on_line=lines.append)
    assert any("more user groups (50) than users (12)" in ln for ln in lines)
    assert _processes_using(work) == []
    assert not (tmp_path / "out" / "results.json").exists()
