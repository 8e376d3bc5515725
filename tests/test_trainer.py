"""Fold training end to end on small phantoms with a tiny network (CPU, one thread, seconds per test).

The planned 3d_fullres network is replaced in ``plans.json`` by a three-stage U-Net with a small patch, so every
stage of ``train_fold`` runs for real (sampling, augmentation, deep-supervised loss, SGD, checkpoints, logs,
sliding-window validation restored to the original grid) at a cost a laptop CPU can take in a test.
"""

import dataclasses
import json
import math
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from safetensors.torch import load_file

import autoseg.training.trainer as trainer
from autoseg.cli import main
from autoseg.training.data import BatchLoader, region_targets, sampling_index
from autoseg.training.sampling import class_shares
from autoseg.errors import AutosegError
from autoseg.labels import label_layout
from autoseg.network import build_network, ds_scales
from autoseg.layout import Roots
from autoseg.phantom import write_dataset
from autoseg.schemas import validate
from autoseg.training.schedule import DEFAULT_LR, choose_schedule
from autoseg.training.trainer import TrainOptions, train_fold

NAME = "Dataset501_AbdomenPhantom"
REPO = Path(__file__).resolve().parents[1]
TINY_NET = {"strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2]], "kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3]],
            "convs_per_stage": 2, "deep_supervision": True, "encoder": "plain"}
LOG_KEYS = {"epoch", "train_loss", "val_loss", "pseudo_dice", "ema_dice", "lr", "epoch_s", "iterations"}
# fp32: two separate runs compared bit by bit must not depend on a timing measurement (precision "auto")
QUICK = dict(device="cpu", num_workers=0, precision="fp32")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: on a shared 2-core machine two threads can be many times slower, and results are
    reproducible. OMP_NUM_THREADS in the environment also makes train_fold (and torchrun children) keep it."""
    threads = torch.get_num_threads()
    mp = pytest.MonkeyPatch()
    mp.setenv("OMP_NUM_THREADS", "1")
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        mp.delenv(var, raising=False)
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    mp.undo()


def env_of(roots: Roots) -> dict[str, str]:
    return {"AUTOSEG_RAW": str(roots.raw), "AUTOSEG_PREPROCESSED": str(roots.preprocessed),
            "AUTOSEG_RESULTS": str(roots.results)}


def prepare(base: Path, num_cases: int, seed: int, patch: list[int], features: list[int],
            labels: dict | None = None, regions_class_order: list[int] | None = None) -> Roots:
    """A small phantom, planned and preprocessed for 3d_fullres, then given a tiny network in plans.json."""
    roots = Roots(base / "raw", base / "preprocessed", base / "results")
    folder = write_dataset(roots.raw, num_cases, seed=seed, size="small")
    if labels is not None:  # e.g. region labels
        meta = json.loads((folder / "dataset.json").read_text())
        meta["labels"] = labels
        if regions_class_order is not None:
            meta["regions_class_order"] = regions_class_order
        (folder / "dataset.json").write_text(json.dumps(meta))
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env_of(roots).items():
            mp.setenv(k, v)
        assert main(["plan_and_preprocess", "-d", "501", "-np", "1", "-c", "3d_fullres", "--device", "cpu"]) == 0
    path = roots.preprocessed / NAME / "plans.json"
    plans = json.loads(path.read_text())
    cfg = plans["configurations"]["3d_fullres"]
    cfg["patch_size"], cfg["batch_size"] = list(patch), 2
    cfg["network"] = {**TINY_NET, "features": list(features)}
    validate(plans, "plans", str(path))
    path.write_text(json.dumps(plans, indent=1))
    return roots


def with_results(roots: Roots, results: Path) -> Roots:
    return Roots(roots.raw, roots.preprocessed, results)


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def tiny_config(roots: Roots) -> dict:
    return json.loads((roots.preprocessed / NAME / "plans.json").read_text())["configurations"]["3d_fullres"]


def initial_weights(config: dict, n_out: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """The weights train_fold starts from (it seeds torch with opts.seed right before building the network)."""
    torch.manual_seed(seed)
    return build_network(config, 1, n_out).state_dict()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def phantom6(tmp_path_factory):
    """Six small phantom cases (as in conftest's small_dataset), preprocessed, tiny network, 16x32x32 patches."""
    return prepare(tmp_path_factory.mktemp("phantom6"), 6, seed=7, patch=[16, 32, 32], features=[4, 8, 16])


@pytest.fixture(scope="module")
def trained(phantom6, tmp_path_factory):
    """Fold 0, 3 epochs x 10 iterations with the default optimiser settings, validation on."""
    roots = with_results(phantom6, tmp_path_factory.mktemp("trained"))
    opts = TrainOptions(epochs=3, iters_per_epoch=10, val_iters=2, **QUICK)
    out = train_fold(NAME, "3d_fullres", 0, opts, roots)
    return roots, out, opts


# ----------------------------------------------------------------------------------------- one short run


def test_train_loss_decreases(trained):
    _, out, opts = trained
    log = read_log(out)
    assert [r["epoch"] for r in log] == [0, 1, 2]
    losses = [r["train_loss"] for r in log]
    assert all(math.isfinite(v) and v > 0 for v in losses)
    assert losses[-1] < losses[0], losses
    schedule = choose_schedule(30)  # 3 epochs x 10 iterations: AdamW, a 1-iteration warm-up
    assert schedule.optimizer == "adamw"
    assert [r["lr"] for r in log] == pytest.approx([schedule.lr_at(10 * e, e / 3) for e in range(3)])
    assert [r["iterations"] for r in log] == [10, 20, 30]
    setup = json.loads((out / "training_setup.json").read_text())
    assert setup["precision"]["mode"] == "fp32" and setup["schedule"]["optimizer"] == "adamw"
    assert setup["estimate"]["iterations"] == 30


def test_checkpoints_and_log(trained):
    roots, out, opts = trained
    assert out == roots.results / NAME / "3d_fullres" / "fold_0"
    config = json.loads((roots.results / NAME / "3d_fullres" / "plans.json").read_text())["configurations"]["3d_fullres"]
    assert config == tiny_config(roots)  # the plans trained with travel with the model
    assert json.loads((roots.results / NAME / "3d_fullres" / "dataset.json").read_text())["labels"]["liver"] == 1
    reference = build_network(config, 1, 5).state_dict()
    weights = {n: load_file(str(out / f"checkpoint_{n}.safetensors")) for n in ("latest", "best", "final")}
    for w in weights.values():
        assert set(w) == set(reference) and all(w[k].shape == reference[k].shape for k in w)
        build_network(config, 1, 5).load_state_dict(w, strict=True)
    # final is saved after the last epoch with nothing trained in between: same tensors as latest
    assert all(torch.equal(weights["final"][k], weights["latest"][k]) for k in reference)
    start = initial_weights(config, 5)
    assert any(not torch.equal(weights["final"][k], start[k]) for k in start)  # training moved the weights

    state = torch.load(out / "checkpoint_latest.state.pt", map_location="cpu", weights_only=True)
    assert state["epoch"] == 3 and state["optimizer"]["state"] and isinstance(state["torch_rng"], torch.Tensor)
    log = read_log(out)
    assert json.dumps(state["log"]) == json.dumps(log)  # the state carries the log (for --continue); NaN-safe
    assert len(log) == opts.epochs
    ema = None
    for r in log:
        assert set(r) == LOG_KEYS
        assert len(r["pseudo_dice"]) == 4  # one per foreground label
        assert all(math.isnan(d) or 0 <= d <= 1 for d in r["pseudo_dice"])
        assert r["val_loss"] > 0 and r["epoch_s"] >= 0
        seen = [d for d in r["pseudo_dice"] if not math.isnan(d)]
        mean = float(np.mean(seen)) if seen else 0.0
        ema = mean if ema is None else 0.9 * ema + 0.1 * mean
        assert r["ema_dice"] == pytest.approx(ema, abs=2e-4)
    assert state["best"] == pytest.approx(max(r["ema_dice"] for r in log), abs=1e-4)
    assert (out / "progress.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".tmp-*"))


def test_validation_on_original_grid(trained):
    roots, out, _ = trained
    splits = json.loads((roots.results / NAME / "splits.json").read_text())
    assert len(splits) == 5
    val_ids = splits[0]["val"]
    assert val_ids and not set(val_ids) & set(splits[0]["train"])
    folder = out / "validation"
    assert sorted(p.name for p in folder.glob("*.nii.gz")) == sorted(f"{c}.nii.gz" for c in val_ids)
    for case in val_ids:
        pred = sitk.ReadImage(str(folder / f"{case}.nii.gz"))
        raw = sitk.ReadImage(str(roots.raw / NAME / "imagesTr" / f"{case}_0000.nii.gz"))
        assert pred.GetSize() == raw.GetSize()
        np.testing.assert_allclose(pred.GetSpacing(), raw.GetSpacing(), rtol=1e-6)
        np.testing.assert_allclose(pred.GetOrigin(), raw.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(pred.GetDirection(), raw.GetDirection(), atol=1e-6)
        assert set(np.unique(sitk.GetArrayFromImage(pred))) <= {0, 1, 2, 3, 4}
    summary = json.loads((folder / "summary.json").read_text())
    assert sorted(summary["dice_per_case"]) == sorted(val_ids)
    assert sorted(summary["mean_dice"]) == ["1", "2", "3", "4"]
    for v in summary["mean_dice"].values():
        assert 0 <= v <= 1
    assert summary["mean_foreground_dice"] == pytest.approx(np.mean(list(summary["mean_dice"].values())))
    # the review flag's calibration input: expected Dice per case and label, in [0, 1]
    assert sorted(summary["expected_dice_per_case"]) == sorted(val_ids)
    assert all(sorted(q) == ["1", "2", "3", "4"] and all(0 <= x <= 1 for x in q.values())
               for q in summary["expected_dice_per_case"].values())


# ---------------------------------------------------------------------------------------------- --continue


def test_continue_reproduces_uninterrupted_run(phantom6, tmp_path):
    opts = dict(iters_per_epoch=3, val_iters=1, validate=False, **QUICK)
    a = train_fold(NAME, "3d_fullres", 1, TrainOptions(epochs=2, **opts), with_results(phantom6, tmp_path / "a"))
    roots_b = with_results(phantom6, tmp_path / "b")
    b = train_fold(NAME, "3d_fullres", 1, TrainOptions(epochs=1, **opts), roots_b)
    after_one = load_file(str(b / "checkpoint_final.safetensors"))
    b = train_fold(NAME, "3d_fullres", 1, TrainOptions(epochs=2, continue_training=True, **opts), roots_b)
    wa = load_file(str(a / "checkpoint_final.safetensors"))
    wb = load_file(str(b / "checkpoint_final.safetensors"))
    assert set(wa) == set(wb)
    assert any(not torch.equal(after_one[k], wb[k]) for k in wb)  # the continued epoch did train
    differing = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not differing, f"{len(differing)} tensors differ, e.g. {differing[:3]}"  # bit-exact
    strip = lambda log: json.dumps([{k: v for k, v in r.items() if k != "epoch_s"} for r in log])  # noqa: E731
    assert strip(read_log(a)) == strip(read_log(b))  # same losses, Dice and learning rates, epoch by epoch


def test_continue_without_checkpoint_is_an_error(phantom6, tmp_path, monkeypatch, capsys):
    for k, v in env_of(with_results(phantom6, tmp_path / "fresh")).items():
        monkeypatch.setenv(k, v)
    assert main(["train", "-d", "501", "-c", "3d_fullres", "-f", "2", "--epochs", "1", "--iters-per-epoch", "1",
                 "--val-iters", "1", "--num-workers", "0", "--no-validation", "--device", "cpu", "--continue"]) == 1
    err = capsys.readouterr().err
    assert "no checkpoint_latest" in err and "--continue" in err
    with pytest.raises(AutosegError, match="no checkpoint_latest"):
        train_fold(NAME, "3d_fullres", 3, TrainOptions(epochs=1, continue_training=True, **QUICK),
                   with_results(phantom6, tmp_path / "fresh"))


def test_adamw_runs_and_continue_keeps_the_optimizer(phantom6, tmp_path):
    roots = with_results(phantom6, tmp_path / "adamw")
    opts = dict(iters_per_epoch=2, val_iters=1, validate=False, optimizer="adamw", **QUICK)
    out = train_fold(NAME, "3d_fullres", 4, TrainOptions(epochs=1, **opts), roots)
    state = torch.load(out / "checkpoint_latest.state.pt", map_location="cpu", weights_only=True)
    assert state["setup"]["schedule"]["optimizer"] == "adamw" and "exp_avg" in state["optimizer"]["state"][0]
    assert read_log(out)[0]["lr"] == pytest.approx(DEFAULT_LR["adamw"])
    with pytest.raises(AutosegError, match="--optimizer adamw"):
        train_fold(NAME, "3d_fullres", 4, TrainOptions(epochs=2, continue_training=True, **{**opts, "optimizer": "sgd"}),
                   roots)


def test_rank_trains_in_the_agreed_memory_format(phantom6, tmp_path, monkeypatch):
    # under torchrun each rank probes for itself; when rank 0 chose contiguous and this rank's probe chose
    # channels-last, this rank must train contiguous too (DDP refuses parameters whose strides differ between ranks)
    from autoseg.precision import Precision
    own = Precision("fp32", True, {"fp32+channels_last": 0.1}, "this rank's probe")
    agreed = Precision("fp32", False, {"fp32": 0.1}, "rank 0's measurement")
    monkeypatch.setattr(trainer, "probe", lambda *a, **k: own)
    monkeypatch.setattr(trainer, "_agree", lambda setup, precision, total: (agreed, total))
    seen = {}
    make = trainer.make_optimizer

    def spy(model, opts, schedule):
        w = next(p for p in model.parameters() if p.ndim == 5 and p.shape[1] > 1 and p.shape[2] > 1)
        seen["contiguous"] = w.is_contiguous() and not w.is_contiguous(memory_format=torch.channels_last_3d)
        return make(model, opts, schedule)

    monkeypatch.setattr(trainer, "make_optimizer", spy)
    train_fold(NAME, "3d_fullres", "all", TrainOptions(epochs=1, iters_per_epoch=1, val_iters=1, validate=False,
                                                       **QUICK), with_results(phantom6, tmp_path / "agree"))
    assert seen["contiguous"]


# ------------------------------------------------------------------------------------------------- overfit


def test_overfits_a_single_case(tmp_path, monkeypatch):
    """One case, fold 'all' (validated on the case it trains on): the pipeline must be able to fit it.

    Augmentation is switched off for this test only (it makes a 100-iteration fit much slower, and is covered by
    test_data); everything else is the real pipeline, and the Dice is computed on the original raw grid.
    """
    roots = prepare(tmp_path, 1, seed=29, patch=[24, 48, 48], features=[8, 16, 32])

    def no_augmentation(*args, **kwargs):
        args = list(args)
        if len(args) > 7:
            args[7] = False
        else:
            kwargs["augment"] = False
        return BatchLoader(*args, **kwargs)

    monkeypatch.setattr(trainer, "BatchLoader", no_augmentation)
    opts = TrainOptions(epochs=4, iters_per_epoch=25, val_iters=1, optimizer="sgd", lr=0.2, momentum=0.9, **QUICK)
    out = train_fold(NAME, "3d_fullres", "all", opts, roots)
    summary = json.loads((out / "validation" / "summary.json").read_text())
    liver = summary["dice_per_case"]["phantom_000"]["1"]
    kidney = summary["dice_per_case"]["phantom_000"]["3"]
    pred = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "validation" / "phantom_000.nii.gz")))
    ref = sitk.GetArrayFromImage(sitk.ReadImage(str(roots.raw / NAME / "labelsTr" / "phantom_000.nii.gz")))
    assert pred.shape == ref.shape
    foreground = 2 * np.logical_and(pred > 0, ref > 0).sum() / ((pred > 0).sum() + (ref > 0).sum())
    print(f"overfit Dice: foreground {foreground:.3f}, liver {liver:.3f}, kidney {kidney:.3f}, "
          f"log {[r['train_loss'] for r in read_log(out)]}")
    assert foreground > 0.9
    assert liver > 0.9
    assert kidney > 0.6


# ----------------------------------------------------------------------------------------------------- DDP


def test_torchrun_two_processes_gloo(phantom6, tmp_path):
    roots = with_results(phantom6, tmp_path / "ddp")
    env = {**os.environ, **env_of(roots), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "autoseg", "train", "-d", "501", "-c", "3d_fullres", "-f", "0",
           "--epochs", "1", "--iters-per-epoch", "3", "--val-iters", "1", "--num-workers", "0", "--no-validation",
           "--device", "cpu"]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = roots.results / NAME / "3d_fullres" / "fold_0"
    assert proc.stdout.count("epoch    0") == 1  # only rank 0 reports
    assert len(read_log(out)) == 1
    final = load_file(str(out / "checkpoint_final.safetensors"))
    start = initial_weights(tiny_config(roots), 5)
    assert set(final) == set(start)
    assert any(not torch.equal(final[k], start[k]) for k in start)  # it trained
    assert not list(out.glob(".tmp-*"))


DDP_SCRIPT = """
import json, multiprocessing, os, sys


def worker(rank, port, out, net_plan):
    import torch
    import torch.distributed as dist

    from autoseg.training.losses import SegmentationLoss
    from autoseg.network import build_network

    torch.set_num_threads(1)
    cfg = {"dims": 3, "patch_size": [8, 16, 16], "network": net_plan}
    steps, clip = 3, 12.0

    def batch(r, step):
        g = torch.Generator().manual_seed(1000 * r + step)  # different data on every rank
        x = torch.randn(1, 1, *cfg["patch_size"], generator=g)
        seg = torch.randint(0, 3, (1, 1, *cfg["patch_size"]), generator=g)
        return x, [seg, seg[:, :, :, ::2, ::2]]  # full resolution and the [1, 2, 2]-strided head

    def make_optimizer(params):
        return torch.optim.SGD(params, lr=0.01, momentum=0.99, nesterov=True, weight_decay=3e-5)

    def flat(net):
        return torch.cat([p.detach().flatten() for p in net.parameters()])

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(rank)  # different initial weights: DDP must broadcast rank 0's
    net = build_network(cfg, 1, 3)
    init = flat(net).clone()
    model = torch.nn.parallel.DistributedDataParallel(net)
    loss_fn = SegmentationLoss(len(net_plan["strides"]) - 1, batch_dice=True)
    opt = make_optimizer(model.parameters())
    for step in range(steps):  # what train_steps does, on CPU
        x, targets = batch(rank, step)
        opt.zero_grad()
        loss_fn(model(x), targets).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
    params = [torch.zeros_like(init) for _ in range(2)]
    inits = [torch.zeros_like(init) for _ in range(2)]
    dist.all_gather(params, flat(net))
    dist.all_gather(inits, init)
    if rank == 0:
        # reference without DDP: rank 0's initial weights, gradients averaged over both ranks' batches
        torch.manual_seed(0)
        ref = build_network(cfg, 1, 3)
        ref_opt = make_optimizer(ref.parameters())
        for step in range(steps):
            grads = []
            for r in range(2):
                ref.zero_grad()
                x, targets = batch(r, step)
                loss_fn(ref(x), targets).backward()
                grads.append([p.grad.clone() for p in ref.parameters()])
            for p, g0, g1 in zip(ref.parameters(), *grads):
                p.grad = (g0 + g1) / 2
            torch.nn.utils.clip_grad_norm_(ref.parameters(), clip)
            ref_opt.step()
        result = {"ranks_equal": torch.equal(params[0], params[1]),
                  "inits_differ": not torch.equal(inits[0], inits[1]),
                  "moved": not torch.equal(params[0], inits[0]),
                  "max_diff_to_reference": float((params[0] - flat(ref)).abs().max())}
        with open(out, "w") as f:
            json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()
    # the result is written and the group closed cleanly; skip interpreter teardown, where gloo's threads can race
    # C++ static destructors and abort ("terminate called without an active exception") after the work is done
    os._exit(0)


if __name__ == "__main__":  # the parent only starts the two ranks (no torch import here: faster)
    port, out, net_plan = int(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=worker, args=(r, port, out, net_plan), daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    for p in procs:
        if p.is_alive():  # a rank waiting forever for a dead peer
            p.terminate()
            p.join()
    sys.exit(max(abs(p.exitcode) if p.exitcode else 0 for p in procs) or 0)
"""


def test_ddp_ranks_stay_identical_and_average_gradients(tmp_path):
    script = tmp_path / "ddp_check.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    result = tmp_path / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    net_plan = json.dumps({**TINY_NET, "features": [4, 8, 16]})
    proc = subprocess.run([sys.executable, str(script), str(free_port()), str(result), net_plan], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(result.read_text())
    print(r)
    assert r["inits_differ"] and r["moved"]
    assert r["ranks_equal"]
    assert r["max_diff_to_reference"] < 1e-5


# ------------------------------------------------------------------------------------------------- regions

REGION_LABELS = {"background": 0, "liver": [1, 2], "liver_tumor": 2, "kidney": [3, 4], "kidney_tumor": 4}
REGIONS = [[1, 2], [2], [3, 4], [4]]


def test_region_targets_on_constructed_labels():
    seg = np.array([[[0, 1, 2], [3, 4, 0]]], dtype=np.uint8)
    t = region_targets(seg, REGIONS)
    assert t.shape == (4, 1, 2, 3) and t.dtype == np.uint8
    assert t[:, 0].tolist() == [
        [[0, 1, 1], [0, 0, 0]],  # liver incl. tumour
        [[0, 0, 1], [0, 0, 0]],  # liver tumour
        [[0, 0, 0], [1, 1, 0]],  # kidney incl. tumour
        [[0, 0, 0], [0, 1, 0]],  # kidney tumour
    ]


def test_region_based_training(tmp_path):
    roots = prepare(tmp_path, 2, seed=3, patch=[16, 32, 32], features=[4, 8, 16], labels=REGION_LABELS,
                    regions_class_order=[1, 2, 3, 4])
    meta = json.loads((roots.preprocessed / NAME / "dataset.json").read_text())
    assert label_layout(meta) == (4, REGIONS, [1, 2, 3, 4])
    config = tiny_config(roots)
    folder = roots.preprocessed / NAME / "3d_fullres"
    ids = ["phantom_000", "phantom_001"]
    scales = ds_scales(config)
    index = sampling_index(folder, ids, [])
    always_foreground = dataclasses.replace(index, shares=class_shares(list(index.components), [], random_share=0.0))
    loader = BatchLoader(folder, ids, config, scales, 2, 5, 0, False, REGIONS, always_foreground)
    plain = BatchLoader(folder, ids, config, scales, 2, 5, 0, False, None, always_foreground)
    try:
        batch, labels = next(loader), next(plain)
    finally:
        loader.close()
        plain.close()
    assert torch.equal(batch["data"], labels["data"])  # same seed, same patches
    for t, lab, s in zip(batch["target"], labels["target"], scales):
        assert t.dtype == torch.float32
        assert tuple(t.shape) == (2, 4, *[round(p * f) for p, f in zip(config["patch_size"], s)])
        assert set(torch.unique(t).tolist()) <= {0.0, 1.0}
        expected = region_targets(lab[:, 0].numpy(), REGIONS).swapaxes(0, 1)
        assert np.array_equal(t.numpy(), expected.astype(np.float32))
        assert bool((t[:, 0] >= t[:, 1]).all() and (t[:, 2] >= t[:, 3]).all())  # tumour regions nest in organs
    assert batch["target"][0].sum() > 0  # forced foreground: some region is in the patches

    out = train_fold(NAME, "3d_fullres", "all", TrainOptions(epochs=1, iters_per_epoch=2, val_iters=1, **QUICK),
                     roots)
    weights = load_file(str(out / "checkpoint_final.safetensors"))
    heads = sorted(k for k in weights if k.startswith("heads.") and k.endswith(".weight"))
    assert heads and all(weights[k].shape[0] == 4 for k in heads)  # one sigmoid output per region
    (record,) = read_log(out)
    assert len(record["pseudo_dice"]) == 4 and math.isfinite(record["train_loss"])
    summary = json.loads((out / "validation" / "summary.json").read_text())
    assert sorted(summary["dice_per_case"]) == ids
    assert sorted(summary["mean_dice"]) == ["1", "2", "3", "4"]
    for case in ids:
        pred = sitk.ReadImage(str(out / "validation" / f"{case}.nii.gz"))
        assert set(np.unique(sitk.GetArrayFromImage(pred))) <= {0, 1, 2, 3, 4}
        assert pred.GetSize() == sitk.ReadImage(str(roots.raw / NAME / "labelsTr" / f"{case}.nii.gz")).GetSize()
