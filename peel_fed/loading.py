"""Datasets by name: the bundled ones, the synthetic ones, or any LightGCN-format folder.

The one place that resolves a dataset name (``--dataset``, the run config's ``dataset``): it sits
above :mod:`peel_fed.data` (reading folders) and :mod:`peel_fed.synthetic` (generators), which
do not import each other's way back up.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from peel_fed.data import DataError, Dataset, read_lightgcn_folder, verify_checksums
from peel_fed.synthetic import SYNTHETIC_DATASETS, synthetic_dataset

BUNDLED_DATASETS = ("gowalla",)


def load_dataset(
    name: str = "gowalla", data_dir: str | Path | None = None, check_overlap: bool = True
) -> Dataset:
    """Load a bundled or synthetic dataset by name, or any LightGCN-format folder from
    ``data_dir``.

    Raises
    ------
    DataError
        Missing folder or file, corrupt or truncated file, train/test overlap.
    """
    if data_dir is None and name in SYNTHETIC_DATASETS:
        return synthetic_dataset(name)
    if data_dir is None:
        folder = bundled_path(name)
        verify_checksums(folder)
    else:
        folder = Path(data_dir).expanduser()
        if not folder.is_dir():
            raise DataError(f"dataset folder not found: {folder}")
        name = dataset_name(name, folder)
    return read_lightgcn_folder(folder, name, check_overlap)


def dataset_name(name: str = "gowalla", data_dir: str | Path | None = None) -> str:
    """The name a run reports: ``name``, or the folder's name when ``data_dir`` is given and
    ``name`` is the default (``--data-dir ../shared/data/yelp2018`` is "yelp2018")."""
    if data_dir is None or not str(data_dir):
        return name
    folder = Path(data_dir).expanduser().name
    return folder if name == "gowalla" and folder != "gowalla" else name


def bundled_path(name: str) -> Path:
    """Folder of a dataset shipped inside the package (``gowalla``)."""
    if name not in BUNDLED_DATASETS:
        raise DataError(
            f"unknown dataset {name!r}: bundled datasets are {', '.join(BUNDLED_DATASETS)} "
            f"(synthetic: {', '.join(SYNTHETIC_DATASETS)}); "
            "give other LightGCN-format folders with --data-dir"
        )
    here = Path(str(resources.files("peel_fed") / "datasets" / name))

    def has_data(folder: Path) -> bool:
        return any((folder / f).is_file() for f in ("train.txt.gz", "train.txt"))

    if has_data(here):
        return here
    # A Flower app bundle (FAB) carries only code and text: when the apps run from one (``flwr
    # run``), the data files come from the peel-fed installed next to Flower on that machine.
    for root in _installed_package_dirs():
        folder = root / "datasets" / name
        if has_data(folder):
            return folder
    return here


def _installed_package_dirs() -> list[Path]:
    """Every ``peel_fed`` folder the import system could find, in search order: each
    ``sys.path`` entry, then meta-path finders such as an editable install's."""
    import importlib.machinery
    import sys

    dirs = [Path(e) / "peel_fed" for e in sys.path if e and (Path(e) / "peel_fed").is_dir()]
    for finder in sys.meta_path:
        if isinstance(finder, type) and finder is importlib.machinery.PathFinder:
            continue
        try:
            spec = finder.find_spec("peel_fed", None)
        except (AttributeError, ImportError, TypeError, ValueError):
            continue
        if spec is not None and spec.submodule_search_locations:
            dirs += [Path(p) for p in spec.submodule_search_locations]
    return dirs
