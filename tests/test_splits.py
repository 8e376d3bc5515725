"""Five-fold splits identical to nnU-Net v2's (scikit-learn KFold(5, shuffle=True, random_state=12345) over the
sorted ids). The expected folds were produced once with scikit-learn 1.9.1 / numpy 2.4.6 running nnU-Net's
``generate_crossval_split`` algorithm, and agree with autoseg's numpy-only version for 5-489 cases."""

import json

import pytest

from autoseg.errors import AutosegError
from autoseg.training.splits import kfold_val_indices, load_or_create_splits, make_splits

# nnU-Net v2 validation folds for case_00000..case_00012 (indices into the sorted ids)
NNUNET_13 = [[0, 7, 9], [3, 6, 10], [8, 11, 12], [1, 4], [2, 5]]
# ... for the 24 cases of the demo phantom's size
NNUNET_24 = [[8, 10, 12, 18, 20], [0, 3, 14, 15, 17], [7, 11, 13, 16, 19], [6, 9, 21, 22, 23], [1, 2, 4, 5]]
# fold 0 of the 210 KiTS19 training cases (case_00000..case_00209), as nnU-Net's splits_final.json holds it
NNUNET_KITS19_FOLD0 = [14, 16, 17, 19, 20, 27, 30, 33, 47, 49, 52, 54, 56, 67, 68, 70, 78, 89, 92, 94, 99, 103, 110,
                       116, 128, 139, 148, 149, 152, 153, 155, 160, 165, 178, 179, 180, 181, 188, 194, 196, 204, 205]


def _ids(n):
    return [f"case_{i:05d}" for i in range(n)]


@pytest.mark.parametrize("n, expected", [(13, NNUNET_13), (24, NNUNET_24),
                                         (5, [[0], [4], [3], [1], [2]]), (6, [[3, 5], [4], [0], [1], [2]])])
def test_folds_match_nnunet(n, expected):
    ids = _ids(n)
    splits = make_splits(list(reversed(ids)))  # order of the input does not matter: ids are sorted first
    assert [s["val"] for s in splits] == [[ids[i] for i in fold] for fold in expected]
    for s in splits:
        assert s["train"] == [c for c in ids if c not in s["val"]]


def test_kits19_fold0_matches_nnunet():
    ids = _ids(210)
    splits = make_splits(ids)
    assert splits[0]["val"] == [ids[i] for i in NNUNET_KITS19_FOLD0]
    assert [len(s["val"]) for s in splits] == [42] * 5


def test_fold_sizes_follow_kfold():
    assert [len(f) for f in kfold_val_indices(13)] == [3, 3, 3, 2, 2]  # the first n % 5 folds are one larger
    assert sorted(i for f in kfold_val_indices(131) for i in f) == list(range(131))


def test_ids_sort_as_strings_like_numpy():
    ids = ["b10", "b2", "a", "B", "b1"]
    splits = make_splits(ids)
    ordered = sorted(ids)  # numpy.sort on strings: code-point order, as Python's sorted
    assert [s["val"] for s in splits] == [[ordered[i]] for i in [0, 4, 3, 1, 2]]


def test_too_few_cases():
    with pytest.raises(AutosegError, match="--fold all"):
        make_splits(_ids(4))


def test_existing_splits_file_is_honoured(tmp_path):
    ids = _ids(10)
    old = [{"train": ids[2:], "val": ids[:2]}] + [{"train": ids[:-2], "val": ids[-2:]}] * 4  # e.g. an older autoseg's
    path = tmp_path / "splits.json"
    path.write_text(json.dumps(old))
    assert load_or_create_splits(path, ids) == old
    new = tmp_path / "new" / "splits.json"
    assert load_or_create_splits(new, ids) == make_splits(ids) == json.loads(new.read_text())
