"""Run (or resume) the study: reuse each step whose saved key matches, run the others, and
rebuild the report from the saved steps."""

from __future__ import annotations

import json
import time
from pathlib import Path

from peel_fed.atomic import write_json_atomic, write_text_atomic
from peel_fed.console import log
from sim.study.plots import plot_dynamic_budgets, plot_metric_vs_bytes
from sim.study.report import build_report, report_markdown
from sim.study.steps import STEPS, StudyConfig


def step_path(cfg: StudyConfig, name: str) -> Path:
    """Where step ``name``'s result is saved: ``<out>/steps/<name>.json``."""
    return Path(cfg.out_dir) / "steps" / f"{name}.json"


_FINGERPRINTS: dict[tuple[str, str], str] = {}


def data_fingerprint(cfg: StudyConfig) -> str:
    """The content digest of the study's dataset (``Dataset.fingerprint``), read once per run."""
    from peel_fed.loading import load_dataset

    where = (cfg.dataset, str(Path(cfg.data_dir).resolve()) if cfg.data_dir else "")
    if where not in _FINGERPRINTS:
        _FINGERPRINTS[where] = load_dataset(cfg.dataset, cfg.data_dir).fingerprint()
    return _FINGERPRINTS[where]


def _matching_step(cfg: StudyConfig, name: str) -> tuple[dict | None, bool]:
    """(step ``name``'s saved result if its key matches ``cfg`` and it was computed on the same
    data, whether a file exists). A step saved before data fingerprints were recorded matches
    on its key alone."""
    path = step_path(cfg, name)
    if not path.is_file():
        return None, False
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise ValueError(_corrupt(path, name, str(exc))) from None
    if not isinstance(saved, dict) or not {"key", "seconds", "result"} <= saved.keys():
        raise ValueError(_corrupt(path, name, "not a saved step"))
    same_data = saved.get("data") in (None, data_fingerprint(cfg))
    return (saved if saved.get("key") == cfg.key(name) and same_data else None), True


def _corrupt(path: Path, name: str, why: str) -> str:
    """The one-line error for a saved step file that cannot be read."""
    return f"corrupt study step file {path} ({why}); delete it to run step {name} again"


def saved_step(cfg: StudyConfig, name: str) -> dict | None:
    """Step ``name``'s saved ``{"key", "seconds", "result"}`` if its key matches ``cfg``'s
    inputs, else ``None`` (not saved, or saved for other inputs)."""
    path = step_path(cfg, name)
    saved, exists = _matching_step(cfg, name)
    if not exists:
        return None
    if saved is not None:
        log(f"{name}: done earlier ({saved['seconds']:.0f} s), reusing {path}", source="study")
        return saved
    log(
        f"{name}: inputs or data changed since {path} was written; running it again",
        source="study",
    )
    return None


def run_step(cfg: StudyConfig, name: str) -> dict:
    """Run step ``name`` and save its result atomically with its key and wall time."""
    log(f"{name}: running", source="study")
    t0 = time.perf_counter()
    result = STEPS[name](cfg)
    saved = {
        "key": cfg.key(name),
        "data": data_fingerprint(cfg),
        "seconds": time.perf_counter() - t0,
        "result": result,
    }
    write_json_atomic(step_path(cfg, name), saved)
    log(f"{name}: done in {saved['seconds']:.0f} s", source="study")
    return saved


def write_report(cfg: StudyConfig, done: dict[str, dict]) -> dict:
    """Write ``results.json``, ``study.md`` and the plots under ``cfg.out_dir`` from the saved
    steps ``done`` (name -> saved step, in run order); returns the report."""
    out = Path(cfg.out_dir)
    report = json.loads(json.dumps(build_report(cfg, done)))  # as results.json holds it
    write_json_atomic(out / "results.json", report)
    write_text_atomic(out / "study.md", report_markdown(report))
    plot_metric_vs_bytes(report, "recall@20", out / "recall_vs_bytes.png")
    plot_metric_vs_bytes(report, "ndcg@20", out / "ndcg_vs_bytes.png")
    if report.get("drill") or report.get("trace"):
        plot_dynamic_budgets(report, out / "dynamic_budget.png")
    log(f"report: {out / 'study.md'}", source="study")
    return report


def run_study(cfg: StudyConfig, steps: list[str] | None = None) -> dict:
    """Run (or resume) the study's steps and rebuild the report; returns the report.

    With a subset of ``steps``, the report also holds every other step saved for the same inputs
    (reused as it is, never run), so that running one step keeps the others in the report.
    """
    done: dict[str, dict] = {}
    for name in steps or list(STEPS):
        if name not in STEPS:
            raise ValueError(f"unknown study step {name!r}: steps are {', '.join(STEPS)}")
        done[name] = saved_step(cfg, name) or run_step(cfg, name)
    for name in STEPS:
        if name not in done and (saved := _matching_step(cfg, name)[0]) is not None:
            log(f"{name}: not asked for; its saved result goes into the report", source="study")
            done[name] = saved
    return write_report(cfg, {name: done[name] for name in STEPS if name in done})
