"""The study: every method at equal device bytes, one resumable command per dataset.

``peel-fed study`` (or ``python -m sim.study``, with the same options) composes the core and the
federated pipeline:

1. ``centralized``: pretrain LightGCN, PEEL blocks with G_u = 4 and G_u = 1, first-k blocks and
   random units at every budget (``peel_fed.pipeline.run_centralized``);
2. ``pruning``: magnitude pruning of the pretrained item table, stored sparsely, with float32
   and with int8 values (``peel_fed.baselines``, ``peel_fed.budget_rows``);
3. ``lightgcn-per-budget``: LightGCN retrained for each budget at the largest dimension that
   fits it; ``per-budget-quantized``: those models row-quantized (d and bits chosen on
   validation);
4. ``matryoshka``: one nested (Matryoshka) LightGCN cut to every budget: its leading columns at
   float32, and the best row-quantized cut by validation Recall@20 (``peel_fed.matryoshka``);
   ``peel-as-published``: PEEL with float32 blocks as the paper describes it;
5. ``federated``: federated PEEL in Flower's simulation (``sim.simulate``): bit-planes (the
   default) and blocks, with heterogeneous
   device budgets and the dynamic-budget drill (a device at the largest budget cuts to each
   smaller one);
6. ``cold-start``: users held out of all training join the nearest group from their own items
   (``peel_fed.coldstart``), evaluated per budget next to the same run's warm users;
7. ``bit-planes``: PEEL's units as bit-planes of popularity item groups, with one global order
   and one per K-Means user group, and direct row quantization (per budget the bits x leading
   dims with the best validation Recall@20; int8 to 1-bit at their own bytes) of the pretrained
   tables (``peel_fed.plane_eval``);
8. ablations, one step each: no diversity regulariser, uniform weights (controller off), joint
   training instead of bi-level, G_u = 2 and 8, half and twice the blocks (in PEE learning and
   pretraining's regulariser, or in PEE learning only, with the reference's pretrained model).

Each step's result is saved atomically under ``<out>/steps/`` with a key of its inputs. A rerun
skips the steps whose saved key matches, so an interrupted study resumes where it stopped. The
report (``study.md``, ``results.json``, PNG plots) is rebuilt from the saved steps every time; it
includes the dynamic-budget trace: cut on the device (PEEL, magnitude pruning, bit-planes,
Matryoshka leading dims) against a retrained model per budget.

Modules: ``config`` (the config, its keys and what steps share), ``steps`` (the steps, in run
order) and ``baseline_steps`` (the baselines' steps), ``runner`` (resume and save),
``report`` (``results.json`` and ``study.md``) and ``plots``. The command's options are parsed
in ``sim.cli`` with the other commands.
"""

from sim.study.report import build_report, report_markdown
from sim.study.runner import run_study, saved_step, write_report
from sim.study.steps import STEPS, STUDY_BUDGETS, StudyConfig

__all__ = [
    "STEPS",
    "STUDY_BUDGETS",
    "StudyConfig",
    "build_report",
    "report_markdown",
    "run_study",
    "saved_step",
    "write_report",
]
