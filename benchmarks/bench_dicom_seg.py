"""Issue 14: seconds to write a demo-size case's label map as a DICOM-SEG (``predict --output-format dicom-seg``)
against the NIfTI label map ``predict`` writes by default, each as ``predict`` does it (atomic, read back before the
rename), best of 3. The label map is the phantom's own ground truth (four labels, realistic segment extents); the
series is the phantom written as DICOM. Also the size of each file and the model-identity digest ``predict``
computes once per run for the demo's CPU-plan network.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from autoseg.io.dicom import find_series, write_series  # noqa: E402
from autoseg.io.dicom_seg import write_dicom_seg  # noqa: E402
from autoseg.io.images import Geometry, write_image  # noqa: E402
from autoseg.inference.identity import model_identity  # noqa: E402
from autoseg.labels import DEFAULT_LABELS  # noqa: E402
from autoseg.network import build_network  # noqa: E402
from autoseg.phantom import generate_case  # noqa: E402
from common import best_of, machine, report  # noqa: E402

META = {"channel_names": {"0": "CT"}, "labels": DEFAULT_LABELS, "file_ending": ".nii.gz"}




class _Stub:
    """What :func:`model_identity` reads of a Predictor."""

    def __init__(self, config: dict, net: torch.nn.Module):
        self.configuration, self.config, self.mirror, self.step = "3d_fullres", config, True, 0.5
        self.models, self.stage1 = [net], None


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        image, labels, geo = generate_case(0, "demo")
        d = np.asarray(geo.direction).reshape(3, 3)
        if np.linalg.det(d) < 0:  # a DICOM series is right-handed
            image, labels, d[:, 2] = image[::-1].copy(), labels[::-1].copy(), -d[:, 2]
            geo = Geometry(geo.spacing, geo.origin, tuple(d.ravel().tolist()), geo.shape)
        write_series(tmp / "series", image, geo, "1.2.826.0.1.3680043.8.498.7")
        (series,) = find_series(tmp / "series")
        shape = "x".join(map(str, geo.shape))
        t_nifti = best_of(lambda: write_image(tmp / "case.nii.gz", labels, geo))
        t_seg = best_of(lambda: write_dicom_seg(tmp / "case.dcm", labels, series, META))
        rows.append({"measure": f"write NIfTI label map .nii.gz ({shape}, 4 labels)", "value": round(t_nifti, 3),
                     "unit": "s"})
        rows.append({"measure": f"write DICOM-SEG ({len(series.files)} source slices, 4 segments)",
                     "value": round(t_seg, 3), "unit": "s"})
        rows.append({"measure": "DICOM-SEG / NIfTI write time", "value": round(t_seg / t_nifti, 1), "unit": "x"})
        for name in ("case.nii.gz", "case.dcm"):
            rows.append({"measure": f"size of {name}", "value": round((tmp / name).stat().st_size / 1e3, 1),
                         "unit": "kB"})
    from autoseg.planning.planner import plan

    fingerprint = json.loads((HERE.parent / "fingerprints" / "demo_phantom.json").read_text())
    config = plan(fingerprint, 8.0, "cpu")["configurations"]["3d_fullres"]
    net = build_network(config, 1, len(DEFAULT_LABELS))
    params = sum(p.numel() for p in net.parameters())
    t_id = best_of(lambda: model_identity([_Stub(config, net)], None))
    rows.append({"measure": f"model identity digest, demo CPU-plan network ({params / 1e6:.1f} M parameters)",
                 "value": round(t_id, 3), "unit": "s"})
    path = report("dicom_seg", rows, ["measure", "value", "unit"])
    print(json.dumps(machine()))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
