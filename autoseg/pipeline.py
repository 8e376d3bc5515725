"""The pipeline's stages as functions of explicit :class:`~autoseg.layout.Roots`: what ``autoseg <command>`` and
``autoseg demo`` both run. Nothing here reads the command line or the environment; the CLI turns those into calls.
"""

from __future__ import annotations

import contextlib
import functools
import shutil
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

from .atomic import json_safe, remove_stale_temporaries, write_csv, write_json
from .bundle import open_bundle
from .cluster import Cluster, open_cluster
from .errors import AutosegError, DatasetError
from .evaluation.evaluate import evaluate_folders
from .evaluation.report import report_folder
from .inference.ensemble import ensemble_folders
from .inference.identity import model_identity
from .inference.postprocess import apply_postprocessing
from .inference.predictor import Predictor, pending_cases, predict_case, predict_folder
from .inference.selection import find_best_configuration
from .io.dataset import Case, case_signature, images_in_folder, load_dataset_json, resolve_labels
from .io.images import read_image, write_image
from .io.inputs import IMAGE_ENDINGS, InputCase
from .io.outputs import require_source_for
from .io.verify import check_dataset
from .jsonfile import read_json
from .labels import LabelSpec
from .layout import (
    DATASET_JSON, FINGERPRINT_JSON, IMAGES_TR, INFERENCE_PLAN_JSON, LABELS_TR, PLANS_JSON, SOURCES_JSON, Roots,
    dataset_name, inside, trained_folds,
)
from .planning.fingerprint import compute_fingerprint
from .planning.planner import plan
from .preprocessing.preprocess import preprocess_dataset
from .schemas import validate
from .training.trainer import TrainOptions, estimate_run, train_fold
from .transfer import init_source


def planning_device(choice: str) -> str:
    """``auto`` plans for a GPU when this machine has one, else for the CPU."""
    if choice != "auto":
        return choice
    import torch

    device = "gpu" if torch.cuda.is_available() else "cpu"
    print(f"planning for {device.upper()} training (--device {device}); pass --device to choose")
    return device


def results_dataset(roots: Roots, spec: str) -> str:
    """The dataset folder name for ``spec`` (id or name), looked up in the raw folder, else in the results."""
    return dataset_name(spec, roots.raw if roots.raw.is_dir() else roots.results)


def _reusable_fingerprint(fp_path: Path, cases: list[Case]) -> dict[str, Any] | None:
    """The fingerprint in ``fp_path`` when it was computed from exactly these cases and files (same size and mtime,
    recorded in ``sources.json``), else None (recompute): an edited label must not be planned from stale facts."""
    if not fp_path.is_file():
        return None
    fingerprint = read_json(fp_path, "delete it to recompute the fingerprint")
    recorded = fingerprint.get("cases") if isinstance(fingerprint, dict) else None
    if not isinstance(recorded, list) or [c.get("case") if isinstance(c, dict) else None
                                          for c in recorded] != [c.case_id for c in cases]:
        return None
    sources = fp_path.with_name(SOURCES_JSON)
    signatures = read_json(sources, "delete it to recompute the fingerprint") if sources.is_file() else None
    changed = [c.case_id for c in cases if not isinstance(signatures, dict) or signatures.get(c.case_id) != case_signature(c)]
    if changed:
        print(f"raw files changed since {fp_path} was computed (case(s) {', '.join(changed[:5])}"
              f"{' ...' if len(changed) > 5 else ''}); recomputing it")
        return None
    validate(fingerprint, "fingerprint", str(fp_path), "delete it to recompute the fingerprint")
    return fingerprint


@dataclass(frozen=True)
class Planned:
    """What ``plan_and_preprocess`` produced: the preprocessed folder, the plans and the configurations prepared."""

    folder: Path
    plans: dict[str, Any]
    configurations: list[str]


def _cluster(address: str | None, num_cpus: int | None = None) -> contextlib.AbstractContextManager[Cluster | None]:
    """The Ray cluster at ``address`` for the block (see :func:`autoseg.cluster.open_cluster`), or None without one."""
    return open_cluster(address, num_cpus) if address else contextlib.nullcontext()


def plan_and_preprocess(roots: Roots, dataset: str, configurations: Sequence[str], num_workers: int,
                        verify: bool = False, gpu_memory_gb: float = 8.0, device: str = "auto",
                        cluster: str | None = None) -> Planned:
    """Fingerprint the raw dataset (reused when computed from the same cases), plan, and preprocess the training
    cases of every planned configuration in ``configurations``. With ``cluster`` (``local``, ``auto`` or a Ray
    address) verification, fingerprint and preprocessing run a Ray task per case there; ``local`` gives the
    embedded Ray ``num_workers`` CPUs. The files written are the same."""
    with _cluster(cluster, num_workers) as pool:
        if pool is not None:  # workers may start in another folder
            roots = Roots(roots.raw.resolve(), roots.preprocessed.resolve(), roots.results.resolve())
        return _plan_and_preprocess(roots, dataset, configurations, num_workers, verify, gpu_memory_gb, device, pool)


def _plan_and_preprocess(roots: Roots, dataset: str, configurations: Sequence[str], num_workers: int, verify: bool,
                         gpu_memory_gb: float, device: str, pool: Cluster | None) -> Planned:
    name = dataset_name(dataset, roots.raw)
    raw, out = roots.raw / name, roots.preprocessed / name
    warnings: list[str] = []
    meta = check_dataset(raw, warnings, num_workers, pool) if verify else load_dataset_json(raw)
    for w in warnings:  # allowed oddities found by --verify (e.g. an all-background label map)
        print(f"warning: {w}", file=sys.stderr)
    cases, problems = images_in_folder(raw / IMAGES_TR, meta["file_ending"], len(meta["channel_names"]),
                                       raw / LABELS_TR)
    if problems:
        raise DatasetError(problems + ["run with --verify for a full check of every file"])
    fp_path = out / FINGERPRINT_JSON
    fingerprint = _reusable_fingerprint(fp_path, cases)
    if fingerprint is None:  # absent, from other cases or files, or not a fingerprint: recompute
        signatures = {c.case_id: case_signature(c) for c in cases}  # before reading: an edit during the run shows
        fingerprint = compute_fingerprint(name, meta, cases, num_workers, cluster=pool)
        write_json(fp_path, fingerprint)
        write_json(fp_path.with_name(SOURCES_JSON), signatures)  # last: without it the fingerprint is recomputed
    else:
        print(f"reusing {fp_path} (same {len(cases)} cases); delete it to recompute")
    plans = plan(fingerprint, gpu_memory_gb, planning_device(device))
    write_json(out / PLANS_JSON, plans)
    write_json(out / DATASET_JSON, meta)
    wanted = [c for c in configurations if c in plans["configurations"]]
    for c in list(wanted):  # a cascade needs its first stage's data too
        previous = plans["configurations"][c].get("previous_stage")
        if previous and previous not in wanted:
            wanted.append(previous)
    for c in sorted(set(configurations) - set(wanted)):
        print(f"{c}: not planned for this dataset (see notes in {out / PLANS_JSON})")
    preprocess_dataset(cases, plans, wanted, out, num_workers, cluster=pool)
    return Planned(out, plans, wanted)


def train(roots: Roots, dataset: str, configuration: str, fold: int | str, opts: TrainOptions,
          init_from: Path | None = None) -> Path:
    """Train one fold (or ``all``) of one configuration, from the weights of the model ``init_from`` names where
    they fit (:mod:`autoseg.transfer`); returns the fold's folder."""
    if init_from is not None and not opts.continue_training:
        opts = replace(opts, init_from=init_source(Path(init_from), configuration))
    return train_fold(results_dataset(roots, dataset), configuration, fold, opts, roots)


def estimate_training(roots: Roots, dataset: str, configuration: str, opts: TrainOptions) -> dict[str, Any]:
    """What a run of ``configuration`` would get in ``opts``' budget (precision, seconds per iteration, iterations),
    measured on this device; trains and writes nothing."""
    return estimate_run(results_dataset(roots, dataset), configuration, opts, roots)


def inference_models(dataset_dir: Path, configuration: str | None, folds: list[str] | None,
                     fast: bool) -> tuple[list[str], dict[str, list[str] | None], dict[str, Any] | None]:
    """(configurations, folds per configuration, postprocessing) to predict with: the given configuration, else
    ``inference_plan.json`` when present, else 3d_fullres; ``folds`` overrides every configuration's folds and
    ``fast`` keeps only the first fold."""
    inference_plan = dataset_dir / INFERENCE_PLAN_JSON
    postprocessing = None
    if configuration:
        configs, chosen, source = [configuration], {configuration: folds}, "-c"
    elif inference_plan.is_file():
        ip = read_json(inference_plan, f"rerun `autoseg find_best_configuration` or delete {inference_plan}",
                       "inference_plan")
        configs, chosen, postprocessing = ip["configurations"], ip["folds"], ip["postprocessing"]
        source = str(inference_plan)
        print(f"using {inference_plan}: {'+'.join(configs)}, postprocessing {postprocessing}")
    else:
        configs, chosen, source = ["3d_fullres"], {"3d_fullres": folds}, "the default configuration"
    if folds:
        chosen = {c: folds for c in configs}
    for c in configs:  # names read from a file or a bundle must not lead out of the dataset folder
        inside(dataset_dir, c, source)
        for f in chosen.get(c) or []:
            inside(dataset_dir / c, f"fold_{f}", "-f" if folds else source)
    if fast:
        chosen = {c: (chosen.get(c) or trained_folds(dataset_dir / c))[:1] for c in configs}
    return configs, chosen, postprocessing


def load_predictors(dataset_dir: Path, configuration: str | None = None, folds: list[str] | None = None,
                    device: str = "auto", mirror: bool = True, step: float = 0.5,
                    fast: bool = False, precision: str = "auto",
                    engine: str = "torch") -> tuple[list[Predictor], dict[str, Any] | None]:
    """The predictors of a trained dataset folder (see :func:`inference_models`) and the postprocessing to apply;
    ``fast`` is one fold, no mirroring and a step of at least 0.75; ``precision`` and ``engine`` as in
    :meth:`Predictor.from_trained`."""
    configs, chosen, postprocessing = inference_models(dataset_dir, configuration, folds, fast)
    if fast:
        mirror, step = False, max(step, 0.75)
    predictors = [Predictor.from_trained(dataset_dir / c, chosen.get(c), device=device, mirror=mirror, step=step,
                                         precision=precision, engine=engine) for c in configs]
    return predictors, postprocessing


def review_thresholds(dataset_dir: Path, predictors: Sequence[Predictor]) -> dict[str, Any] | None:
    """The review flag's thresholds calibrated by ``find_best_configuration`` (``review`` in
    ``inference_plan.json``), when they were calibrated for the configurations being predicted with; else None."""
    path = dataset_dir / INFERENCE_PLAN_JSON
    if not path.is_file():
        print("no inference_plan.json: cases are not flagged for review (run `autoseg find_best_configuration`)")
        return None
    ip = read_json(path, f"rerun `autoseg find_best_configuration` or delete {path}", "inference_plan")
    used = [p.configuration for p in predictors]
    if "review" not in ip or ip["configurations"] != used:
        print(f"{path}: no review thresholds calibrated for {'+'.join(used)}; cases are not flagged for review "
              "(rerun `autoseg find_best_configuration` after training)")
        return None
    return ip["review"]


def _worker_predictors(model: str | None, dataset_dir: str, configuration: str | None, folds: list[str] | None,
                       device: str, mirror: bool, step: float, fast: bool, precision: str,
                       engine: str = "torch") -> tuple[list[Predictor], dict[str, Any] | None]:
    """A cluster worker's setup: :func:`load_predictors`, once per worker. A bundle is opened by the worker itself
    (the driver's extracted copy may be on another machine) and its copy removed once the weights are loaded."""
    extracted = None
    if model:
        folder = open_bundle(Path(model))
        dataset_dir, extracted = str(folder), folder.parent
    try:
        return load_predictors(Path(dataset_dir), configuration, folds, device, mirror, step, fast, precision, engine)
    finally:
        if extracted is not None:
            shutil.rmtree(extracted, ignore_errors=True)


def _worker_predict(state: tuple[list[Predictor], dict[str, Any] | None], case: InputCase, output_dir: str,
                    model_id: str, save_probabilities: bool, postprocess: bool, output_format: str,
                    uncertainty: bool, review: dict[str, Any] | None) -> str:
    """One case on a cluster worker, with the predictors its setup loaded; errors name the case as
    :func:`predict_folder` does."""
    predictors, postprocessing = state
    try:
        predict_case(predictors, case, Path(output_dir), model_id, save_probabilities,
                     postprocessing if postprocess else None, output_format, uncertainty, review)
    except AutosegError as e:
        raise AutosegError(f"case {case.case_id}: {e}") from None
    return case.case_id


def _predict_on_cluster(pool: Cluster, dataset_dir: Path, model: Path | None, input_dir: Path, output_dir: Path,
                        configuration: str | None, folds: list[str] | None, device: str, mirror: bool, step: float,
                        fast: bool, save_probabilities: bool, overwrite: bool, postprocess: bool, precision: str,
                        workers: int | None, output_format: str, uncertainty: bool, engine: str) -> list[str]:
    """:func:`predict_folder` with the cases spread over the cluster's workers (each loads the predictors once):
    the same files, skipped when finished, each written atomically by its worker. The driver loads the weights
    too, in float32 without probing, only for the model identity that finished cases are recorded with."""
    predictors, postprocessing = load_predictors(dataset_dir, configuration, folds, "cpu", mirror, step, fast, "fp32")
    model_id = model_identity(predictors, postprocessing if postprocess else None)
    review = review_thresholds(dataset_dir, predictors) if uncertainty else None
    meta = predictors[0].meta
    del predictors
    output_dir = output_dir.resolve()  # workers may start in another folder
    cases, problems = pending_cases(meta, input_dir.resolve(), output_dir, model_id, output_format,
                                    save_probabilities, uncertainty, overwrite)
    setup = functools.partial(_worker_predictors, str(model.resolve()) if model else None, str(dataset_dir.resolve()),
                              configuration, folds, device, mirror, step, fast, precision, engine)
    job = functools.partial(_worker_predict, output_dir=str(output_dir), model_id=model_id,
                            save_probabilities=save_probabilities, postprocess=postprocess,
                            output_format=output_format, uncertainty=uncertainty, review=review)
    print(f"predicting {len(cases)} case(s) on Ray cluster {pool.where}")
    outcomes = pool.map_with(setup, job, cases, workers, desc="predict")
    remove_stale_temporaries(output_dir)  # a worker killed while writing leaves its temporary; its case was redone
    return problems + [error for _, error in outcomes if error]


def predict(roots: Roots, input_dir: Path, output_dir: Path, dataset: str | None = None, model: Path | None = None,
            configuration: str | None = None, folds: list[str] | None = None, device: str = "auto",
            mirror: bool = True, step: float = 0.5, fast: bool = False, save_probabilities: bool = False,
            overwrite: bool = False, postprocess: bool = True, precision: str = "auto",
            output_format: str = "nifti", uncertainty: bool = False, cluster: str | None = None,
            cluster_workers: int | None = None, engine: str = "torch") -> None:
    """Predict every image of ``input_dir`` (a folder, an image file or a DICOM series folder or zip) with a model
    trained here (``dataset``) or a bundle (``model``); ``precision`` and ``engine`` as in :meth:`Predictor.from_trained`;
    ``output_format`` ``nifti`` or ``dicom-seg`` (checked against the input before a model is loaded);
    ``uncertainty`` adds the maps, lesion confidences and the review flag
    (:func:`~autoseg.inference.predictor.write_uncertainty`). Bad cases are raised together at the end. With
    ``cluster`` (``local``, ``auto`` or a Ray address) the cases run on ``cluster_workers`` Ray actors (default: one
    per GPU, else one per node), each loading the model once."""
    require_source_for(output_format, Path(input_dir))
    bundle_dir = None
    if model:
        dataset_dir = open_bundle(Path(model))
        bundle_dir = dataset_dir.parent
    elif dataset:
        dataset_dir = roots.results / results_dataset(roots, dataset)
    else:
        raise AutosegError("say which model to use: -d DATASET (trained here) or -m model.zip")
    try:
        with _cluster(cluster) as pool:
            if pool is not None:
                problems = _predict_on_cluster(pool, dataset_dir, model, Path(input_dir), Path(output_dir),
                                               configuration, folds, device, mirror, step, fast, save_probabilities,
                                               overwrite, postprocess, precision, cluster_workers, output_format,
                                               uncertainty, engine)
            else:
                predictors, postprocessing = load_predictors(dataset_dir, configuration, folds, device, mirror, step,
                                                             fast, precision, engine)
                review = review_thresholds(dataset_dir, predictors) if uncertainty else None
                problems = predict_folder(predictors, Path(input_dir), Path(output_dir), save_probabilities,
                                          overwrite, postprocessing if postprocess else None, output_format,
                                          uncertainty, review)
    finally:
        if bundle_dir is not None:
            shutil.rmtree(bundle_dir, ignore_errors=True)
    if problems:
        raise DatasetError(problems)


def ensemble(inputs: Sequence[Path], output: Path, dataset_json: Path | None = None,
             save_probabilities: bool = False) -> int:
    """Average saved probabilities of several prediction folders; returns the number of cases written."""
    meta = load_dataset_json(Path(dataset_json).parent) if dataset_json else {"file_ending": ".nii.gz"}
    rco = LabelSpec.from_meta(meta).layout()[2] if dataset_json else None
    return ensemble_folders([Path(d) for d in inputs], Path(output), meta["file_ending"], rco, save_probabilities)


def find_best(roots: Roots, dataset: str) -> tuple[dict[str, Any], Path]:
    """Choose configuration/ensemble and postprocessing from the validation results; returns the inference plan
    and where it was written."""
    name = results_dataset(roots, dataset)
    meta = load_dataset_json(roots.preprocessed / name)
    inference_plan = find_best_configuration(roots.results / name, roots.raw / name / LABELS_TR, meta)
    path = roots.results / name / INFERENCE_PLAN_JSON
    write_json(path, inference_plan)
    return inference_plan, path


def postprocess_folder(roots: Roots, dataset: str, input_dir: Path, output_dir: Path) -> int:
    """Apply the postprocessing of the dataset's ``inference_plan.json`` to every label map of ``input_dir``."""
    name = results_dataset(roots, dataset)
    plan_path = roots.results / name / INFERENCE_PLAN_JSON
    if not plan_path.is_file():
        raise AutosegError(f"{plan_path} not found; run `autoseg find_best_configuration -d {name}` first")
    spec = read_json(plan_path, f"rerun `autoseg find_best_configuration -d {name}`", "inference_plan")["postprocessing"]
    files = sorted(p for p in Path(input_dir).iterdir() if p.name.endswith(IMAGE_ENDINGS))
    for f in files:
        seg, geo = read_image(f)
        write_image(Path(output_dir) / f.name, apply_postprocessing(seg, spec), geo)
    return len(files)


def evaluate(roots: Roots, ref: Path, pred: Path, output: Path | None = None, dataset: str | None = None,
             labels: Path | None = None, tolerance_mm: float = 1.0, num_workers: int = 1,
             kits: bool = False) -> tuple[dict[str, Any], Path]:
    """Evaluate ``pred`` against ``ref``; writes evaluation.csv, lesions.csv and summary.json to ``output`` (default
    ``pred``) and returns the summary and that folder. ``kits`` adds the KiTS challenges' official metrics."""
    ref, pred = Path(ref), Path(pred)
    label_map, ending = resolve_labels(roots, dataset, labels, [pred, ref.parent])
    per_case, summary, lesions = evaluate_folders(ref, pred, label_map, ending, num_workers, tolerance_mm,
                                                  return_lesions=True, kits=kits)
    out = Path(output) if output else pred
    write_csv(out / "evaluation.csv", per_case)
    write_csv(out / "lesions.csv", lesions)
    write_json(out / "summary.json", json_safe(summary))
    return summary, out


def report(roots: Roots, pred: Path, output: Path, images: Path | None = None, dataset: str | None = None,
           labels: Path | None = None, num_workers: int = 1) -> list[dict[str, Any]]:
    """Write the clinical-style report of the label maps in ``pred`` to ``output``; returns the per-case reports."""
    label_map, ending = resolve_labels(roots, dataset, labels, [Path(pred)])
    return report_folder(Path(pred), output, label_map, ending, images, num_workers)
