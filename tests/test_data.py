"""Data loading, validation errors, the validation split and popularity."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np
import pytest

from peel_fed.data import (
    DataError,
    Interactions,
    from_pairs,
    id_limit,
    split_validation,
    verify_checksums,
)
from peel_fed.loading import load_dataset

# A small, valid LightGCN dataset: user 3 has a line with no train items.
TRAIN = {0: [0, 1, 2], 1: [2, 3], 2: [4], 3: []}
TEST = {0: [3], 1: [0, 4], 2: [1]}


@pytest.fixture(scope="session")
def gowalla():
    return load_dataset("gowalla")


def test_bundled_gowalla_has_published_sizes(gowalla):
    assert gowalla.n_users == 29_858
    assert gowalla.n_items == 40_981
    assert len(gowalla.train) == 810_128
    assert len(gowalla.test) == 217_242
    s = gowalla.summary()
    assert "\n" not in s
    for part in ("gowalla", "29,858 users", "40,981 items", "810,128 train", "217,242 test"):
        assert part in s


def test_plain_and_gzip_folders_agree(tmp_path, write_lightgcn_folder):
    plain = load_dataset(data_dir=write_lightgcn_folder(tmp_path / "plain", TRAIN, TEST))
    zipped = load_dataset(data_dir=write_lightgcn_folder(tmp_path / "gz", TRAIN, TEST, gz=True))
    assert (tmp_path / "gz" / "train.txt.gz").is_file()
    for ds in (plain, zipped):
        assert ds.n_users == 4  # user 3 has no items but still counts
        assert ds.n_items == 5
        assert len(ds.train) == 6 and len(ds.test) == 4
        assert ds.user_degree()[3] == 0
    np.testing.assert_array_equal(plain.train.users, [0, 0, 0, 1, 1, 2])
    np.testing.assert_array_equal(plain.train.items, [0, 1, 2, 2, 3, 4])
    np.testing.assert_array_equal(plain.test.users, [0, 1, 1, 2])
    np.testing.assert_array_equal(plain.test.items, [3, 0, 4, 1])
    for a, b in ((plain.train, zipped.train), (plain.test, zipped.test)):
        np.testing.assert_array_equal(a.users, b.users)
        np.testing.assert_array_equal(a.items, b.items)


def test_folder_name_becomes_dataset_name(tmp_path, write_lightgcn_folder):
    ds = load_dataset(data_dir=write_lightgcn_folder(tmp_path / "mini", TRAIN, TEST))
    assert ds.name == "mini"


def _expect(*args, **kwargs):
    with pytest.raises(DataError) as err:
        load_dataset(*args, **kwargs)
    return err


def test_missing_folder(tmp_path):
    err = _expect(data_dir=tmp_path / "nowhere")
    assert "dataset folder not found" in str(err.value)
    assert "nowhere" in str(err.value)


def test_missing_test_file(tmp_path, write_lightgcn_folder):
    folder = write_lightgcn_folder(tmp_path / "d", TRAIN, TEST)
    (folder / "test.txt").unlink()
    err = _expect(data_dir=folder)
    assert "dataset file missing" in str(err.value)
    assert "test.txt" in str(err.value)


def test_truncated_gzip(tmp_path, write_lightgcn_folder):
    big_train = {u: list(range(u % 7, 200, 3)) for u in range(300)}
    folder = write_lightgcn_folder(tmp_path / "d", big_train, {0: [1]}, gz=True)
    path = folder / "train.txt.gz"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises((EOFError, OSError)):
        gzip.decompress(path.read_bytes())  # the file really is broken
    err = _expect(data_dir=folder)
    assert "corrupt or truncated" in str(err.value)
    assert "train.txt.gz" in str(err.value)


def test_non_integer_id(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "train.txt").write_text("0 1 2\n1 3 x\n")
    (folder / "test.txt").write_text("0 4\n")
    err = _expect(data_dir=folder)
    assert "non-integer id" in str(err.value)
    assert "line 2" in str(err.value)


@pytest.mark.parametrize(
    "stem, line, kind", [("train", "2 1000000000000", "item"), ("test", "1000000000000 1", "user")]
)
def test_a_huge_id_is_refused_naming_the_file_and_the_id(
    tmp_path, write_lightgcn_folder, stem, line, kind
):
    folder = write_lightgcn_folder(tmp_path / "d", TRAIN, TEST)
    with open(folder / f"{stem}.txt", "a") as fh:
        fh.write(line + "\n")
    err = str(_expect(data_dir=folder).value)
    assert err.startswith(f"{kind} id 1000000000000 in {folder / f'{stem}.txt'} is too large")
    assert "\n" not in err


def test_ids_may_exceed_the_distinct_ids_by_the_documented_rule(tmp_path, write_lightgcn_folder):
    # 6 distinct items with the new one: ids up to 100 * 6 + 1,000,000
    assert id_limit(6) == 1_000_600 and id_limit(10**9) == 2**31 - 1
    folder = write_lightgcn_folder(tmp_path / "ok", TRAIN, {**TEST, 2: [1, 1_000_600]})
    assert load_dataset(data_dir=folder).n_items == 1_000_601
    folder = write_lightgcn_folder(tmp_path / "bad", TRAIN, {**TEST, 2: [1, 1_000_601]})
    assert "item id 1000601 in" in str(_expect(data_dir=folder).value)


def test_test_users_without_training_items_are_a_one_line_warning(
    tmp_path, write_lightgcn_folder, capsys
):
    folder = write_lightgcn_folder(tmp_path / "d", TRAIN, TEST)
    load_dataset(data_dir=folder)
    assert "warning" not in capsys.readouterr().out
    folder = write_lightgcn_folder(tmp_path / "cold", TRAIN, {**TEST, 3: [0], 4: [1, 2]})
    ds = load_dataset(data_dir=folder)
    assert (ds.n_users, len(ds.test)) == (5, 4 + 3)  # their test items are kept
    out = capsys.readouterr().out.strip()
    assert out == (
        f"[peel-fed] warning: 2 test users in {folder / 'test.txt'} have no training "
        "interactions; they are evaluated like every other user"
    )


def test_train_test_overlap(tmp_path, write_lightgcn_folder):
    folder = write_lightgcn_folder(tmp_path / "d", {0: [1, 2], 1: [0]}, {0: [2], 1: [3]})
    err = _expect(data_dir=folder)
    assert "train/test overlap" in str(err.value)
    assert "user 0 item 2" in str(err.value)


def test_ids_out_of_declared_range(tmp_path, write_lightgcn_folder):
    # item_list.txt has a header and 3 rows: items 0..2, but item 4 is used.
    folder = write_lightgcn_folder(
        tmp_path / "d", TRAIN, TEST, extra={"item_list.txt": "org_id remap_id\na 0\nb 1\nc 2\n"}
    )
    err = _expect(data_dir=folder)
    assert "item ids out of range" in str(err.value)
    assert "declares 3 items" in str(err.value)


def test_declared_id_map_extends_counts(tmp_path, write_lightgcn_folder):
    folder = write_lightgcn_folder(
        tmp_path / "d",
        TRAIN,
        TEST,
        extra={"item_list.txt": "org_id remap_id\n" + "".join(f"x {i}\n" for i in range(9))},
    )
    assert load_dataset(data_dir=folder).n_items == 9


def test_checksums(tmp_path, write_lightgcn_folder):
    folder = write_lightgcn_folder(tmp_path / "d", TRAIN, TEST)
    good = {
        n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in ("train.txt", "test.txt")
    }
    (folder / "SHA256SUMS").write_text("".join(f"{d}  {n}\n" for n, d in good.items()))
    verify_checksums(folder)  # matching sums pass
    (folder / "train.txt").write_text("0 0 1 2\n1 2 3\n2 4\n3 1\n")  # tampered
    with pytest.raises(DataError) as err:
        verify_checksums(folder)
    assert "corrupt dataset file" in str(err.value)
    assert "sha256" in str(err.value)
    assert "train.txt" in str(err.value)


def test_unknown_bundled_name():
    err = _expect("movielens-1m")
    assert "unknown dataset 'movielens-1m'" in str(err.value)
    assert "gowalla" in str(err.value)


# --- validation split ------------------------------------------------------------------------


def _random_train(seed: int = 0, n_users: int = 40, n_items: int = 30) -> Interactions:
    rng = np.random.default_rng(seed)
    degrees = rng.integers(0, 15, size=n_users)
    degrees[:3] = [0, 1, 2]  # make sure the edge cases are present
    pairs = [(u, i) for u in range(n_users) for i in rng.choice(n_items, degrees[u], replace=False)]
    pairs = np.array(pairs)
    return from_pairs("r", n_users, n_items, pairs, np.zeros((0, 2), dtype=np.int64)).train


def _pair_set(x: Interactions) -> set[tuple[int, int]]:
    return set(zip(x.users.tolist(), x.items.tolist(), strict=True))


def test_split_validation_partition_and_per_user_rules():
    train = _random_train()
    n_users = 40
    split = split_validation(train, n_users, val_fraction=0.2, seed=5)
    all_pairs = _pair_set(train)
    fit, val = _pair_set(split.fit), _pair_set(split.val)
    assert fit | val == all_pairs
    assert not fit & val
    assert len(split.fit) + len(split.val) == len(train)
    assert val <= all_pairs  # validation pairs come from train only
    deg = np.bincount(train.users, minlength=n_users)
    fit_deg = np.bincount(split.fit.users, minlength=n_users)
    val_deg = np.bincount(split.val.users, minlength=n_users)
    for u in range(n_users):
        if deg[u] >= 2:
            assert fit_deg[u] >= 1 and val_deg[u] >= 1
            # max(1, round(0.2 n)) capped at n - 1, e.g. 2 items -> 1, 14 items -> 3
            assert val_deg[u] == min(deg[u] - 1, max(1, round(0.2 * deg[u])))
        else:
            assert fit_deg[u] == deg[u] and val_deg[u] == 0


def test_split_validation_seeded():
    train = _random_train()
    a = split_validation(train, 40, seed=1)
    b = split_validation(train, 40, seed=1)
    c = split_validation(train, 40, seed=2)
    assert _pair_set(a.val) == _pair_set(b.val)
    assert _pair_set(a.val) != _pair_set(c.val)


def test_split_validation_rejects_bad_fraction():
    with pytest.raises(ValueError, match="val_fraction"):
        split_validation(_random_train(), 40, val_fraction=1.0)


def test_item_popularity_hand_count():
    train = np.array([(0, 0), (0, 2), (1, 2), (2, 2), (2, 3)])
    test = np.array([(1, 4), (0, 1)])
    ds = from_pairs("t", 3, 5, train, test)
    # item 0 once, 1 never in train, 2 three times, 3 once, 4 only in test
    np.testing.assert_array_equal(ds.item_popularity(), [1, 0, 3, 1, 0])
    assert ds.item_popularity().dtype == np.int64


def test_from_pairs_range_check():
    with pytest.raises(DataError, match="train ids out of range"):
        from_pairs("t", 2, 3, np.array([(0, 3)]), np.zeros((0, 2)))


def test_bundled_data_is_found_when_the_code_runs_from_a_flower_app_bundle(tmp_path):
    """``flwr run`` ships only code (a FAB) and imports it ahead of the installed package; the
    bundled Gowalla files must then come from the installed peel-fed."""
    import shutil
    import subprocess
    import sys

    import peel_fed

    fab = tmp_path / "fab"
    shutil.copytree(
        Path(peel_fed.__file__).parent,
        fab / "peel_fed",
        ignore=lambda d, names: [
            n for n in names if not (n.endswith(".py") or (Path(d) / n).is_dir())
        ],
    )
    assert {f.suffix for f in (fab / "peel_fed").rglob("*") if f.is_file()} == {".py"}
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import peel_fed.loading as d; "
        "assert d.__file__.startswith(sys.argv[1]), d.__file__; "
        "ds = d.load_dataset('gowalla'); print(ds.n_users, ds.n_items)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(fab)], capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["29858", "40981"]


def test_a_run_names_its_dataset_by_the_folder_it_reads():
    from peel_fed.loading import dataset_name

    assert dataset_name("gowalla", None) == "gowalla"
    assert dataset_name("gowalla", "") == "gowalla"
    assert dataset_name("gowalla", "../shared/data/yelp2018") == "yelp2018"
    assert dataset_name("gowalla", "/data/gowalla/") == "gowalla"
    assert dataset_name("mine", "/data/yelp2018") == "mine"  # a name the user gave wins
