"""``peel-fed privacy``: what each privacy setting costs the recommender, and what an
honest-but-curious server still learns, in one table.

For every setting (clear uploads, secure rows, decoy items, local DP, user-level central DP at
each target epsilon, distributed DP at each of its own) two measurements, both with the
setting's run config:

- the whole federated pipeline, in process (``sim.local_grid``: the real ServerApp and
  ClientApp, no Ray): Recall@20 of the default elastic embeddings (PEEL bit-planes) at 10, 25
  and 100% of the float32 item table's bytes, the up-link bytes of every phase, the wall
  seconds, and epsilon from the run's own privacy report;
- the attacks of ``peel_fed.attacks`` on pretraining, with ``--attack-targets`` users each on a
  node of its own: item inference (AUC of the user's training items against all others,
  precision@k) and user-vector reconstruction (cosine), on what the server of that setting can
  decode. Under central DP the server reads each clipped upload before it adds the noise, so its
  view is the same at every epsilon: central DP protects the released model, not the uploads.
  Under distributed DP the server sees only cohort sums, noised by the nodes; the attacks read
  the secure-rows view of the clipped uploads before that noise, an upper bound on the leak.

Every setting's two results are saved as they end (``<out>/privacy-settings/``) with the
arguments they came from and a hash of the code; a rerun with the same arguments and code
reuses them, so an interrupted report goes on where it stopped. Writes ``privacy.json``,
``privacy.md`` and ``privacy.png`` (Recall@20 and attack AUC against epsilon) in ``--out``, all
atomically.

Long file: about 490 lines, one command's whole composition (its settings, both measurements,
the saved settings, the table and the plot), none of it algorithm code.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import shlex
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from peel_fed.atomic import to_jsonable, write_atomic, write_json_atomic, write_text_atomic
from peel_fed.console import log
from peel_fed.fedconfig import ConfigError, FedConfig
from peel_fed.loading import load_dataset
from peel_fed.plane_eval import bit_planes_method
from peel_fed.privacy import DPConfig

REPORT_BUDGETS = (0.10, 0.25, 1.0)
ATTACK_VIEWS = ("clear", "secure rows")
DP_KINDS = {"central": {"marker": "o"}, "distributed": {"marker": "s", "ls": ":"}}


@dataclass(frozen=True)
class Setting:
    """One row of the report: its run-config keys and the server view the attacks read."""

    name: str
    run_config: dict[str, Any] = field(default_factory=dict)
    view: str = "clear"
    target_epsilon: float | None = None
    dp: str = ""  # "central" or "distributed" for the DP rows, plotted against epsilon

    @property
    def slug(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-")


def report_settings(
    epsilons: list[float],
    decoys: int,
    ldp_noise: float,
    clip: float,
    delta: float,
    distributed_epsilons: list[float] = (),
) -> list[Setting]:
    """The report's rows: clear, secure rows, ``decoys`` decoy items (0: no row), local DP at
    ``ldp_noise`` times the clip (0: no row), central DP at each of ``epsilons`` and
    distributed DP (secure rows, noise added by the nodes) at each of
    ``distributed_epsilons``."""
    dp = {"dp-clip": clip, "dp-delta": delta}
    rows = [Setting("clear uploads"), Setting("secure rows", {"secure-rows": True}, "secure rows")]
    if decoys:
        rows.append(Setting(f"{decoys} decoy items", {"decoy-items": decoys}))
    if ldp_noise:
        rows.append(
            Setting(
                f"local DP, noise {ldp_noise:g} x clip", {**dp, "ldp-noise-multiplier": ldp_noise}
            )
        )
    for eps in epsilons:
        rows.append(
            Setting(
                f"central DP, epsilon {eps:g}",
                {**dp, "dp-target-epsilon": eps},
                "clear",
                eps,
                "central",
            )
        )
    for eps in distributed_epsilons:
        rows.append(
            Setting(
                f"distributed DP, epsilon {eps:g}",
                {**dp, "dp-target-epsilon": eps, "secure-rows": True},
                "secure rows",
                eps,
                "distributed",
            )
        )
    return rows


def setting_config(base: dict[str, Any], setting: Setting) -> FedConfig:
    """The run config of ``setting`` over ``base`` (one-line ConfigError when invalid, e.g. an
    unreachable target epsilon)."""
    return FedConfig.from_run_config({**base, **setting.run_config})


def _recall_at(rows: list[dict], method: str, fraction: float) -> float | None:
    """Recall@20 of ``method`` at the budget level nearest ``fraction`` of the table."""
    mine = [r for r in rows if r["method"] == method]
    if not mine:
        return None
    best = min(mine, key=lambda r: abs(r["budget_fraction"] - fraction))
    return float(best["recall@20"]) if abs(best["budget_fraction"] - fraction) < 0.01 else None


def run_setting(cfg: FedConfig, num_nodes: int) -> dict:
    """The federated pipeline with ``cfg`` on ``num_nodes`` in-process nodes; the report's
    figures of it."""
    from sim.local_grid import LocalGrid, server_identity
    from strategies.server_app import run_pipeline

    with server_identity(), contextlib.redirect_stdout(io.StringIO()):  # its own tables
        report = run_pipeline(LocalGrid(num_nodes), cfg)
    privacy = report.get("privacy") or {}
    eps = (privacy.get("local") or privacy).get("epsilon", {}).get("covered")
    method = bit_planes_method(cfg.num_user_groups)
    up = {phase: int(b["up_bytes_total"]) for phase, b in report["bytes"].items()}
    return {
        "epsilon": None if eps is None else (float("inf") if eps == "inf" else float(eps)),
        "noise_multiplier": privacy.get("noise_multiplier"),
        "method": method,
        "recall@20": {f"{f:g}": _recall_at(report["rows"], method, f) for f in REPORT_BUDGETS},
        "up_bytes": up,
        "up_bytes_total": sum(up.values()),
        "wall_seconds": float(report["wall_seconds"]),
        "failures": sum(len(p["failures"]) for p in report["phases"]),
    }


def run_attacks(cfg: FedConfig, ds, targets: np.ndarray, passes: int) -> dict[str, dict]:
    """The attacks on ``passes`` passes of pretraining with ``cfg``, per server view."""
    from peel_fed.attacks import cosine, item_inference, observe_pretraining
    from peel_fed.fedlightgcn import rounds_per_pass_for

    dp = None if cfg.dp_clip == 0 else DPConfig(cfg.dp_clip, 0.0, cfg.dp_delta)  # before noise
    lg = cfg.lightgcn()
    rounds = passes * rounds_per_pass_for(lg.cohort_fraction)
    t0 = time.perf_counter()
    views, finals = observe_pretraining(
        ds.train, ds.n_users, ds.n_items, ds.item_popularity(), lg, targets, rounds, cfg.seed, dp
    )
    seconds = time.perf_counter() - t0
    bounds = ds.train.user_bounds(ds.n_users)
    out = {}
    for view in ATTACK_VIEWS:
        per_user = views[view]
        inf = [
            item_inference(v.item_scores(), ds.train.items[bounds[u] : bounds[u + 1]])
            for u, v in per_user.items()
        ]
        cos = [cosine(v.user_vector(), finals[u]) for u, v in per_user.items()]
        out[view] = {
            "view": view,
            "passes": passes,
            "auc_median": float(np.median([i["auc"] for i in inf])),
            "precision_at_k": float(np.mean([i["precision_at_k"] for i in inf])),
            "random_precision_at_k": float(np.mean([i["random_precision_at_k"] for i in inf])),
            "cosine_median": float(np.median(cos)),
            "seconds": seconds,
        }
    return out


def code_fingerprint() -> str:
    """A hash of the algorithm, device and server code (``peel_fed``, ``clients``,
    ``strategies``): a saved setting is reused only by the code that made it."""
    import clients
    import peel_fed
    import strategies

    h = hashlib.sha256()
    for package in (peel_fed, clients, strategies):
        root = Path(package.__file__).parent
        for path in sorted(root.rglob("*.py")):
            h.update(str(path.relative_to(root.parent)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def _saved(path: Path, key: dict) -> dict | None:
    """What ``path`` saved for ``key`` (None if nothing, or for another key)."""
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            return saved["result"]
    return None


def _measure(path: Path, key: dict, work: dict, num_nodes: int, threads: int = 0) -> str:
    """Compute one measurement (``work``: a pipeline run or the attacks) and save it with
    ``key``, atomically; returns what it measured, in a line. Top level, for a worker
    process."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    cfg = FedConfig.from_run_config(work["run_config"])
    if work["kind"] == "run":
        result = run_setting(cfg, num_nodes)
        line = (
            f"epsilon {_fmt(result['epsilon'], '.2f')}, Recall@20 "
            + ", ".join(_fmt(result["recall@20"][f"{f:g}"]) for f in REPORT_BUDGETS)
            + f", {result['wall_seconds']:.0f} s"
        )
    else:
        ds = load_dataset(cfg.dataset, cfg.data_dir or None)
        result = run_attacks(cfg, ds, np.array(work["targets"]), work["passes"])
        line = ", ".join(f"{v}: AUC {r['auc_median']:.3f}" for v, r in result.items())
    write_json_atomic(path, {"key": key, "result": result})
    return f"{path.stem}: {line}"


def _compute_all(todo: dict[Path, tuple[dict, dict]], num_nodes: int, jobs: int) -> None:
    """Every measurement of ``todo``, ``jobs`` at a time (worker processes, one torch thread
    each, when more than one)."""
    if jobs <= 1:
        for i, (path, (key, work)) in enumerate(todo.items(), 1):
            log(f"privacy {i}/{len(todo)}: {path.stem} ...")
            log(f"privacy {i}/{len(todo)}: {_measure(path, key, work, num_nodes)}")
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
        futures = [
            pool.submit(_measure, path, key, work, num_nodes, 1)
            for path, (key, work) in todo.items()
        ]
        for i, done in enumerate(as_completed(futures), 1):
            log(f"privacy {i}/{len(todo)}: {done.result()}")


def build_report(
    dataset: str = "gowalla",
    data_dir: str | None = None,
    seed: int = 0,
    num_nodes: int = 2,
    epsilons: tuple[float, ...] = (1.0, 4.0, 8.0),
    distributed_epsilons: tuple[float, ...] = (8.0,),
    decoys: int = 30,
    ldp_noise: float = 3.0,
    clip: float = 0.0,
    delta: float = 0.0,
    attack_targets: int = 100,
    attack_passes: int = 1,
    run_config: dict[str, Any] | None = None,
    jobs: int = 1,
    out: str | Path | None = None,
    command: str = "",
) -> dict:
    """Run (or reuse) every setting and write the report; returns it.

    ``clip`` 0 takes the median L2 norm of one user's first-round pretraining upload (as
    ``sim.bench_privacy``); ``delta`` 0 takes min(1e-5, 1 / n_users). Every setting's config is
    checked before anything runs, so a bad value (an unreachable epsilon) writes nothing.
    """
    ds = load_dataset(dataset, data_dir)
    out = Path(out or f"docs/results/{ds.name}")
    delta = delta or min(1e-5, 1.0 / ds.n_users)
    if not 0 < delta < 1:
        raise ConfigError(f"--delta must be in (0, 1), got {delta}")
    if not 0 < attack_targets <= ds.n_users:
        raise ConfigError(f"--attack-targets must be in 1..{ds.n_users}, got {attack_targets}")
    if min(attack_passes, num_nodes, jobs) < 1:
        raise ConfigError("--attack-passes, --num-nodes and --jobs must be >= 1")
    base = {
        "budgets": ",".join(f"{100 * f:g}%" for f in REPORT_BUDGETS),
        **(run_config or {}),
        "dataset": dataset,
        "data-dir": str(Path(data_dir).resolve()) if data_dir else "",
        "seed": seed,
        "min-nodes": num_nodes,
        "progress": False,
        "out-dir": "",
        "device-state-dir": "",
    }
    plain = FedConfig.from_run_config(base)
    if num_nodes > ds.n_users:
        raise ConfigError(f"--num-nodes ({num_nodes}) is more than the {ds.n_users} users")
    plain.checked_layout(ds.item_popularity(), ds.n_users)
    if not clip:
        from sim.bench_privacy import median_upload_norm

        clip = median_upload_norm(ds, plain.lightgcn(), seed)
    settings = report_settings(
        list(epsilons), decoys, ldp_noise, clip, delta, list(distributed_epsilons)
    )
    configs = {s.slug: setting_config(base, s) for s in settings}  # all checked before any run
    rng = np.random.default_rng(seed)
    degree = np.bincount(ds.train.users, minlength=ds.n_users)
    targets = np.sort(rng.choice(np.flatnonzero(degree > 0), attack_targets, replace=False))
    report: dict = {
        "dataset": ds.name,
        "command": command,
        "num_nodes": num_nodes,
        "clip": clip,
        "delta": delta,
        "attack_targets": attack_targets,
        "attack_passes": attack_passes,
        "jobs": jobs,
        "run_config": {k: v for k, v in base.items() if k not in ("out-dir", "progress")},
        "rows": [],
    }
    folder = out / "privacy-settings"
    code = code_fingerprint()
    tasks: dict[Path, tuple[dict, dict]] = {}  # saved file -> (key, what to compute)
    plan = []
    for s in settings:
        cfg = configs[s.slug]
        run_key = {"run_config": cfg.to_run_config(), "num_nodes": num_nodes, "code": code}
        run_path = folder / f"{s.slug}.run.json"
        tasks[run_path] = (run_key, {"kind": "run", "run_config": cfg.to_run_config()})
        # the attacks read uploads before any central noise, and one pretraining gives every
        # view: they run once per pretraining recipe and clip
        attack_key = {
            "pretraining": to_jsonable(asdict(cfg.lightgcn())),
            "clip": cfg.dp_clip,
            "seed": seed,
            "targets": targets.tolist(),
            "passes": attack_passes,
            "code": code,
        }
        same = [p for p, (k, _) in tasks.items() if k == attack_key]
        attack_path = same[0] if same else folder / f"{s.slug}.attack.json"
        if not same:
            work = {"kind": "attack", "run_config": cfg.to_run_config(), "passes": attack_passes}
            tasks[attack_path] = (attack_key, {**work, "targets": targets.tolist()})
        plan.append((s, run_path, attack_path))
    todo = {p: t for p, t in tasks.items() if _saved(p, t[0]) is None}
    log(
        f"privacy: {len(settings)} settings, {len(tasks)} measurements "
        f"({len(tasks) - len(todo)} saved before), {jobs} at a time"
    )
    _compute_all(todo, num_nodes, jobs)
    for s, run_path, attack_path in plan:
        row = {"setting": s.name, "target_epsilon": s.target_epsilon, "dp": s.dp}
        row.update(_saved(run_path, tasks[run_path][0]))
        row["attack"] = _saved(attack_path, tasks[attack_path][0])[s.view]
        report["rows"].append(row)
    base_run = report["rows"][0]
    for row in report["rows"]:
        row["time_over_clear"] = row["wall_seconds"] / base_run["wall_seconds"]
    text = report_markdown(report)
    write_json_atomic(out / "privacy.json", report)
    write_text_atomic(out / "privacy.md", text)
    plot_privacy(report, out / "privacy.png")
    print(text)
    log(f"wrote {out / 'privacy.md'}, privacy.json and privacy.png")
    return report


def _fmt(x: float | None, spec: str = ".4f") -> str:
    if x is None:
        return "-"
    return "inf" if x == float("inf") else format(x, spec)


def _row_line(row: dict) -> str:
    """The row of the report's table."""
    r, a = row["recall@20"], row["attack"]
    return (
        f"| {row['setting']} | {_fmt(row['epsilon'], '.2f')} | {a['auc_median']:.3f} | "
        f"{a['precision_at_k']:.3f} | {a['cosine_median']:.3f} | "
        + " | ".join(_fmt(r[f"{f:g}"]) for f in REPORT_BUDGETS)
        + f" | {row['up_bytes_total'] / 2**20:,.1f} | {row['wall_seconds']:.0f} "
        f"| {row['time_over_clear']:.2f} |"
    )


def report_markdown(report: dict) -> str:
    """The report's table and how it was made."""
    budgets = " | ".join(f"R@20 at {100 * f:g}%" for f in REPORT_BUDGETS)
    first = report["rows"][0]
    a = first["attack"]
    lines = [
        f"## Privacy on {report['dataset']}: what each setting costs, and what the server learns",
        "",
        f"Command: `{report['command']}`. The federated pipeline in process "
        f"(`sim.local_grid`, the real ServerApp and ClientApp) on {report['num_nodes']} nodes, "
        f"{report['jobs']} setting(s) at a time"
        + (" (one process and torch thread each)" if report["jobs"] > 1 else "")
        + ", "
        f"run config {_run_config_text(report['run_config'])}; Recall@20 of "
        f"{first['method']} at each share of the float32 item table's bytes. Attacks "
        f"(`peel_fed.attacks`): {report['attack_targets']} users, each on a node of its own, "
        f"over {report['attack_passes']} pass(es) of pretraining; item AUC is the median over "
        f"users (random guessing 0.5), precision@k the mean (random "
        f"{a['random_precision_at_k']:.4f}), "
        f"cosine the median between the server's estimate and the true user vector. DP: clip "
        f"{report['clip']:.4g}, delta {report['delta']:.3g}; central-DP epsilon covers "
        "pretraining and PEE learning (the run's `privacy` section names what it does not "
        "cover); local-DP epsilon covers a user's pretraining and PEE uploads. Up-link: every "
        "phase, all nodes.",
        "",
        f"| setting | epsilon | item AUC | precision@k | vector cosine | {budgets} "
        "| up-link MiB | wall s | time over clear |",
        "|---|---|---|---|---|" + "---|" * len(REPORT_BUDGETS) + "---|---|---|",
        *(_row_line(r) for r in report["rows"]),
        "",
        "What each setting protects (see docs/federated.md, threat model): secure rows hide a "
        "node's values and rows inside the cohort's sum; decoys blur which rows are the user's; "
        "local DP noises the values on the device but not which rows were touched; central DP "
        "protects the released sums and the model, and not the uploads, which the server reads "
        "before it adds noise, so its attack columns do not change with epsilon; distributed DP "
        "has the nodes add the noise under secure aggregation, so the server sees only noised "
        "cohort sums (its attack columns read those sums before the noise: an upper bound).",
    ]
    return "\n".join(lines) + "\n"


def _run_config_text(run_config: dict) -> str:
    shown = {k: v for k, v in run_config.items() if v not in ("", None) and k != "min-nodes"}
    return "`" + " ".join(f"{k}={json.dumps(v)}" for k, v in shown.items()) + "`"


def plot_privacy(report: dict, path: Path) -> None:
    """Recall@20 and attack AUC of the DP rows (central and distributed) against epsilon, the
    other settings as horizontal lines, as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dp = sorted((r for r in report["rows"] if r["target_epsilon"]), key=lambda r: r["epsilon"])
    kinds = {kind: [r for r in dp if r.get("dp", "central") == kind] for kind in DP_KINDS}
    others = [r for r in report["rows"] if not r["target_epsilon"]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for j, f in enumerate(REPORT_BUDGETS):
        key = f"{f:g}"
        for kind, rows in kinds.items():
            if rows:
                left.plot([r["epsilon"] for r in rows], [r["recall@20"][key] or 0 for r in rows],
                          color=colours[j], **DP_KINDS[kind],
                          label=f"{kind} DP, {100 * f:g}% of bytes")  # fmt: skip
        clear = others[0]["recall@20"][key] if others else None
        if clear is not None:
            left.axhline(clear, color=colours[j], ls="--", lw=1, label=f"clear, {100 * f:g}%")
    left.set_xlabel(f"epsilon (delta {report['delta']:.2g})")
    left.set_ylabel("Recall@20")
    for kind, rows in kinds.items():
        if rows:
            right.plot([r["epsilon"] for r in rows], [r["attack"]["auc_median"] for r in rows],
                       color="k", **DP_KINDS[kind], label=f"{kind} DP")  # fmt: skip
    for j, r in enumerate(others):
        right.axhline(r["attack"]["auc_median"], color=colours[(j + 3) % len(colours)], ls="--",
                      lw=1, label=r["setting"])  # fmt: skip
    right.axhline(0.5, color="grey", ls=":", lw=1, label="random guessing")
    right.set_xlabel("epsilon")
    right.set_ylabel("item-inference AUC (server)")
    right.set_ylim(0.4, 1.02)
    for ax in (left, right):
        if dp:
            ticks = sorted({round(r["epsilon"], 2) for r in dp})
            ax.set_xscale("log")
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
            ax.minorticks_off()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Privacy on {report['dataset']}")
    fig.tight_layout()
    write_atomic(path, lambda fh: fig.savefig(fh, format="png", dpi=120))
    plt.close(fig)


def command_line(argv: list[str]) -> str:
    return "peel-fed privacy " + shlex.join(argv)
