"""``peel-fed`` command line.

Every command's options (``centralized``, ``simulate``, ``deploy``, ``study``) are built here, in
one parser; the commands' work is in ``peel_fed.pipeline`` and the other ``sim`` modules.
Long file: about 550 lines because it is one argparse tree with its help texts.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from peel_fed.blocks import BudgetError, check_budget_format, split_budget_list
from peel_fed.clustering import GroupingError
from peel_fed.data import DataError
from peel_fed.lightgcn import LOSSES, LR_SCHEDULES, NEGATIVE_SAMPLING, LightGCNConfig
from peel_fed.loading import dataset_name
from peel_fed.peel import PEELConfig
from peel_fed.pipeline import DEFAULT_BUDGETS, PipelineConfig, default_pretraining
from sim import study


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


class _RenamedOption(argparse.Action):
    """An option's old name, accepted until 0.3 with a warning that names the new one."""

    def __init__(self, option_strings, dest, new_name: str, **kwargs) -> None:
        self.new_name = new_name
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(
            f"peel-fed: warning: {option_string} is renamed {self.new_name}; "
            "the old name goes in 0.3",
            file=sys.stderr,
        )
        setattr(namespace, self.dest, values)


def _add_renamed(p: argparse.ArgumentParser, name: str, old_name: str, **kwargs) -> None:
    """Option ``name``, plus its hidden old name ``old_name`` (same value, with a warning)."""
    p.add_argument(name, **kwargs)
    p.add_argument(
        old_name,
        dest=name.lstrip("-").replace("-", "_"),
        action=_RenamedOption,
        new_name=name,
        type=kwargs.get("type"),
        default=argparse.SUPPRESS,
        help=argparse.SUPPRESS,
    )


def _budget_list(text: str) -> tuple[str, ...]:
    """An argparse type: a budget list, unchecked (a run checks it against its table)."""
    try:
        return tuple(split_budget_list(text))
    except BudgetError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _checked_budget_list(text: str) -> tuple[str, ...]:
    """An argparse type: a budget list whose every budget parses (its size is checked against
    the item table when the run knows it)."""
    budgets = _budget_list(text)
    for b in budgets:
        try:
            check_budget_format(b)
        except BudgetError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return budgets


def _add_centralized(sub) -> None:
    lg, pe = default_pretraining(), PEELConfig()
    p = sub.add_parser(
        "centralized",
        help="centralized reference pipeline: pretrain -> group -> PEE learning -> evaluate",
        description="Pretrain LightGCN, group users, learn each group's elastic embeddings, and "
        "evaluate PEEL and the baselines at every budget. Writes results.json and results.md.",
    )
    p.add_argument("--dataset", default="gowalla", help="bundled dataset name (default gowalla)")
    p.add_argument(
        "--data-dir", default=None, help="a LightGCN-format folder instead of a bundled set"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dim", type=int, default=lg.dim, help="embedding size d")
    p.add_argument("--layers", type=int, default=lg.layers, help="LightGCN layers K")
    p.add_argument("--epochs", type=int, default=lg.epochs, help="LightGCN pretraining epochs")
    p.add_argument("--batch-size", type=int, default=lg.batch_size)
    p.add_argument("--lr", type=float, default=lg.lr)
    p.add_argument(
        "--loss",
        choices=LOSSES,
        default=lg.loss,
        help="pretraining loss: bpr, or softmax (sampled softmax on cosine scores)",
    )
    p.add_argument(
        "--negatives",
        type=int,
        default=lg.negatives,
        help="softmax loss: uniform negative items shared by each batch",
    )
    p.add_argument(
        "--temperature", type=float, default=lg.temperature, help="softmax loss: temperature"
    )
    p.add_argument(
        "--negative-sampling",
        choices=NEGATIVE_SAMPLING,
        default=lg.negative_sampling,
        help="pretraining negatives: uniform, or dns (the hardest of --dns-candidates items)",
    )
    p.add_argument(
        "--dns-candidates",
        type=int,
        default=lg.dns_candidates,
        help="dns: candidate items per positive",
    )
    p.add_argument(
        "--lr-schedule",
        choices=LR_SCHEDULES,
        default=lg.lr_schedule,
        help="pretraining learning rate: constant, or cosine (a half cosine to 0 over the epochs)",
    )
    _add_renamed(
        p,
        "--num-blocks",
        "--blocks",
        type=int,
        default=pe.num_blocks,
        help="blocks per embedding N",
    )
    _add_renamed(
        p,
        "--num-item-groups",
        "--item-groups",
        type=int,
        default=pe.num_item_groups,
        help="item groups G_v",
    )
    _add_renamed(
        p,
        "--num-user-groups",
        "--user-groups",
        type=_int_list,
        default=(4, 1),
        help="user groups G_u; a list runs PEEL once per value (default 4,1)",
    )
    _add_renamed(
        p, "--pee-epochs", "--peel-epochs", type=int, default=pe.epochs, help="PEE learning epochs"
    )
    _add_renamed(
        p, "--pee-lr", "--peel-lr", type=float, default=pe.lr, help="PEE learning (inner) rate"
    )
    p.add_argument(
        "--unit-order",
        choices=("consistent", "per-group"),
        default=pe.unit_order,
        help="how a group's units are ordered for budgets (see docs/method.md)",
    )
    p.add_argument(
        "--no-elastic",
        action="store_true",
        help="train PEEs on the full table only, not at sampled budgets",
    )
    p.add_argument(
        "--diversity-weight",
        type=float,
        default=pe.diversity_weight,
        help="weight of the block-diversity regulariser in pretraining and PEE learning",
    )
    p.add_argument(
        "--nested-dims",
        type=_int_list,
        default=(),
        help="train LightGCN nested (Matryoshka): the BPR loss is the mean over these leading "
        "prefixes and the full dim, e.g. 2,4,8,16,32 (increasing, each below --dim; default "
        "none: the plain loss)",
    )
    p.add_argument(
        "--no-baselines",
        action="store_true",
        help="skip row quantization and magnitude pruning (faster evaluation)",
    )
    p.add_argument(
        "--budgets",
        type=_budget_list,
        default=DEFAULT_BUDGETS,
        help="comma-separated budgets: fractions (0.1), percentages (10%%) or sizes (512KB, 2MB)",
    )
    p.add_argument("--out", default="runs/centralized", help="output folder")
    p.add_argument("--cache-dir", default="runs/cache", help="where pretrained models are kept")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_simulate(sub) -> None:
    p = sub.add_parser(
        "simulate",
        help="federated PEEL in Flower's Ray simulation (the main job)",
        description="Run the federated pipeline (statistics, LightGCN pretraining, K-Means "
        "grouping, per-group PEE learning, on-device evaluation and the dynamic-budget drill) "
        "with NUM_NODES simulated SuperNodes hosting all users. Defaults come from "
        "[tool.flwr.app.config]; writes results.json, results.md and recall_vs_budget.png.",
    )
    p.add_argument("--num-nodes", type=int, default=2, help="simulated SuperNodes (default 2)")
    p.add_argument(
        "--ray-address",
        default=None,
        help="attach to the running Ray cluster at this address (HOST:PORT, as ray start --head "
        "prints it; run this command on a node of that cluster) instead of starting Ray on "
        "127.0.0.1 here; see docs/federated.md",
    )
    _add_run_args(p, "runs/federated")


def _add_run_args(p, out: str) -> None:
    """Arguments of a federated run, shared by ``simulate`` and ``deploy local``."""
    p.add_argument("--dataset", default=None, help="bundled dataset name (default gowalla)")
    p.add_argument("--data-dir", default=None, help="a LightGCN-format folder")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument(
        "--run-config",
        default="",
        help='run-config overrides as for flwr run, e.g. "pretrain-passes=5 num-user-groups=2"',
    )
    p.add_argument("--out", default=out, help=f"output folder (default {out})")
    p.add_argument(
        "--resume",
        action="store_true",
        help="go on from the checkpoint the run left in --out (after a crash or Ctrl-C), with "
        "the same settings; devices read their state back from OUT/device-state",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_deploy(sub) -> None:
    p = sub.add_parser(
        "deploy",
        help="real Flower processes: a local federation, or TLS certificates for one",
        description="Run peel-fed on real Flower processes (see docs/deployment.md).",
    )
    dsub = p.add_subparsers(dest="deploy_command", required=True)
    local = dsub.add_parser(
        "local",
        help="a SuperLink and NODES SuperNodes on 127.0.0.1 run the whole pipeline",
        description="Start a SuperLink and NODES SuperNode processes on 127.0.0.1 (free ports, "
        "TLS with a fresh test CA unless --insecure), run the pipeline with flwr run, stream "
        "its progress, write results.json, results.md and recall_vs_budget.png, and stop every "
        "process it started by PID (also on failure and Ctrl-C).",
    )
    _add_renamed(
        local, "--num-nodes", "--nodes", type=int, default=4, help="SuperNode processes (default 4)"
    )
    _add_run_args(local, "runs/deployed")
    local.add_argument(
        "--insecure", action="store_true", help="no TLS (plain HTTP between the processes)"
    )
    local.add_argument(
        "--no-node-auth",
        action="store_true",
        help="admit any SuperNode that trusts the CA (default with TLS: only SuperNodes whose "
        "public key was registered, one fresh key pair per node)",
    )
    local.add_argument(
        "--certs",
        default=None,
        help="folder with ca.crt, server.pem, server.key (default: make a test CA for this run)",
    )
    local.add_argument(
        "--node-budgets",
        type=_budget_list,
        default=None,
        help="each SuperNode's device-budget, cycled over the nodes, e.g. 10%%,25%%,50%%,100%% "
        "(each must be one of the run config's device-budgets; default: every user draws one)",
    )
    local.add_argument(
        "--timeout-s", type=float, default=None, help="stop everything after this many seconds"
    )
    local.add_argument(
        "--keep-workdir",
        action="store_true",
        help="keep the processes' folders and logs after a successful run",
    )
    certs = dsub.add_parser(
        "certs",
        help="make a test CA and a SuperLink server certificate",
        description="Write ca.crt, ca.key, server.pem and server.key into OUT. The server "
        "certificate names every --host (IP or DNS name) plus 127.0.0.1 and localhost. "
        "Give the SuperLink ca.crt, server.pem and server.key; give SuperNodes and flwr run "
        "ca.crt.",
    )
    certs.add_argument(
        "--host",
        action="append",
        default=[],
        help="a name or address the SuperNodes dial (repeat for several)",
    )
    certs.add_argument("--out", default="certs", help="output folder (default certs)")
    certs.add_argument("--days", type=int, default=30, help="validity in days (default 30)")
    certs.add_argument(
        "--force",
        action="store_true",
        help="replace the files already in OUT (a new CA orphans every certificate the old one "
        "signed)",
    )


def _add_study(sub) -> None:
    p = sub.add_parser(
        "study",
        help="every method at equal bytes, resumable, with a report (sim/study/)",
        description=study.__doc__.split("\n\n")[0],
    )
    p.add_argument("--dataset", default="gowalla")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out",
        default=None,
        help="default docs/results/<dataset>, and docs/results/<dataset>/seed-<n> for a seed "
        "other than 0 (so another seed never replaces seed 0's saved steps)",
    )
    p.add_argument("--cache-dir", default="runs/cache")
    p.add_argument(
        "--budgets",
        type=_checked_budget_list,
        default=",".join(study.STUDY_BUDGETS),
        help="comma-separated device budgets: fractions of the full item table (25%%, 0.25) "
        "or sizes (512KB, 2MB, 1.5MiB); default %(default)s",
    )
    p.add_argument(
        "--cold-start-fraction",
        type=float,
        default=study.StudyConfig.cold_start_fraction,
        help="share of users held out of all training for the cold-start step (default "
        "%(default)s)",
    )
    p.add_argument(
        "--steps", default=None, help=f"comma-separated subset of {', '.join(study.STEPS)}"
    )
    p.add_argument("--quick", action="store_true", help="tiny trainings: a smoke run")
    p.add_argument("--no-progress", action="store_true")


def _add_privacy(sub) -> None:
    from sim import privacy_report

    p = sub.add_parser(
        "privacy",
        help="every privacy setting's Recall@20, epsilon, attack AUC, bytes and time, one report",
        description=privacy_report.__doc__.split("\n\n")[0],
    )
    p.add_argument("--dataset", default="gowalla")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-nodes", type=int, default=2, help="in-process SuperNodes (default 2)")
    p.add_argument(
        "--epsilons",
        type=_float_list,
        default=(1.0, 4.0, 8.0),
        help="central-DP target epsilons, comma-separated (default 1,4,8; empty: no row)",
    )
    p.add_argument(
        "--distributed-epsilons",
        type=_float_list,
        default=(8.0,),
        help="distributed-DP (secure rows, noise added by the nodes) target epsilons "
        "(default 8; empty: no row)",
    )
    p.add_argument("--decoys", type=int, default=30, help="decoy items per user (0: no row)")
    p.add_argument(
        "--ldp-noise",
        type=float,
        default=3.0,
        help="local DP: noise per uploaded value in multiples of the clip (0: no row)",
    )
    p.add_argument(
        "--dp-clip", type=float, default=0.0, help="0: the median first-round upload norm"
    )
    p.add_argument("--delta", type=float, default=0.0, help="0: min(1e-5, 1 / users)")
    p.add_argument("--attack-targets", type=int, default=100, help="users attacked")
    p.add_argument("--attack-passes", type=int, default=1, help="pretraining passes attacked")
    p.add_argument(
        "--run-config",
        default="",
        help='run-config overrides for every setting, e.g. "pretrain-passes=5"',
    )
    p.add_argument(
        "--jobs", type=int, default=1, help="settings measured at a time (worker processes)"
    )
    p.add_argument("--out", default=None, help="default docs/results/<dataset>")


def _float_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        msg = f"expected comma-separated numbers, got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None


def _privacy(args, argv: list[str] | None) -> None:
    from sim.privacy_report import build_report

    build_report(
        dataset=args.dataset,
        data_dir=args.data_dir,
        seed=args.seed,
        num_nodes=args.num_nodes,
        epsilons=args.epsilons,
        distributed_epsilons=args.distributed_epsilons,
        decoys=args.decoys,
        ldp_noise=args.ldp_noise,
        clip=args.dp_clip,
        delta=args.delta,
        attack_targets=args.attack_targets,
        attack_passes=args.attack_passes,
        run_config=parse_run_config(args.run_config),
        jobs=args.jobs,
        out=args.out,
        command="peel-fed " + shlex.join(sys.argv[1:] if argv is None else argv),
    )


def parse_run_config(text: str) -> dict:
    """``"key=value other='text'"`` -> dict, values parsed as TOML (as ``flwr run`` does)."""
    import tomllib

    out = {}
    for pair in shlex.split(text, posix=False):  # keep quotes: TOML reads them
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"run-config entries must be key=value, got {pair!r}")
        try:
            out[key] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            out[key] = value
    return out


def _fed_config(args, num_nodes: int):
    """The run's FedConfig: defaults, then ``--run-config``, then the dedicated flags; min-nodes
    is capped at the number of nodes started.

    Checked before any Ray or Flower process starts, with one-line errors: the config, the
    dataset (loaded as ``centralized`` loads it) and the config against it (at most one node per
    user, user and item groups, budgets).
    """
    from peel_fed.fedconfig import FedConfig
    from peel_fed.loading import load_dataset

    if num_nodes < 1:
        raise ValueError(f"--num-nodes must be >= 1, got {num_nodes}")
    overrides = parse_run_config(args.run_config)
    for key, value in (("dataset", args.dataset), ("seed", args.seed)):
        if value is not None:
            overrides[key] = value
    if args.data_dir is not None:
        overrides["data-dir"] = args.data_dir
    for key in ("data-dir", "device-state-dir"):  # absolute, as the checkpoint keeps them
        if overrides.get(key):
            overrides[key] = str(Path(str(overrides[key])).resolve())
    overrides["out-dir"] = str(Path(args.out).resolve())
    # the devices of a local run keep their state beside the server's checkpoint
    overrides.setdefault("device-state-dir", str(Path(args.out).resolve() / "device-state"))
    if args.resume:
        overrides["resume"] = True
    if args.no_progress:
        overrides["progress"] = False
    cfg = FedConfig.from_run_config(overrides)
    if num_nodes < cfg.min_nodes:
        cfg = FedConfig.from_run_config({**cfg.to_run_config(), "min-nodes": num_nodes})
    ds = load_dataset(cfg.dataset, cfg.data_dir or None)
    if num_nodes > ds.n_users:
        raise ValueError(
            f"--num-nodes ({num_nodes}) is more than the {ds.n_users} users of {ds.name}"
        )
    cfg.checked_layout(ds.item_popularity(), ds.n_users)
    if cfg.resume:  # a missing or mismatched checkpoint is a one-line error before any process
        from strategies.checkpoint import Checkpoint

        Checkpoint(cfg)
    return cfg


def _simulate(args) -> None:
    cfg = _fed_config(args, args.num_nodes)
    from sim.simulate import run_federated_simulation  # Flower and Ray load only here

    run_federated_simulation(cfg, args.num_nodes, ray_address=args.ray_address)


def _deploy(args) -> None:
    if args.deploy_command == "certs":
        from sim.certs import make_test_certificates

        if not args.host:
            raise ValueError("give at least one --host (the address the SuperNodes dial)")
        c = make_test_certificates(args.out, args.host, args.days, force=args.force)
        print(
            f"wrote ca.crt, ca.key, server.pem and server.key in {c.ca_cert.parent} "
            f"(server certificate for {', '.join(args.host)}, 127.0.0.1 and localhost)"
        )
        return
    from sim.certs import Certificates
    from sim.deploy import DeploymentError, run_local_deployment

    if args.insecure and args.certs:
        raise ValueError("--insecure and --certs exclude each other")
    cfg = _fed_config(args, args.num_nodes)  # all nodes connect before the run starts
    certs = Certificates.in_dir(args.certs) if args.certs else None

    try:
        result = run_local_deployment(
            cfg,
            args.num_nodes,
            tls=not args.insecure,
            certs=certs,
            node_budgets=list(args.node_budgets) if args.node_budgets else None,
            keep_workdir=args.keep_workdir,
            timeout_s=args.timeout_s,
            node_auth=not args.no_node_auth,
        )
    except DeploymentError as exc:
        print(f"peel-fed: error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"[peel-fed] deployed run: {result.wall_seconds:.0f} s wall; results in {result.out_dir}")


def _study(args) -> None:
    name = dataset_name(args.dataset, args.data_dir)
    cfg = study.StudyConfig(
        dataset=args.dataset,
        data_dir=args.data_dir or None,
        seed=args.seed,
        budgets=args.budgets,
        cold_start_fraction=args.cold_start_fraction,
        out_dir=args.out or f"docs/results/{name}" + (f"/seed-{args.seed}" if args.seed else ""),
        cache_dir=args.cache_dir,
        quick=args.quick,
        progress=not args.no_progress,
    )
    study.run_study(cfg, args.steps.split(",") if args.steps else None)


def main(argv: list[str] | None = None) -> int:
    """The ``peel-fed`` command; returns its exit status (130 after Ctrl-C, 143 after SIGTERM:
    either ends the run within seconds, keeping what was written atomically)."""
    import signal

    from sim.interrupts import raise_terminated

    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        return _main(argv)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="peel-fed", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_centralized(sub)
    _add_simulate(sub)
    _add_deploy(sub)
    _add_study(sub)
    _add_privacy(sub)
    args = parser.parse_args(argv)
    try:
        if args.command == "centralized":
            from peel_fed.pipeline import run_centralized

            cfg = PipelineConfig(
                dataset=args.dataset,
                data_dir=args.data_dir,
                seed=args.seed,
                num_user_groups=args.num_user_groups,
                budgets=args.budgets,
                out_dir=args.out,
                cache_dir=args.cache_dir,
                progress=not args.no_progress,
                baselines=not args.no_baselines,
                lightgcn=LightGCNConfig(
                    dim=args.dim,
                    layers=args.layers,
                    epochs=args.epochs,
                    batch_size=args.batch_size,
                    lr=args.lr,
                    num_blocks=args.num_blocks,
                    diversity_weight=args.diversity_weight,
                    nested_dims=args.nested_dims,
                    loss=args.loss,
                    negatives=args.negatives,
                    temperature=args.temperature,
                    negative_sampling=args.negative_sampling,
                    dns_candidates=args.dns_candidates,
                    lr_schedule=args.lr_schedule,
                ),
                peel=PEELConfig(
                    num_item_groups=args.num_item_groups,
                    num_blocks=args.num_blocks,
                    epochs=args.pee_epochs,
                    diversity_weight=args.diversity_weight,
                    lr=args.pee_lr,
                    unit_order=args.unit_order,
                    elastic=not args.no_elastic,
                ),
            )
            run_centralized(cfg)
        elif args.command == "simulate":
            _simulate(args)
        elif args.command == "deploy":
            _deploy(args)
        elif args.command == "study":
            _study(args)
        elif args.command == "privacy":
            _privacy(args, argv)
    except (
        DataError,
        BudgetError,
        GroupingError,
        ValueError,
        FileNotFoundError,
        FileExistsError,
    ) as exc:
        print(f"peel-fed: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        from sim.interrupts import Terminated

        what = "terminated" if isinstance(exc, Terminated) else "interrupted"
        print(f"peel-fed: {what}; finished outputs were written atomically", file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
