import pytest

from autoseg.phantom import write_dataset


@pytest.fixture()
def roots(tmp_path, monkeypatch):
    """Isolated AUTOSEG_* folders under tmp_path."""
    paths = {k: tmp_path / k.lower() for k in ("AUTOSEG_RAW", "AUTOSEG_PREPROCESSED", "AUTOSEG_RESULTS")}
    for k, v in paths.items():
        monkeypatch.setenv(k, str(v))
    return paths


@pytest.fixture()
def small_dataset(roots):
    """Six small phantom training cases (and two test cases) in the raw layout; returns the dataset folder."""
    return write_dataset(roots["AUTOSEG_RAW"], 6, seed=7, size="small", num_test=2)
