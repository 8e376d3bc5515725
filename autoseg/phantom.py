"""Deterministic synthetic abdominal CT: the project's only data for the demo, the tests and the benchmarks.

Why a phantom: real CT (KiTS, LiTS) cannot ship with the code, yet every stage of the pipeline (planning,
preprocessing, training, inference, evaluation) needs volumes that look and behave like abdominal CT: Hounsfield
units, anisotropic spacing that varies per case, flipped direction cosines, organs and tumours of anatomical size.

Everything is a pure function of ``(seed, size)``. Each case draws from its own ``np.random.default_rng``; nothing
touches global random state. Anatomy is placed in *physical* patient coordinates (ITK's LPS frame: +x = patient
left, +y = posterior, +z = superior) and rasterised at the voxel centres given by the case's geometry, so organs are
the same size in millimetres whatever the spacing, and a case with flipped direction cosines is the same patient
seen through a mirrored voxel grid (its array is flipped, its physical anatomy is not).

Spacing scaling. A real abdominal CT is 512 x 512 pixels of 0.6-1.0 mm and slices of 1-5 mm over a 200-300 mm
craniocaudal range. The presets keep the body-sized field of view and use far fewer voxels, so the spacing grows by
the same factor:

* in-plane: ``spacing = fov / n_nominal`` with the field of view drawn per case from 350-385 mm (the share of the
  real 0.6-1.0 mm spread that still keeps a ~300 mm wide abdomen inside the grid) and ``n_nominal`` = 60 (``small``)
  or 128 (``demo``): small ~5.8-6.4 mm, demo ~2.7-3.0 mm. Each case then has a few voxels more or fewer than
  nominal in y and x (small 56-64, demo 120-136), so arrays are not always square and fields of view differ a bit.
* through-plane: the craniocaudal field of view is drawn from 200-300 mm and divided by the case's slice count
  (small 24-40, demo 56-80): small ~5-12 mm, demo ~2.5-5.4 mm, i.e. the real 1-5 mm scaled by the slice-count ratio.

About one case in four has flipped direction cosines (``diag(-1, -1, 1)``, as NIfTI files from RAS scanners read in
ITK, or a flipped z), with the origin moved to the other end of the flipped axis so the grid covers the same body.

Anatomy (HU, jittered per case): air -1000; body outline (a flattened superellipse) with subcutaneous fat and a
muscle wall; ribs in the upper wall; lung bases; bowel loops and stomach with fluid and gas (gas-fluid levels are
horizontal in the patient frame, gas anterior, as in a supine patient); psoas and paraspinal muscles; spleen;
liver (right lobe + left lobe, with a gallbladder); two kidneys with cortex brighter than medulla; aorta and IVC;
lumbar spine with cortical shell, discs, canal and posterior arch. Liver and kidney tumours (0-3 per organ, 5-40 mm,
larger ones sometimes with a necrotic core) are clipped to their organ. Then a mild Gaussian blur (partial volume),
Gaussian noise and a per-case intensity shift.

Tumour contrast and noise follow one real portal-venous liver CT with manual labels (liver 118 +- 22 HU, hypodense
lesions 70 +- 23 HU, contrast about 48 HU, high-pass noise sigma about 14 HU, lesions from under 0.1 mL to tens of
mL): liver parenchyma 100-135 HU; each tumour differs from its organ's parenchyma by a contrast drawn from
N(48, 15) HU clipped to 15-90, hypodense in 9 of 10 tumours; white noise sigma 11-17 HU. No real kidney figure was
given, so kidney tumours use the same contrast rule against the mean of cortex and medulla. The noise is the real
scan's at its own sub-millimetre voxels, while phantom voxels are 10-30 times larger (real noise averaged over such
voxels would be several times lower), so the phantom's contrast-to-noise ratio is below real CT's, not above it.
``benchmarks/phantom_stats.py`` measures all of this on generated cases (figures in ``benchmarks/RESULTS.md``).

Labels: 0 background, 1 liver, 2 liver tumour, 3 kidney, 4 kidney tumour; each voxel carries the label of the last
structure painted over it, so tumours overwrite organs and vessels or bone overwrite both. The image is painted from
the same masks, so image and label always agree. The smallest tumour diameter is raised to what the grid can show
(about two voxel widths; 5 mm for ``demo``, ~13 mm for ``small``) so that a tumour in the label is several voxels.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter
from tqdm import tqdm

from .atomic import remove_stale_temporaries, write_json
from .io.images import Geometry, write_image
from .labels import DEFAULT_LABELS
from .errors import AutosegError

__all__ = ["SIZES", "generate_case", "case_seed", "write_dataset"]

DEFAULT_NAME = "Dataset501_AbdomenPhantom"
FILE_ENDING = ".nii.gz"


@dataclass(frozen=True)
class SizePreset:
    """Voxel counts of a preset; physical sizes come from the field-of-view ranges shared by all presets."""

    inplane_nominal: int
    inplane_range: tuple[int, int]  # inclusive range of y and x voxel counts
    slices_range: tuple[int, int]  # inclusive range of z voxel counts


SIZES: dict[str, SizePreset] = {
    "small": SizePreset(60, (56, 64), (24, 40)),
    "demo": SizePreset(128, (120, 136), (56, 80)),
    "bench": SizePreset(128, (120, 136), (72, 88)),  # the preprocessing benchmark's ~128x128x80
    "large": SizePreset(256, (248, 264), (140, 160)),  # the prediction benchmark's ~256x256x150
}
INPLANE_FOV_MM = (350.0, 385.0)
Z_FOV_MM = (200.0, 300.0)
FLIP_PROBABILITY = 0.25
# Tumour contrast against the organ's parenchyma and image noise, after one real portal-venous liver CT (docstring).
TUMOUR_CONTRAST_HU = (48.0, 15.0)  # mean, standard deviation of |tumour - parenchyma| per tumour
TUMOUR_CONTRAST_RANGE_HU = (15.0, 90.0)
HYPODENSE_SHARE = 0.9
NOISE_SIGMA_HU = (11.0, 17.0)  # uniform range of the per-case white-noise sigma
_FLIPS = ((-1.0, -1.0, 1.0), (1.0, 1.0, -1.0))


# ----------------------------------------------------------------------------------------------------------------
# Geometry and rasterisation helpers


def _f32(v: float, decimals: int) -> float:
    """Round, then snap to float32: NIfTI stores spacing and origin as float32, so the geometry round-trips exactly."""
    return float(np.float32(round(v, decimals)))


def _make_geometry(rng: np.random.Generator, preset: SizePreset) -> Geometry:
    """Draw the case's voxel grid: counts, spacing from a body-sized field of view, sometimes flipped axes."""
    ny, nx = (int(rng.integers(preset.inplane_range[0], preset.inplane_range[1] + 1)) for _ in range(2))
    nz = int(rng.integers(preset.slices_range[0], preset.slices_range[1] + 1))
    s_xy = _f32(rng.uniform(*INPLANE_FOV_MM) / preset.inplane_nominal, 4)
    s_z = _f32(rng.uniform(*Z_FOV_MM) / nz, 4)
    signs = (1.0, 1.0, 1.0)
    if rng.random() < FLIP_PROBABILITY:
        signs = _FLIPS[int(rng.integers(len(_FLIPS)))]
    # The field of view is centred near the body centre, with a scanner-like offset of the table position.
    centre = (rng.uniform(-15, 15), rng.uniform(-15, 15), rng.uniform(-40, 40))
    spacing = (s_xy, s_xy, s_z)
    counts = (nx, ny, nz)
    origin = tuple(
        _f32(c - sign * (n - 1) / 2.0 * s, 2) for c, sign, n, s in zip(centre, signs, counts, spacing)
    )
    direction = (signs[0], 0.0, 0.0, 0.0, signs[1], 0.0, 0.0, 0.0, signs[2])
    return Geometry(spacing=spacing, origin=origin, direction=direction, shape=(nz, ny, nx))


class _Grid:
    """Physical (LPS, mm) coordinate of every voxel centre along each array axis; direction is diagonal."""

    def __init__(self, geometry: Geometry):
        nz, ny, nx = geometry.shape
        d = geometry.direction
        axes = []
        for n, o, s, sign in zip((nx, ny, nz), geometry.origin, geometry.spacing, (d[0], d[4], d[8])):
            axes.append((o + sign * s * np.arange(n, dtype=np.float64)).astype(np.float32))
        self.x, self.y, self.z = axes
        self.shape = (nz, ny, nx)

    def bbox(self, centre: np.ndarray, half: np.ndarray) -> tuple[slice, slice, slice] | None:
        """Array slices (z, y, x) of the voxels within ``half`` mm of ``centre`` (both in x, y, z order)."""
        slices = []
        for coord, c, h in zip((self.z, self.y, self.x), centre[::-1], half[::-1]):
            idx = np.flatnonzero(np.abs(coord - c) <= h)
            if idx.size == 0:
                return None
            slices.append(slice(int(idx[0]), int(idx[-1]) + 1))  # coordinates are monotone: contiguous
        return slices[0], slices[1], slices[2]

    def offsets(self, sl: tuple[slice, slice, slice], centre: np.ndarray) -> tuple[np.ndarray, ...]:
        """Broadcastable offsets from ``centre`` in mm: dz (Z,1,1), dy (1,Y,1), dx (1,1,X)."""
        dz = (self.z[sl[0]] - np.float32(centre[2]))[:, None, None]
        dy = (self.y[sl[1]] - np.float32(centre[1]))[None, :, None]
        dx = (self.x[sl[2]] - np.float32(centre[0]))[None, None, :]
        return dz, dy, dx


def _rot(z_deg: float = 0.0, y_deg: float = 0.0, x_deg: float = 0.0) -> np.ndarray:
    """Rotation matrix (columns = the ellipsoid's own axes in patient coordinates)."""
    a, b, c = (math.radians(v) for v in (z_deg, y_deg, x_deg))
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rx = np.array([[1, 0, 0], [0, math.cos(c), -math.sin(c)], [0, math.sin(c), math.cos(c)]])
    return rz @ ry @ rx


def _random_rot(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    return _rot(*rng.uniform(-max_deg, max_deg, 3))


def _wobble(rng: np.random.Generator, amplitude: float, wavelength: tuple[float, float]) -> list[tuple]:
    """Two low-frequency plane waves that make an ellipsoid's surface lobulated instead of perfectly smooth."""
    waves = []
    for _ in range(2):
        v = rng.normal(size=3)
        k = v / np.linalg.norm(v) * (2 * math.pi / rng.uniform(*wavelength))
        amp = float(rng.uniform(0.5, 1.0) * amplitude)
        waves.append((amp, k.astype(np.float32), float(rng.uniform(0, 2 * math.pi))))
    return waves


@dataclass
class _Ellipsoid:
    """An ellipsoid in patient mm: centre (x, y, z), semi-axes along its own axes, rotation, optional wobble."""

    centre: np.ndarray
    semi: np.ndarray
    rot: np.ndarray | None = None
    wobble: list[tuple] | None = None

    def point_inside(self, rng: np.random.Generator, max_radius: float) -> np.ndarray:
        """A random point within ``max_radius`` (normalised) of the centre, for placing tumours inside organs."""
        v = rng.normal(size=3)
        u = v / np.linalg.norm(v) * max_radius * rng.random() ** (1 / 3)
        local = u * self.semi
        return self.centre + (local if self.rot is None else self.rot @ local)

    def q(self, grid: _Grid, scale: float = 1.0) -> tuple[tuple[slice, slice, slice], np.ndarray] | None:
        """Normalised squared radius over the bounding box (<= 1 inside), with ``scale`` enlarging the box."""
        semi = self.semi.astype(np.float64)
        pad = math.sqrt(1.0 + sum(w[0] for w in self.wobble or ())) * scale
        if self.rot is None:
            half = semi * pad
        else:
            half = np.sqrt(((self.rot * semi[None, :]) ** 2).sum(axis=1)) * pad
        sl = grid.bbox(self.centre, half)
        if sl is None:
            return None
        dz, dy, dx = grid.offsets(sl, self.centre)
        if self.rot is None:
            q = (dx / np.float32(semi[0])) ** 2 + (dy / np.float32(semi[1])) ** 2 + (dz / np.float32(semi[2])) ** 2
        else:
            r = self.rot.astype(np.float32)
            q = None
            for k in range(3):
                u = (dx * r[0, k] + dy * r[1, k] + dz * r[2, k]) / np.float32(semi[k])
                q = u * u if q is None else q + u * u
        for amp, kvec, phase in self.wobble or ():
            q = q - np.float32(amp) * np.sin(dx * kvec[0] + dy * kvec[1] + dz * kvec[2] + np.float32(phase))
        return sl, q


class _Canvas:
    """The float32 HU image and uint8 label painted in order; the last structure painted over a voxel owns it."""

    def __init__(self, grid: _Grid):
        self.grid = grid
        self.img = np.full(grid.shape, -1000.0, dtype=np.float32)
        self.lab = np.zeros(grid.shape, dtype=np.uint8)

    def paint(self, sl: tuple[slice, ...], mask: np.ndarray, hu: float, label: int = 0) -> int:
        img, lab = self.img[sl], self.lab[sl]
        img[mask] = hu
        lab[mask] = label
        return int(np.count_nonzero(mask))

    def paint2d(self, mask2d: np.ndarray, hu: float, zmask: np.ndarray | None = None, label: int = 0) -> None:
        """Paint a cross-section that is the same on every slice (or on the slices in ``zmask``)."""
        if zmask is None:
            self.img[:, mask2d] = hu
            self.lab[:, mask2d] = label
        else:
            m = zmask[:, None, None] & mask2d[None]
            self.img[m] = hu
            self.lab[m] = label


# ----------------------------------------------------------------------------------------------------------------
# The case generator: one painter per structure


@dataclass(frozen=True)
class _Body:
    """The body outline every organ is placed against: centre, half-width and -depth, wall thicknesses."""

    grid: _Grid
    bx: float
    by: float
    half_w: float
    half_h: float
    t_fat: float
    t_mus: float
    power: float
    xx: np.ndarray  # (1, X) lateral offset from the body centre, mm
    yy: np.ndarray  # (Y, 1) anteroposterior offset from the body centre, mm

    def superellipse(self, w: float, h: float) -> np.ndarray:
        return (np.abs(self.xx) / np.float32(w)) ** self.power + (np.abs(self.yy) / np.float32(h)) ** self.power <= 1

    @property
    def cav_a(self) -> float:
        """Cavity half-width (lateral)."""
        return self.half_w - self.t_fat - self.t_mus

    @property
    def cav_b(self) -> float:
        """Cavity half-depth (anteroposterior)."""
        return self.half_h - self.t_fat - self.t_mus

    @property
    def cavity(self) -> np.ndarray:
        return self.superellipse(self.cav_a, self.cav_b)

    def inside_cavity(self, sl: tuple[slice, ...], m: np.ndarray) -> np.ndarray:
        return m & self.cavity[sl[1], sl[2]][None]


def _solid(cv: _Canvas, body: _Body, e: _Ellipsoid, value: float, label: int = 0) -> None:
    """Paint an ellipsoid, clipped to the abdominal cavity."""
    r = e.q(cv.grid)
    if r is not None:
        sl, q = r
        cv.paint(sl, body.inside_cavity(sl, q <= 1), value, label)


def _paint_body(rng: np.random.Generator, cv: _Canvas, hu: dict[str, float]) -> _Body:
    """Body outline: a flattened superellipse (the back lies flat on the table), fat ring, muscle wall, cavity."""
    grid = cv.grid
    bx, by = rng.uniform(-8, 8), rng.uniform(-8, 8)
    half_w, half_h = rng.uniform(130, 155), rng.uniform(95, 118)
    t_fat, t_mus = rng.uniform(10, 28), rng.uniform(7, 13)
    power = rng.uniform(2.1, 2.6)
    yy, xx = grid.y[:, None] - np.float32(by), grid.x[None, :] - np.float32(bx)
    body = _Body(grid, bx, by, half_w, half_h, t_fat, t_mus, power, xx, yy)
    cv.paint2d(body.superellipse(half_w, half_h), hu["fat"])
    cv.paint2d(body.superellipse(half_w - t_fat, half_h - t_fat), hu["muscle"])
    cv.paint2d(body.cavity, hu["visceral_fat"])
    return body


def _paint_ribs(rng: np.random.Generator, cv: _Canvas, hu: dict[str, float], body: _Body, z_liver: float) -> None:
    """Ribs: oblique bands (descending anteriorly) just inside the muscle wall of the upper abdomen, so an axial
    slice cuts them into short arcs; absent anteriorly and beside the spine."""
    b, grid = body, cv.grid
    period, width, slope = rng.uniform(28, 36), rng.uniform(7, 11), rng.uniform(0.3, 0.5)
    z_phase = rng.uniform(0, period)
    rib_ring = b.superellipse(b.half_w - b.t_fat - 0.5 * b.t_mus, b.half_h - b.t_fat - 0.5 * b.t_mus) & ~b.superellipse(
        b.half_w - b.t_fat - b.t_mus - 5, b.half_h - b.t_fat - b.t_mus - 5
    )
    rib_ring &= (b.yy > -0.45 * b.half_h) & ~((np.abs(b.xx) < 45) & (b.yy > 0))
    rib_z = grid.z[:, None, None] - np.float32(slope) * b.yy[None] - np.float32(z_phase)
    ribs = (rib_z % np.float32(period) < width) & rib_ring[None] & (grid.z > z_liver - 60)[:, None, None]
    cv.img[ribs] = hu["rib"]


def _paint_lungs(rng: np.random.Generator, cv: _Canvas, hu: dict[str, float], body: _Body, z_liver: float) -> None:
    """Lung bases above and behind the liver dome and spleen."""
    for side in (-1, 1):
        _solid(cv, body, _Ellipsoid(
            np.array([body.bx + side * 0.5 * body.cav_a, body.by + 0.25 * body.cav_b, z_liver + rng.uniform(85, 100)]),
            np.array([0.42 * body.cav_a, 0.65 * body.cav_b, 60.0]),
            _rot(rng.uniform(-10, 10)),
        ), hu["lung"])


def _paint_bowel(rng: np.random.Generator, cv: _Canvas, hu: dict[str, float], body: _Body, z_liver: float) -> None:
    """Bowel loops in the anterior abdomen and the stomach (left upper): fluid-filled wall, gas above a level."""
    grid, bx, by, cav_a, cav_b = cv.grid, body.bx, body.by, body.cav_a, body.cav_b
    loops = [
        _Ellipsoid(
            np.array([bx + 0.35 * cav_a, by - 0.35 * cav_b, z_liver + rng.uniform(0, 20)]),
            np.array([40.0, 30.0, 40.0]) * rng.uniform(0.85, 1.15, 3),
            _random_rot(rng, 20),
        )
    ]
    for _ in range(int(rng.integers(10, 17))):
        loops.append(
            _Ellipsoid(
                np.array(
                    [
                        bx + rng.uniform(-0.7, 0.7) * cav_a,
                        by + rng.uniform(-0.8, 0.1) * cav_b,
                        rng.uniform(grid.z.min() - 20, z_liver - 10),
                    ]
                ),
                rng.uniform(12, 26, 3),
                _random_rot(rng, 90),
            )
        )
    for e in loops:
        r = e.q(grid)
        gas_kind = rng.random()
        level = rng.uniform(-0.7, 0.4)
        fluid = rng.uniform(-5, 5) + hu["bowel_fluid"]
        if r is None:
            continue
        sl, q = r
        wall = body.inside_cavity(sl, q <= 1)
        cv.paint(sl, wall, hu["bowel_wall"])
        lumen = wall & (q <= 0.72)
        cv.paint(sl, lumen, fluid)
        if gas_kind < 0.55:  # gas pocket: anterior part of the lumen above a horizontal level
            dz, dy, dx = grid.offsets(sl, e.centre)
            gas = lumen & (dy < np.float32(level * e.semi.max())) if gas_kind > 0.15 else lumen
            cv.paint(sl, gas, hu["gas"])


def _paint_back_muscles(rng: np.random.Generator, cv: _Canvas, hu: dict[str, float], body: _Body, y_vb: float,
                        r_vb: float, zc: float) -> None:
    """Psoas and paraspinal muscles beside and behind the spine."""
    for side in (-1, 1):
        _solid(cv, body, _Ellipsoid(
            np.array([body.bx + side * (r_vb + 16), y_vb + 4, zc - 60]),
            np.array([15.0, 14.0, 120.0]) * rng.uniform(0.9, 1.1),
            _rot(0, side * 5),
        ), hu["muscle"])
        _solid(cv, body, _Ellipsoid(
            np.array([body.bx + side * 35, y_vb + r_vb + 30, zc]),
            np.array([28.0, 22.0, 400.0]) * rng.uniform(0.9, 1.1),
        ), hu["muscle"])


def _paint_spleen(rng: np.random.Generator, cv: _Canvas, hu: dict[str, float], body: _Body, z_liver: float,
                  size: float) -> None:
    """Spleen: left posterior, long axis following the ribs."""
    _solid(cv, body, _Ellipsoid(
        np.array([body.bx + 0.65 * body.cav_a, body.by + 0.3 * body.cav_b, z_liver + rng.uniform(5, 25)]),
        np.array([22.0, 50.0, 45.0]) * size,
        _rot(rng.uniform(-45, -25), rng.uniform(-10, 10)),
        _wobble(rng, 0.12, (60, 120)),
    ), hu["spleen"])


def _paint_liver(rng: np.random.Generator, cv: _Canvas, hu: dict[str, float], body: _Body, z_liver: float,
                 org: np.ndarray) -> tuple[_Ellipsoid, _Ellipsoid]:
    """Liver: a large right lobe and a left lobe crossing the midline anteriorly; gallbladder under the right lobe.
    Returns the lobes (tumour sites)."""
    bx, by, cav_a, cav_b = body.bx, body.by, body.cav_a, body.cav_b
    right_lobe = _Ellipsoid(
        np.array([bx - 0.5 * cav_a, by + rng.uniform(-0.1, 0.05) * cav_b, z_liver]),
        np.array([0.55 * cav_a, 0.85 * cav_b, 75.0]) * org[1],
        _rot(rng.uniform(-12, 12), rng.uniform(-8, 8)),
        _wobble(rng, 0.12, (70, 160)),
    )
    left_lobe = _Ellipsoid(
        np.array([bx + rng.uniform(0.0, 0.2) * cav_a, by - 0.45 * cav_b, z_liver + rng.uniform(5, 25)]),
        np.array([0.45 * cav_a, 0.33 * cav_b, 45.0]) * org[2],
        _rot(rng.uniform(-15, 15)),
        _wobble(rng, 0.1, (50, 120)),
    )
    for lobe in (right_lobe, left_lobe):
        _solid(cv, body, lobe, hu["liver"], DEFAULT_LABELS["liver"])
    if rng.random() < 0.7:
        gb = _Ellipsoid(
            right_lobe.centre + np.array([0.35 * right_lobe.semi[0], -0.45 * right_lobe.semi[1], -55.0]),
            np.array([14.0, 14.0, 30.0]) * rng.uniform(0.8, 1.2, 3),
            _random_rot(rng, 25),
        )
        _solid(cv, body, gb, hu["bile"])
    return right_lobe, left_lobe


def _paint_kidneys(rng: np.random.Generator, cv: _Canvas, hu: dict[str, float], body: _Body, y_vb: float,
                   r_vb: float, z_liver: float, org: np.ndarray) -> list[_Ellipsoid]:
    """Kidneys beside the spine, the right one lower; cortex (outer shell) brighter than medulla."""
    kidneys = []
    z_kid = z_liver - rng.uniform(50, 70)
    for side, k in ((-1, 3), (1, 4)):
        e = _Ellipsoid(
            np.array([body.bx + side * (r_vb + rng.uniform(40, 52)), y_vb + rng.uniform(0, 10), z_kid + 8 * side]),
            np.array([27.0, 24.0, 55.0]) * org[k],
            _rot(side * rng.uniform(20, 40), side * rng.uniform(8, 18)),  # hilum anteromedial, upper pole medial
            _wobble(rng, 0.06, (60, 120)),
        )
        kidneys.append(e)
        r = e.q(cv.grid)
        if r is not None:
            sl, q = r
            whole = body.inside_cavity(sl, q <= 1)
            cv.paint(sl, whole, hu["cortex"], DEFAULT_LABELS["kidney"])
            cv.paint(sl, whole & (q <= rng.uniform(0.45, 0.55)), hu["medulla"], DEFAULT_LABELS["kidney"])
    return kidneys


def _paint_vessels(rng: np.random.Generator, cv: _Canvas, hu: dict[str, float], body: _Body, y_vb: float,
                   r_vb: float) -> None:
    """Vessels: aorta (arterial contrast) left-anterior of the spine, IVC to its right."""
    xx, yy, by = body.xx, body.yy, body.by
    ax, ar = rng.uniform(8, 16), rng.uniform(10, 13)
    aorta = (xx - np.float32(ax)) ** 2 + (yy - np.float32(y_vb - by - r_vb - 13)) ** 2 <= np.float32(ar * ar)
    ivc = ((xx + np.float32(rng.uniform(20, 26))) / np.float32(14)) ** 2 + (
        (yy - np.float32(y_vb - by - r_vb - 9)) / np.float32(10)
    ) ** 2 <= 1
    cv.paint2d(ivc, hu["ivc"])
    cv.paint2d(aorta, hu["aorta"])


def _paint_spine(rng: np.random.Generator, cv: _Canvas, hu: dict[str, float], body: _Body, y_vb: float,
                 r_vb: float) -> None:
    """Lumbar spine: vertebral body with cortical shell and discs, canal, posterior arch and spinous process."""
    xx, yy, by, grid = body.xx, body.yy, body.by, cv.grid
    dvb = np.sqrt(xx**2 + (yy - np.float32(y_vb - by)) ** 2)
    disc_period = rng.uniform(30, 36)
    disc_z = (grid.z - np.float32(rng.uniform(0, disc_period))) % np.float32(disc_period) < 8
    y_canal = y_vb - by + r_vb + 9
    dcan = np.sqrt(xx**2 + (yy - np.float32(y_canal)) ** 2)
    cv.paint2d((dcan <= 15) & (yy > y_canal - 4), hu["bone_cortex"] * 0.8)
    cv.paint2d((np.abs(xx) <= 4) & (yy > y_canal) & (yy < y_canal + 42), hu["bone_cortex"] * 0.8)
    cv.paint2d(dcan <= 8, hu["csf"])
    cv.paint2d(dvb <= r_vb, hu["bone_cortex"])
    cv.paint2d(dvb <= r_vb - 2.5, hu["bone_cancellous"])
    cv.paint2d(dvb <= r_vb, hu["disc"], zmask=disc_z)


def _paint_tumours(rng: np.random.Generator, cv: _Canvas, hu: dict[str, float], geometry: Geometry,
                   liver: tuple[_Ellipsoid, _Ellipsoid], kidneys: list[_Ellipsoid]) -> None:
    """Tumours, clipped to their organ as it stands after everything else was painted."""
    right_lobe, left_lobe = liver
    d_min = max(5.0, 2.0 * float(np.prod(geometry.spacing)) ** (1 / 3))
    organ_sites = {
        "liver": ([right_lobe, right_lobe, right_lobe, left_lobe], DEFAULT_LABELS["liver"],
                  DEFAULT_LABELS["liver_tumor"], hu["liver"]),
        "kidney": (kidneys, DEFAULT_LABELS["kidney"], DEFAULT_LABELS["kidney_tumor"],
                   0.5 * (hu["cortex"] + hu["medulla"])),
    }
    for name, (sites, organ_label, tumour_label, parenchyma) in organ_sites.items():
        n = int(rng.choice(4, p=[0.25, 0.4, 0.2, 0.15]))
        for _ in range(n):
            site = sites[int(rng.integers(len(sites)))]
            d = rng.uniform(d_min, 40.0)
            semi = rng.uniform(0.85, 1.15, 3)
            semi = semi / np.prod(semi) ** (1 / 3) * d / 2
            t = _Ellipsoid(
                site.point_inside(rng, 0.75 if name == "liver" else 0.6),
                semi,
                _random_rot(rng, 90),
                _wobble(rng, 0.08, (d, 3 * d)),
            )
            sign = -1.0 if rng.random() < HYPODENSE_SHARE else 1.0
            value = parenchyma + sign * float(np.clip(rng.normal(*TUMOUR_CONTRAST_HU), *TUMOUR_CONTRAST_RANGE_HU))
            necrotic = d >= 20 and rng.random() < 0.4
            core, core_hu = rng.uniform(0.3, 0.6) ** 2, rng.uniform(5, 25)
            r = t.q(cv.grid)
            if r is None:
                continue
            sl, q = r
            lab = cv.lab[sl]
            m = (q <= 1) & ((lab == organ_label) | (lab == tumour_label))
            cv.paint(sl, m, value, tumour_label)
            if necrotic:
                cv.paint(sl, m & (q <= core), core_hu, tumour_label)


def _acquire(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Acquisition: partial-volume blur, noise, a per-case calibration shift; CT stores int16 clipped at -1024."""
    img = gaussian_filter(image, sigma=float(rng.uniform(0.5, 1.0)), mode="nearest")
    img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(rng.uniform(*NOISE_SIGMA_HU))
    img += np.float32(rng.uniform(-15, 15))
    np.rint(img, out=img)
    np.clip(img, -1024, 3071, out=img)
    return img.astype(np.int16)


def generate_case(seed: int, size: str = "small") -> tuple[np.ndarray, np.ndarray, Geometry]:
    """One synthetic abdominal CT: image int16 (Z, Y, X) in HU, label uint8 (Z, Y, X), and its geometry.

    A pure function of ``(seed, size)``, so tests and benchmarks can regenerate any case instead of storing it.
    The painters run in a fixed order on one random stream; later structures overwrite earlier ones.
    """
    if size not in SIZES:
        raise AutosegError(f"phantom size {size!r} is unknown; choose one of {sorted(SIZES)}")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise AutosegError(f"phantom seed must be a non-negative integer, found {seed!r}")
    rng = np.random.default_rng(int(seed))
    geometry = _make_geometry(rng, SIZES[size])
    cv = _Canvas(_Grid(geometry))
    hu = _draw_intensities(rng)
    body = _paint_body(rng, cv, hu)
    # Craniocaudal landmarks relative to the field of view's centre, and per-organ size factors (+-10%).
    zc = float(cv.grid.z.mean())
    z_liver = zc + rng.uniform(20, 45)
    org = rng.uniform(0.9, 1.1, size=8)
    _paint_ribs(rng, cv, hu, body, z_liver)
    _paint_lungs(rng, cv, hu, body, z_liver)
    y_vb = body.by + body.half_h - rng.uniform(0.68, 0.76) * body.half_h  # vertebral body centre (AP)
    _paint_bowel(rng, cv, hu, body, z_liver)
    r_vb = rng.uniform(16, 20)  # vertebral body radius
    _paint_back_muscles(rng, cv, hu, body, y_vb, r_vb, zc)
    _paint_spleen(rng, cv, hu, body, z_liver, org[0])
    liver = _paint_liver(rng, cv, hu, body, z_liver, org)
    kidneys = _paint_kidneys(rng, cv, hu, body, y_vb, r_vb, z_liver, org)
    _paint_vessels(rng, cv, hu, body, y_vb, r_vb)
    _paint_spine(rng, cv, hu, body, y_vb, r_vb)
    _paint_tumours(rng, cv, hu, geometry, liver, kidneys)
    return _acquire(rng, cv.img), cv.lab, geometry


def _draw_intensities(rng: np.random.Generator) -> dict[str, float]:
    """Per-case tissue HU (portal-venous phase): the same tissue differs a little between patients and scanners."""
    ranges = {
        "fat": (-115, -85),
        "visceral_fat": (-105, -75),
        "muscle": (40, 60),
        "rib": (350, 550),
        "lung": (-880, -820),
        "bowel_wall": (30, 50),
        "bowel_fluid": (5, 25),
        "gas": (-950, -880),
        "spleen": (100, 120),
        "liver": (100, 135),  # portal-venous enhancement (real scan: 118 +- 22 HU)
        "bile": (0, 20),
        "cortex": (165, 195),
        "medulla": (110, 130),
        "aorta": (150, 200),
        "ivc": (100, 140),
        "bone_cortex": (600, 700),
        "bone_cancellous": (380, 450),
        "disc": (70, 95),
        "csf": (5, 20),
    }
    return {k: float(rng.uniform(lo, hi)) for k, (lo, hi) in ranges.items()}


# ----------------------------------------------------------------------------------------------------------------
# Dataset writer


def case_seed(seed: int, index: int) -> int:
    """The seed of case ``index`` of a dataset seeded ``seed``: a hash, so datasets with nearby seeds share no case."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1, dtype=np.uint32)[0])


def write_dataset(
    out_dir: Path,
    num_cases: int,
    seed: int,
    size: str = "small",
    num_test: int = 0,
    dataset_name: str = DEFAULT_NAME,
) -> Path:
    """Write a phantom dataset in the nnU-Net v2 raw layout and return its folder.

    Training cases are ``phantom_000`` ..; test cases continue the numbering (so adding test cases never changes the
    training set) and get ``labelsTs/`` too, for evaluation. Rewriting gives the same files; phantom cases left over
    from an earlier, larger run are removed so ``numTraining`` matches what is on disk.
    """
    if size not in SIZES:
        raise AutosegError(f"phantom size {size!r} is unknown; choose one of {sorted(SIZES)}")
    if num_cases < 1:
        raise AutosegError(f"number of training cases must be at least 1, found {num_cases}")
    if num_test < 0:
        raise AutosegError(f"number of test cases must be 0 or more, found {num_test}")
    if seed < 0:
        raise AutosegError(f"seed must be 0 or more, found {seed}")
    if not dataset_name or "/" in dataset_name or dataset_name in (".", ".."):
        raise AutosegError(f"dataset name {dataset_name!r} must be a plain folder name, e.g. {DEFAULT_NAME}")
    folder = Path(out_dir) / dataset_name
    total = num_cases + num_test
    width = max(3, len(str(total - 1)))
    plan = []
    for index in range(total):
        split = "Tr" if index < num_cases else "Ts"
        plan.append((f"phantom_{index:0{width}d}", split, index))
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        d = folder / sub
        if sub.endswith("Tr") or num_test > 0:
            d.mkdir(parents=True, exist_ok=True)
        if not d.is_dir():
            continue
        remove_stale_temporaries(d)
        suffix = "_0000" + FILE_ENDING if sub.startswith("images") else FILE_ENDING
        wanted = {cid + suffix for cid, split, _ in plan if sub.endswith(split)}
        for p in d.iterdir():
            if re.fullmatch(r"phantom_\d+" + re.escape(suffix), p.name) and p.name not in wanted:
                p.unlink()
        if not wanted and not any(d.iterdir()):
            d.rmdir()  # an earlier run's test split, now empty
    for cid, split, index in tqdm(plan, desc=f"phantom {size}", unit="case"):
        image, label, geometry = generate_case(case_seed(seed, index), size)
        write_image(folder / f"images{split}" / f"{cid}_0000{FILE_ENDING}", image, geometry)
        write_image(folder / f"labels{split}" / f"{cid}{FILE_ENDING}", label, geometry)
    write_json(
        folder / "dataset.json",
        {
            "channel_names": {"0": "CT"},
            "labels": dict(DEFAULT_LABELS),
            "numTraining": num_cases,
            "file_ending": FILE_ENDING,
            "name": dataset_name,
            "description": (
                f"Synthetic abdominal CT phantom (autoseg.phantom, size={size}, seed={seed}): liver, kidneys and "
                f"their tumours; {num_cases} training and {num_test} test cases."
            ),
        },
    )
    return folder
