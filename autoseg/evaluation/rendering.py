"""Drawing the report: overlay montages of labels over the CT and the HTML page that links them.

Overlays show axial slices through the largest lesions, labels over the CT in an abdominal window W400/L40 (or over
black without an image), in radiological convention when the direction is axis-aligned: patient right on the image
left, anterior up.
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..atomic import atomic_path
from ..io.images import Geometry
from ..labels import DEFAULT_LABELS, check_labels

CT_WINDOW = (-160.0, 240.0)  # abdominal soft-tissue window, W400 / L40
OVERLAY_ALPHA = 0.45
MAX_PANELS = 4


def _palette(max_value: int) -> np.ndarray:
    from matplotlib import colormaps

    colours = colormaps["tab10"].colors
    table = np.zeros((max_value + 1, 4), dtype=np.float32)
    for v in range(1, max_value + 1):
        table[v, :3] = colours[v % len(colours)]
        table[v, 3] = OVERLAY_ALPHA
    return table


def _display_flips(geometry: Geometry) -> tuple[bool, bool]:
    """(flip rows, flip columns) that show an axial slice in radiological convention for axis-aligned directions."""
    d = np.asarray(geometry.direction, dtype=np.float64).reshape(3, 3)
    flip_cols = abs(d[0, 0]) >= 0.5 and d[0, 0] < 0  # index x runs toward patient right: mirror
    flip_rows = abs(d[1, 1]) >= 0.5 and d[1, 1] < 0  # index y runs anterior: mirror
    return flip_rows, flip_cols


def _panel_slices(labels: np.ndarray, lesions: Sequence[Mapping[str, Any]], max_panels: int) -> list[int]:
    slices: list[int] = []
    for les in sorted(lesions, key=lambda les: -les["volume_ml"]):
        if les["axial_slice"] not in slices:
            slices.append(les["axial_slice"])
        if len(slices) == max_panels:
            break
    if not slices:
        per_slice = np.count_nonzero(labels.reshape(labels.shape[0], -1), axis=1)
        slices = [int(per_slice.argmax()) if per_slice.any() else labels.shape[0] // 2]
    return slices


def render_montage(
    path: str | Path,
    labels: np.ndarray,
    geometry: Geometry,
    lesions: Sequence[Mapping[str, Any]],
    image: np.ndarray | None = None,
    label_map: Mapping[str, Any] | None = None,
    title: str = "",
    max_panels: int = MAX_PANELS,
    uncertainty: np.ndarray | None = None,
) -> list[int]:
    """Write a PNG of axial slices through the largest lesions (or the slice with most foreground), labels
    coloured over the CT (abdominal window) or over black; each lesion's maximal axial diameter is drawn on its
    slice. With an ``uncertainty`` map (0-1, the labels' grid) a second row shows it over the same slices, with
    the labels' outlines. Returns the slice indices shown."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    label_map = DEFAULT_LABELS if label_map is None else label_map
    named = {v: n for n, v in check_labels(label_map).items() if isinstance(v, int) and v}
    slices = _panel_slices(labels, lesions, max_panels)
    palette = _palette(max(int(labels.max(initial=0)), max(named, default=0)))
    flip_rows, flip_cols = _display_flips(geometry)
    sz, sy, sx = geometry.spacing_zyx
    ny, nx = labels.shape[1:]

    def oriented(a: np.ndarray) -> np.ndarray:
        a = a[::-1] if flip_rows else a
        return a[:, ::-1] if flip_cols else a

    rows = 1 if uncertainty is None else 2
    fig = Figure(figsize=(3.6 * len(slices), 4.0 * rows), dpi=120)
    FigureCanvasAgg(fig)
    grid = fig.subplots(rows, len(slices), squeeze=False)
    axes = grid[0]
    fig.subplots_adjust(left=0.01, right=0.99 if rows == 1 else 0.86, bottom=0.07 / rows, top=1 - 0.1 / rows,
                        wspace=0.03, hspace=0.08)

    def background(ax: Any, z: int) -> None:
        if image is not None:
            ax.imshow(oriented(image[z]), cmap="gray", vmin=CT_WINDOW[0], vmax=CT_WINDOW[1],
                      aspect=sy / sx, interpolation="nearest")
        else:
            ax.imshow(np.zeros((ny, nx)), cmap="gray", vmin=0, vmax=1, aspect=sy / sx)

    if uncertainty is not None:
        for ax, z in zip(grid[1], slices):
            background(ax, z)
            u = np.ma.masked_less(oriented(np.asarray(uncertainty[z], dtype=np.float32)), 0.02)
            shown = ax.imshow(u, cmap="inferno", vmin=0.0, vmax=1.0, alpha=0.8, aspect=sy / sx,
                              interpolation="nearest")
            ax.contour(oriented(labels[z] > 0), levels=[0.5], colors="cyan", linewidths=0.5)
            ax.set_title(f"predictive entropy, z={z}", fontsize=8)
            ax.set_axis_off()
        bar = fig.colorbar(shown, cax=fig.add_axes((0.88, 0.07 / rows, 0.02, 0.4)))
        bar.ax.tick_params(labelsize=6)
    for ax, z in zip(axes, slices):
        background(ax, z)
        ax.imshow(oriented(palette[labels[z]]), aspect=sy / sx, interpolation="nearest")
        for les in lesions:
            if les["axial_slice"] != z:
                continue
            (_, y0, x0), (_, y1, x1) = les["diameter_endpoints_index"]
            ys = [ny - 1 - y0, ny - 1 - y1] if flip_rows else [y0, y1]
            xs = [nx - 1 - x0, nx - 1 - x1] if flip_cols else [x0, x1]
            ax.plot(xs, ys, color="yellow", linewidth=1.0)
            ax.text(xs[1], ys[1], f" {les['structure']} {les['lesion']}: {les['max_axial_diameter_mm']:.1f} mm",
                    color="yellow", fontsize=6)
        ax.set_title(f"slice z={z}", fontsize=8)
        ax.set_axis_off()
    present = [v for v in sorted(named) if np.any(labels[slices] == v)]
    if present:
        fig.legend(handles=[Patch(color=palette[v][:3], label=named[v]) for v in present], loc="lower center",
                   ncol=len(present), fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=9)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return slices


def number_text(v: Any, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def write_html(path: str | Path, reports: Sequence[Mapping[str, Any]], images: Mapping[str, str]) -> None:
    """One self-contained HTML page: a table of all cases, then per case its structures' HU statistics (when the
    report had images), its lesions and its overlay (``images``: case -> the ``src`` of its overlay, a data URI so
    the page travels as one file)."""
    e = html.escape
    out = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>autoseg report</title><style>",
           "body{font-family:sans-serif;margin:1.5em} table{border-collapse:collapse;margin:.5em 0}"
           " td,th{border:1px solid #bbb;padding:2px 6px;text-align:right} th{background:#eee}"
           " img{max-width:100%}</style></head><body><h1>autoseg report</h1>",
           f"<p>{len(reports)} case(s). Volumes in mL; burden = tumour / (organ + tumour) volume; diameters are the "
           "maximal axial (in-plane) diameters.</p>"]
    flagged = [rep for rep in reports if (rep.get("review") or {}).get("flag_for_review")]
    if any(rep.get("review") for rep in reports):
        out.append(f"<h2>Flagged for review: {len(flagged)} of {len(reports)} case(s)</h2>")
        out.append("<p>By the expected Dice per structure from the prediction's uncertainty, with thresholds "
                   "calibrated on cross-validation (<code>predict --uncertainty</code>).</p>")
        if flagged:
            out.append("<table><tr><th>case</th><th>why</th></tr>")
            for rep in flagged:
                reasons = "<br>".join(e(r) for r in rep["review"]["reasons"])
                out.append(f"<tr><td><a href='#{e(rep['case'])}'>{e(rep['case'])}</a></td>"
                           f"<td style='text-align:left'>{reasons}</td></tr>")
            out.append("</table>")
        reports = flagged + [rep for rep in reports if rep not in flagged]
    if reports:
        vol_names = list(reports[0]["volumes_ml"])
        organs = list(reports[0]["tumour_count"])
        out.append("<table><tr><th>case</th>" + "".join(f"<th>{e(n)} mL</th>" for n in vol_names)
                   + "".join(f"<th>{e(o)} tumours</th><th>{e(o)} burden</th>" for o in organs) + "</tr>")
        for rep in reports:
            cells = "".join(f"<td>{number_text(rep['volumes_ml'][n], '.1f')}</td>" for n in vol_names)
            cells += "".join(f"<td>{rep['tumour_count'][o]}</td><td>{number_text(rep['tumour_burden'][o], '.3f')}</td>"
                             for o in organs)
            out.append(f"<tr><td><a href='#{e(rep['case'])}'>{e(rep['case'])}</a></td>{cells}</tr>")
        out.append("</table>")
    for rep in reports:
        out.append(f"<h2 id='{e(rep['case'])}'>{e(rep['case'])}</h2>")
        review = rep.get("review")
        if review:
            verdict = {True: "<b>flagged for review</b>", False: "not flagged", None: "not decided"}
            dice = ", ".join(f"{e(review['structures'].get(k, k))} {q:.2f}" for k, q in review["expected_dice"].items())
            out.append(f"<p>{verdict[review['flag_for_review']]}: {'; '.join(e(r) for r in review['reasons'])}. "
                       f"Expected Dice: {dice} ({review['members']} member(s) averaged).</p>")
        hu = rep.get("intensity_hu") or {}
        if hu:
            out.append("<table><tr><th>structure</th><th>volume mL</th><th>HU mean</th><th>HU median</th>"
                       "<th>HU 5th-95th percentile</th></tr>")
            for name, st in hu.items():
                out.append(f"<tr><td>{e(name)}</td><td>{number_text(rep['volumes_ml'][name], '.1f')}</td>"
                           f"<td>{number_text(st['hu_mean'], '.1f')}</td><td>{number_text(st['hu_median'], '.1f')}"
                           f"</td><td>{number_text(st['hu_p5'], '.0f')} to "
                           f"{number_text(st['hu_p95'], '.0f')}</td></tr>")
            out.append("</table>")
        if rep["lesions"]:
            confident = "confidence" in rep["lesions"][0]
            out.append("<table><tr><th>lesion</th><th>volume mL</th><th>max axial diameter mm</th>"
                       "<th>slice</th><th>centroid x, y, z mm (LPS)</th>" + ("<th>HU mean</th><th>HU median</th>"
                                                                             if hu else "")
                       + ("<th>confidence</th><th>mean probability</th><th>mean entropy</th>" if confident else "")
                       + "</tr>")
            for les in rep["lesions"]:
                c = ", ".join(f"{v:.1f}" for v in les["centroid_world_mm"])
                stats = (f"<td>{number_text(les['hu_mean'], '.1f')}</td><td>{number_text(les['hu_median'], '.1f')}"
                         "</td>") if hu else ""
                if confident:
                    stats += "".join(f"<td>{number_text(les[k], '.2f')}</td>"
                                     for k in ("confidence", "mean_probability", "mean_entropy"))
                out.append(f"<tr><td>{e(les['structure'])} {les['lesion']}</td><td>{les['volume_ml']:.2f}</td>"
                           f"<td>{les['max_axial_diameter_mm']:.1f}</td><td>{les['axial_slice']}</td>"
                           f"<td>{c}</td>{stats}</tr>")
            out.append("</table>")
        else:
            out.append("<p>no tumour</p>")
        if rep["case"] in images:
            out.append(f"<p><img src='{e(images[rep['case']])}' alt='{e(rep['case'])} overlay'></p>")
    out.append("</body></html>")
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(out) + "\n")
