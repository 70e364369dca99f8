"""Seeded synthetic whole-body PET/CT phantoms with organs, bones and hot lesions.

A phantom is built in a body frame (millimetres; x to the patient's left, y posterior, z superior, 0 at the
floor of the pelvis) on the CT grid: a body outline of skin, subcutaneous fat and muscle whose width and
depth change along z (pelvis, abdomen, chest, shoulders, neck, head), organs as rotated ellipsoids
(liver with a left lobe, spleen, kidneys with a hot renal pelvis, lungs, heart with myocardium and blood
pool, aorta, bladder, brain in a skull), bones (vertebrae with discs and posterior arches, sloping ribs,
sternum, iliac wings, sacrum, femoral heads and shafts), bowel with gas and physiological uptake, a CT
table, and lesions (lung nodules, liver metastases, lymph nodes at the usual stations, soft-tissue primaries,
bone metastases) of 5-40 mm made of 1-4 overlapping spheres, some with a necrotic core.

The CT is in Hounsfield units with in-plane correlated Gaussian noise. The PET is in SUV (body weight):
the activity map is blurred to a scanner PSF (5-7 mm FWHM), resampled onto its own coarser grid
(different spacing, origin, size and, optionally, direction), given Poisson counting noise whose level
depends on the voxel volume, and smoothed lightly as a reconstruction post-filter would. Anatomy, sizes,
positions, uptake, contrast, noise and both grids all vary with the seed.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ..errors import DinomedError
from .labels import LABEL_VALUES, LESION_LABEL

F18_HALF_LIFE_S = 6586.2  # fluorine-18, 109.77 min (DICOM RadionuclideHalfLife convention)


@dataclass
class Lesion:
    """One synthetic lesion: its kind, nominal size, uptake and position (physical LPS mm, CT grid index)."""

    kind: str  # lung, liver, node, soft_tissue, bone
    diameter_mm: float
    suv: float
    hu: float
    center_lps: tuple[float, float, float]
    center_index: tuple[int, int, int]  # (x, y, z) voxel index on the CT grid
    necrotic: bool = False


@dataclass
class Phantom:
    """A synthetic PET/CT case.

    ``ct`` int16 HU and the label maps (``organs`` by :data:`~dinomed.synthetic.labels.ORGAN_LABELS`,
    ``lesions`` 1 = lesion, ``lesion_ids`` one value per lesion) share the CT grid; ``pet`` (float32 SUV)
    has its own grid. ``patient`` holds what a PET DICOM header needs (weight, height, sex, injected dose,
    injection and scan times).
    """

    seed: int
    ct: sitk.Image
    pet: sitk.Image
    organs: sitk.Image
    lesions: sitk.Image
    lesion_ids: sitk.Image
    lesion_list: list[Lesion] = field(default_factory=list)
    patient: dict = field(default_factory=dict)

    @property
    def labels(self) -> sitk.Image:
        """Organs and lesions in one map on the CT grid; a lesion overrides the organ it sits in."""
        organs = sitk.GetArrayViewFromImage(self.organs)
        lesion = sitk.GetArrayViewFromImage(self.lesions) > 0
        combined = np.where(lesion, np.uint8(LESION_LABEL), organs).astype(np.uint8)
        out = sitk.GetImageFromArray(combined)
        out.CopyInformation(self.organs)
        return out

    def summary(self) -> dict:
        """JSON-ready description: seed, grids, patient, lesions."""

        def grid(img):
            return {"size": list(img.GetSize()), "spacing": list(img.GetSpacing()), "origin": list(img.GetOrigin()),
                    "direction": list(img.GetDirection())}

        return {"seed": self.seed, "ct_grid": grid(self.ct), "pet_grid": grid(self.pet), "patient": dict(self.patient),
                "lesions": [dataclasses.asdict(les) for les in self.lesion_list]}


# Body outline along z (body frame mm): half width (left-right) and half depth (anterior-posterior).
_OUTLINE_Z = np.array([-200, 0, 120, 250, 400, 550, 720, 770, 800, 850, 880, 960, 1060, 1100])
_OUTLINE_A = np.array([165, 175, 172, 160, 165, 175, 190, 150, 60, 58, 70, 75, 60, 1])
_OUTLINE_B = np.array([110, 115, 112, 112, 118, 122, 115, 90, 60, 60, 85, 95, 75, 1])
_SCAN_TOP = 1090.0
_SCAN_BOTTOM = -150.0


class _Canvas:
    """Coordinates of the CT voxels in the body frame, and shapes evaluated inside their bounding box only."""

    def __init__(self, x: np.ndarray, y: np.ndarray, z: np.ndarray):
        self.x, self.y, self.z = x, y, z
        self.shape = (len(z), len(y), len(x))

    @staticmethod
    def _range(axis: np.ndarray, lo: float, hi: float) -> slice | None:
        i0, i1 = np.searchsorted(axis, lo, "left"), np.searchsorted(axis, hi, "right")
        return slice(int(i0), int(i1)) if i1 > i0 else None

    def block(self, lo, hi):
        """Index slices (z, y, x) of the voxels inside the box lo..hi (x, y, z mm) and their coordinates."""
        sx, sy, sz = (self._range(a, l, h) for a, l, h in zip((self.x, self.y, self.z), lo, hi))
        if sx is None or sy is None or sz is None:
            return None
        return (sz, sy, sx), (self.x[sx][None, None, :], self.y[sy][None, :, None], self.z[sz][:, None, None])

    def ellipsoid(self, center, radii, angle: float = 0.0):
        """(slices, mask) of an ellipsoid with radii (x, y, z) rotated by ``angle`` about z; None if out of view."""
        reach = max(radii[0], radii[1]) if angle else None
        half = (reach, reach, radii[2]) if reach else radii
        found = self.block([c - h for c, h in zip(center, half)], [c + h for c, h in zip(center, half)])
        if found is None:
            return None
        sl, (x, y, z) = found
        dx, dy, dz = x - center[0], y - center[1], z - center[2]
        if angle:
            ca, sa = math.cos(angle), math.sin(angle)
            dx, dy = ca * dx + sa * dy, -sa * dx + ca * dy
        mask = (dx / radii[0]) ** 2 + (dy / radii[1]) ** 2 + (dz / radii[2]) ** 2 <= 1.0
        return (sl, mask) if mask.any() else None

    def cylinder(self, cx, cy, a, b, z0, z1):
        """(slices, mask) of an elliptic cylinder along z from z0 to z1."""
        found = self.block([cx - a, cy - b, z0], [cx + a, cy + b, z1])
        if found is None:
            return None
        sl, (x, y, z) = found
        mask = ((x - cx) / a) ** 2 + ((y - cy) / b) ** 2 <= 1.0
        mask = np.broadcast_to(mask, (z.shape[0],) + mask.shape[1:])
        return (sl, mask) if mask.any() else None


class _Painter:
    """Writes HU, SUV and label values into the three CT-grid volumes where a shape's mask is set."""

    def __init__(self, shape):
        self.ct = np.full(shape, -1000.0, np.float32)
        self.pet = np.zeros(shape, np.float32)
        self.organ = np.zeros(shape, np.uint8)

    def paint(self, shape, hu=None, suv=None, label=None, only=None, within=None):
        if shape is None:
            return
        sl, mask = shape
        if within is not None:  # keep organs inside the body cavity (no lung in the neck)
            mask = mask & within[sl]
        if only is not None:  # restrict to voxels whose organ label is in ``only``
            mask = mask & np.isin(self.organ[sl], only)
        if hu is not None:
            self.ct[sl][mask] = hu
        if suv is not None:
            self.pet[sl][mask] = suv
        if label is not None:
            self.organ[sl][mask] = label


@dataclass(frozen=True)
class Variety:
    """The ranges a phantom's random draws come from (``make_phantom(variety=...)``).

    ``standard`` is the generator as it has always been (same seed, same phantom). ``wide`` widens every range so
    that a model trained on it learns anatomy and contrast rather than one generator's habits: body size and
    shape, organ sizes and positions (also sideways), HU and SUV levels, CT and PET noise, in-plane spacing
    0.7-4 mm and slice thickness 1-5 mm with the matrix following the field of view (``shape`` is then the
    largest matrix; a fine spacing sees part of the body), 0-12 lesions of 4-45 mm, down to SUV 1.8 and 1.4x
    their background.
    """

    name: str
    width: tuple = (0.82, 1.15)
    depth: tuple = (0.8, 1.3)
    organ_scale: tuple = (0.85, 1.15)
    spacing_xy: tuple | None = None      # (lo, hi) mm, drawn log-uniformly; None: from the field of view
    slice_mm: tuple | None = None        # (lo, hi) mm; None: 0.6-1.5 x the in-plane spacing
    length_mm: tuple = (150.0, 650.0)    # scan length when the matrix follows the spacing (wide)
    fov_margin: tuple = (1.12, 1.45)     # in-plane field of view / body width
    position_jitter: float = 1.0         # multiplies the organs' z jitter (mm)
    organ_shift_mm: float = 0.0          # extra sideways/antero-posterior organ shifts (wide only)
    hu_lung: tuple = (-880, -780)
    hu_fat: tuple = (-115, -80)
    suv_liver: tuple = (1.5, 2.8)
    ct_noise_hu: tuple = (8, 35)
    pet_counts: tuple = (40, 250)
    lesions: tuple = (1, 9)              # integers(lo, hi): 1-8
    lesion_mm: tuple = (8.0, 40.0)       # log-uniform; lung nodules from lesion_mm_lung
    lesion_mm_lung: float = 6.0
    node_mm: tuple = (5.0, 24.0)
    lesion_contrast: tuple = (2.0, 6.0)  # x host background
    lesion_suv_min: float = 2.5


VARIETIES = {
    "standard": Variety("standard"),
    "wide": Variety("wide", width=(0.7, 1.35), depth=(0.65, 1.5), organ_scale=(0.7, 1.35), spacing_xy=(0.7, 4.0),
                    slice_mm=(1.0, 5.0), fov_margin=(1.0, 1.5), position_jitter=2.5, organ_shift_mm=20.0,
                    hu_lung=(-920, -700), hu_fat=(-130, -60), suv_liver=(1.0, 3.5), ct_noise_hu=(5, 60),
                    pet_counts=(15, 400), lesions=(0, 13), lesion_mm=(4.0, 45.0), lesion_mm_lung=4.0,
                    node_mm=(4.0, 30.0), lesion_contrast=(1.4, 8.0), lesion_suv_min=1.8),
}


def _rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    angles = np.deg2rad(rng.uniform(-max_deg, max_deg, 3))
    cx, sx, cy, sy, cz, sz = (f(a) for a in angles for f in (np.cos, np.sin))
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _grid_image(array: np.ndarray, spacing, origin, direction) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(o) for o in origin])
    image.SetDirection([float(d) for d in np.asarray(direction).ravel()])
    return image


@dataclass
class _Build:
    """What the stages of :func:`make_phantom` share, in the order of the seed's random draws.

    The habitus and the CT grid (body frame) are set first; each later stage adds the few tissue levels that a
    following stage needs (a lesion's contrast is relative to its host's uptake, the skull reuses the cortex HU).
    """

    rng: np.random.Generator
    variety: Variety
    width_scale: float
    depth_scale: float
    organ_scale: float
    nx: int
    ny: int
    nz: int
    sx: float
    sy: float
    sz: float
    z_start: float
    body_dx: float
    body_dy: float
    canvas: _Canvas
    paint: _Painter
    # body outline (_paint_body_outline)
    a_z: np.ndarray | None = None  # half width and half depth of the outline at each slice
    b_z: np.ndarray | None = None
    small: np.ndarray | None = None  # < 1 in the neck and head: thinner fat and muscle
    body: np.ndarray | None = None
    cavity: np.ndarray | None = None
    fat_mm: float = 0.0
    hu_fat: float = 0.0
    suv_fat: float = 0.0
    suv_soft: float = 0.0
    # organs and bones, the backgrounds of the lesions
    suv_lung: float = 0.0
    contrast: bool = False
    suv_liver: float = 0.0
    hu_liver: float = 0.0
    hu_cortex: float = 0.0
    suv_marrow: float = 0.0

    @property
    def thorax_a(self) -> float:
        return 175 * self.width_scale

    @property
    def thorax_b(self) -> float:
        return 120 * self.depth_scale

    @property
    def spine_y(self) -> float:
        return 0.48 * 112 * self.depth_scale

    def side(self) -> float:
        """A head-foot jitter of an organ's position, -1..1 times the variety's ``position_jitter``."""
        return self.rng.uniform(-1, 1) * self.variety.position_jitter

    def shift(self, c):
        """``c`` moved sideways and front to back (wide variety only; no draw otherwise)."""
        if not self.variety.organ_shift_mm:
            return c
        dx, dy = self.rng.uniform(-1, 1, 2) * self.variety.organ_shift_mm
        return (c[0] + dx, c[1] + dy, c[2])


@dataclass
class _Grids:
    """Physical geometry of the CT grid and of the PET grid (LPS mm, direction matrices)."""

    ct_spacing: np.ndarray
    ct_origin: np.ndarray
    ct_dir: np.ndarray
    pet_spacing: np.ndarray
    pet_size: np.ndarray
    pet_origin: np.ndarray
    pet_dir: np.ndarray


def _draw_habitus_and_ct_grid(rng: np.random.Generator, W: Variety, shape, spacing) -> _Build:
    """Body size and organ scale, then the CT spacing, matrix and scan range in the body frame."""
    nz, ny, nx = (int(s) for s in shape)
    width_scale, depth_scale = rng.uniform(*W.width), rng.uniform(*W.depth)
    organ_scale = rng.uniform(*W.organ_scale)
    if spacing is None and W.spacing_xy is not None:
        # the spacing is drawn and the matrix follows the field of view (at most ``shape``)
        sx = float(np.exp(rng.uniform(np.log(W.spacing_xy[0]), np.log(W.spacing_xy[1]))))
        sz = float(rng.uniform(*W.slice_mm))
        nx = ny = int(np.clip(round(2 * 175 * width_scale * rng.uniform(*W.fov_margin) / sx), 8, nx))
        nz = int(np.clip(round(rng.uniform(*W.length_mm) / sz), 8, nz))
        spacing = (sx, sx, sz)
    elif spacing is None:
        sx = 2 * 175 * width_scale * rng.uniform(*W.fov_margin) / nx
        sz = float(np.clip(rng.uniform(0.6, 1.5) * sx, 1.0, 5.0))
        spacing = (sx, sx, sz)
    sx, sy, sz = (float(s) for s in spacing)
    length = nz * sz
    top = max(_SCAN_BOTTOM + length, _SCAN_TOP)
    # most scans are of the trunk (window centre between pelvis and shoulders); some reach the head
    z_start = float(np.clip(rng.uniform(80, 760) - length / 2, _SCAN_BOTTOM, max(_SCAN_BOTTOM, top - length)))
    body_dx, body_dy = rng.uniform(-0.05, 0.05) * nx * sx, rng.uniform(-0.02, 0.1) * ny * sy
    x = ((np.arange(nx) - (nx - 1) / 2) * sx - body_dx).astype(np.float32)
    y = ((np.arange(ny) - (ny - 1) / 2) * sy - body_dy).astype(np.float32)
    z = (z_start + np.arange(nz) * sz).astype(np.float32)
    canvas = _Canvas(x, y, z)
    return _Build(rng=rng, variety=W, width_scale=width_scale, depth_scale=depth_scale, organ_scale=organ_scale,
                  nx=nx, ny=ny, nz=nz, sx=sx, sy=sy, sz=sz, z_start=z_start, body_dx=body_dx, body_dy=body_dy,
                  canvas=canvas, paint=_Painter(canvas.shape))


def _paint_body_outline(b: _Build) -> None:
    """Skin, subcutaneous fat, muscle and the body cavity, nested outlines whose size changes along z."""
    rng, W, paint = b.rng, b.variety, b.paint
    x, y, z = b.canvas.x, b.canvas.y, b.canvas.z
    a_z = (np.interp(z, _OUTLINE_Z, _OUTLINE_A) * b.width_scale).astype(np.float32)[:, None, None]
    b_z = (np.interp(z, _OUTLINE_Z, _OUTLINE_B) * b.depth_scale).astype(np.float32)[:, None, None]
    xx, yy = x[None, None, :], y[None, :, None]
    small = np.clip(np.minimum(a_z, b_z) / 110.0, 0.3, 1.0)  # neck and head: thin fat and muscle

    def inside(shrink):
        a, b = np.maximum(a_z - shrink, 1.0), np.maximum(b_z - shrink, 1.0)
        return (xx / a) ** 2 + (yy / b) ** 2 <= 1.0

    fat_mm = rng.uniform(6, 30) * b.depth_scale
    muscle_mm = rng.uniform(10, 22)
    body = inside(0.0)
    hu_fat, hu_muscle, hu_soft = rng.uniform(*W.hu_fat), rng.uniform(35, 60), rng.uniform(20, 45)
    suv_fat, suv_muscle, suv_soft = rng.uniform(0.15, 0.35), rng.uniform(0.5, 1.1), rng.uniform(0.5, 0.9)
    paint.ct[body] = 10.0  # skin
    paint.pet[body] = suv_muscle
    under_skin = inside(2.5)
    paint.ct[under_skin], paint.pet[under_skin] = hu_fat, suv_fat
    muscle = inside(2.5 + fat_mm * small)
    paint.ct[muscle], paint.pet[muscle] = hu_muscle, suv_muscle
    cavity = inside(2.5 + (fat_mm + muscle_mm) * small)
    paint.ct[cavity], paint.pet[cavity] = hu_soft, suv_soft
    b.a_z, b.b_z, b.small, b.body, b.cavity = a_z, b_z, small, body, cavity
    b.fat_mm, b.hu_fat, b.suv_fat, b.suv_soft = fat_mm, hu_fat, suv_fat, suv_soft


def _paint_abdomen_and_table(b: _Build) -> None:
    """Mesenteric fat, bowel with gas and physiological uptake; air outside the body; the CT table under it."""
    rng, paint, canvas = b.rng, b.paint, b.canvas
    for _ in range(rng.integers(6, 14)):
        c = (rng.uniform(-90, 90) * b.width_scale, rng.uniform(-70, 30) * b.depth_scale, rng.uniform(90, 380))
        r = rng.uniform(12, 30, 3)
        kind = rng.random()
        if kind < 0.35:
            paint.paint(canvas.ellipsoid(c, r, rng.uniform(0, 3)), hu=b.hu_fat, suv=b.suv_fat)
        elif kind < 0.65:
            paint.paint(canvas.ellipsoid(c, r * 0.6, rng.uniform(0, 3)), hu=rng.uniform(-950, -600), suv=0.05)
        else:
            paint.paint(canvas.ellipsoid(c, r, rng.uniform(0, 3)), hu=rng.uniform(10, 60),
                        suv=rng.uniform(1.0, 4.0) if rng.random() < 0.6 else b.suv_soft)
    paint.ct[~b.body] = -1000.0
    paint.pet[~b.body] = 0.0
    # CT table under the patient (carbon fibre); PET does not see it
    table_y = float(np.interp(300, _OUTLINE_Z, _OUTLINE_B) * b.depth_scale) + rng.uniform(3, 15)
    found = canvas.block([-230, table_y, -1e4], [230, table_y + 8, 1e4])
    if found is not None:
        sl = found[0]
        paint.ct[sl][~b.body[sl]] = rng.uniform(150, 400)


def _paint_lungs(b: _Build) -> None:
    """Both lungs and the pulmonary vessels in them (before the organs that push into the lungs)."""
    rng, paint, canvas, V = b.rng, b.paint, b.canvas, LABEL_VALUES
    thorax_a, thorax_b, s = b.thorax_a, b.thorax_b, b.organ_scale
    hu_lung, suv_lung = rng.uniform(*b.variety.hu_lung), rng.uniform(0.3, 0.6)
    lung_z = 640 + 15 * b.side()
    for sign in (-1, 1):
        c = (sign * 0.48 * thorax_a, 0.08 * thorax_b, lung_z + (10 if sign < 0 else 0))
        r = (0.42 * thorax_a, 0.72 * thorax_b, 130 * s)
        paint.paint(canvas.ellipsoid(c, r, sign * rng.uniform(0, 0.15)), hu=hu_lung, suv=suv_lung, label=V["lung"],
                    within=b.cavity)
    # pulmonary vessels: small dense tubes in the lungs
    for _ in range(rng.integers(10, 25)):
        c = (rng.uniform(-0.7, 0.7) * thorax_a, rng.uniform(-0.4, 0.6) * thorax_b, lung_z + rng.uniform(-110, 110))
        paint.paint(canvas.ellipsoid(c, (rng.uniform(2, 4), rng.uniform(2, 4), rng.uniform(10, 30)), rng.uniform(0, 3)),
                    hu=rng.uniform(20, 60), suv=rng.uniform(0.8, 1.6), only=[V["lung"]])
    b.suv_lung = suv_lung


def _paint_abdominal_organs(b: _Build) -> None:
    """Contrast phase; liver with its left lobe, spleen, kidneys with a hot renal pelvis, urinary bladder."""
    rng, paint, canvas, V = b.rng, b.paint, b.canvas, LABEL_VALUES
    thorax_a, thorax_b, s, side, shift, cavity = b.thorax_a, b.thorax_b, b.organ_scale, b.side, b.shift, b.cavity
    contrast = rng.random() < 0.5  # portal-venous contrast phase brightens liver, spleen, kidneys, vessels
    liver_suv = rng.uniform(*b.variety.suv_liver)
    hu_liver = rng.uniform(85, 120) if contrast else rng.uniform(45, 65)
    liver_z = 470 + 20 * side()
    liver = dict(hu=hu_liver, suv=liver_suv, label=V["liver"])
    ldx, ldy, _ = shift((0.0, 0.0, 0.0))
    paint.paint(canvas.ellipsoid((-0.45 * thorax_a + ldx, -0.02 * thorax_b + ldy, liver_z), (95 * s, 82 * s, 90 * s),
                                 rng.uniform(-0.25, 0.25)), **liver, within=cavity)
    paint.paint(canvas.ellipsoid((-0.05 * thorax_a + ldx, -0.35 * thorax_b + ldy, liver_z + 20), (60 * s, 40 * s, 50 * s),
                                 rng.uniform(-0.3, 0.3)), **liver, within=cavity)
    paint.paint(canvas.ellipsoid(shift((0.6 * thorax_a, 0.3 * thorax_b, liver_z - 10 + 15 * side())),
                                 (35 * s, 55 * s * rng.uniform(0.8, 1.3), 55 * s), rng.uniform(-0.6, 0.0)),
                hu=hu_liver - rng.uniform(0, 15), suv=liver_suv * rng.uniform(0.75, 0.95), label=V["spleen"], within=cavity)
    kidney_z = 320 + 20 * side()
    for sign in (-1, 1):
        c = shift((sign * 0.42 * thorax_a, 0.5 * thorax_b, kidney_z + (12 if sign > 0 else -5)))
        r = (30 * s, 25 * s, 55 * s)
        tilt = sign * rng.uniform(0.2, 0.5)
        paint.paint(canvas.ellipsoid(c, r, tilt), hu=rng.uniform(150, 200) if contrast else rng.uniform(30, 40),
                    suv=rng.uniform(2.5, 8.0), label=V["kidney"], within=cavity)
        paint.paint(canvas.ellipsoid((c[0] - sign * 8, c[1] - 4, c[2]), (10 * s, 9 * s, 25 * s), tilt),
                    hu=rng.uniform(5, 20), suv=rng.uniform(5, 30), label=V["kidney"])  # renal pelvis, urine
    bladder_r = np.array([45, 35, 40]) * rng.uniform(0.6, 1.3)
    paint.paint(canvas.ellipsoid(shift((0, -0.25 * 112 * b.depth_scale, 70 + 10 * side())), bladder_r),
                hu=rng.uniform(0, 15), suv=rng.uniform(5, 60), label=V["urinary_bladder"], within=cavity)
    b.contrast, b.suv_liver, b.hu_liver = contrast, liver_suv, hu_liver


def _paint_heart_and_vessels(b: _Build) -> None:
    """Heart (myocardium around a blood pool), aorta and inferior vena cava; contrast brightens the blood."""
    rng, paint, canvas, V = b.rng, b.paint, b.canvas, LABEL_VALUES
    thorax_a, thorax_b, spine_y, cavity = b.thorax_a, b.thorax_b, b.spine_y, b.cavity
    blood_suv = rng.uniform(1.3, 2.3)
    hu_blood = rng.uniform(120, 250) if b.contrast else rng.uniform(35, 50)
    heart_c = b.shift((0.18 * thorax_a, -0.3 * thorax_b, 610 + 20 * b.side()))
    heart_r = np.array([62, 50, 58]) * b.organ_scale
    heart_angle = rng.uniform(0.3, 0.8)
    paint.paint(canvas.ellipsoid(heart_c, heart_r, heart_angle), hu=rng.uniform(35, 50), suv=rng.uniform(1.0, 15.0),
                label=V["heart"], within=cavity)
    paint.paint(canvas.ellipsoid(heart_c, heart_r * 0.68, heart_angle), hu=hu_blood, suv=blood_suv, within=cavity)
    aorta_r = rng.uniform(10, 14)
    paint.paint(canvas.cylinder(0.1 * thorax_a, spine_y - 35, aorta_r, aorta_r, 180, 650), hu=hu_blood, suv=blood_suv)
    paint.paint(canvas.cylinder(-0.12 * thorax_a, spine_y - 30, aorta_r * 1.1, aorta_r * 0.9, 180, 520),
                hu=hu_blood * 0.9, suv=blood_suv)  # inferior vena cava


def _paint_skeleton(b: _Build) -> None:
    """Vertebrae with discs and posterior arches, sloping ribs, sternum, iliac wings, femora, sacrum."""
    rng, paint, canvas = b.rng, b.paint, b.canvas
    bone, depth_scale, thorax_a, s = LABEL_VALUES["bone"], b.depth_scale, b.thorax_a, b.organ_scale
    hu_cortex, hu_marrow = rng.uniform(700, 1200), rng.uniform(150, 300)
    suv_marrow = rng.uniform(0.9, 2.0)
    vb_r = rng.uniform(16, 22)
    pitch, disc = rng.uniform(26, 34), rng.uniform(5, 8)
    z_level = -40.0
    while z_level < 840:
        zb = z_level + pitch - disc
        spine_y = 0.45 * float(np.interp(z_level + pitch / 2, _OUTLINE_Z, _OUTLINE_B)) * depth_scale
        paint.paint(canvas.cylinder(0, spine_y, vb_r, vb_r * 0.85, z_level, zb), hu=hu_cortex, suv=0.4, label=bone)
        paint.paint(canvas.cylinder(0, spine_y, vb_r - 2.5, vb_r * 0.85 - 2.5, z_level + 2, zb - 2), hu=hu_marrow,
                    suv=suv_marrow, label=bone)
        paint.paint(canvas.cylinder(0, spine_y + vb_r + 8, 14, 12, z_level + 2, zb), hu=hu_cortex * 0.7, suv=0.4,
                    label=bone)  # posterior arch
        paint.paint(canvas.cylinder(0, spine_y + vb_r + 8, 7, 6, z_level, z_level + pitch), hu=15, suv=0.3,
                    label=0)  # spinal canal
        paint.paint(canvas.cylinder(0, spine_y + vb_r + 28, 4, 11, z_level + 4, zb - 4), hu=hu_cortex * 0.8,
                    suv=0.4, label=bone)  # spinous process
        paint.paint(canvas.cylinder(0, spine_y, vb_r, vb_r * 0.85, zb, z_level + pitch), hu=rng.uniform(70, 100),
                    suv=0.5, label=0)  # disc
        z_level += pitch
    # ribs: sloping arcs in an annulus inside the chest wall, posterior and anterior gaps
    found = canvas.block([-1e4, -1e4, 420], [1e4, 1e4, 780])
    if found is not None:
        sl, (bx, by, bz) = found
        a_in = b.a_z[sl[0]] - (b.fat_mm + 6) * b.small[sl[0]]
        b_in = b.b_z[sl[0]] - (b.fat_mm + 6) * b.small[sl[0]]
        rad = np.sqrt((bx / a_in) ** 2 + (by / b_in) ** 2)
        theta = np.arctan2(bx, -by)  # 0 anterior, +-pi posterior
        rib_pitch, rib_thick = rng.uniform(24, 32), rng.uniform(7, 10)
        phase = (bz + 25 * np.cos(theta) - rng.uniform(0, rib_pitch)) % rib_pitch
        rib = (rad > 0.93) & (rad < 0.93 + 9.0 / a_in) & (phase < rib_thick)
        rib &= (np.abs(theta) > 0.25) & (np.abs(theta) < math.pi - 0.3)
        paint.paint((sl, rib), hu=hu_cortex * 0.8, suv=0.5, label=bone)
    paint.paint(canvas.cylinder(0, -0.92 * 120 * depth_scale + 10, 18, 6, 500, 700), hu=hu_cortex * 0.7, suv=0.6,
                label=bone)  # sternum
    # pelvis: iliac wings (shell + marrow), sacrum, femoral heads and shafts
    for sign in (-1, 1):
        c = (sign * 0.55 * thorax_a, 0.25 * 112 * depth_scale, 170)
        r = np.array([22, 62, 70]) * s
        ang = sign * rng.uniform(0.5, 0.8)
        paint.paint(canvas.ellipsoid(c, r, ang), hu=hu_cortex, suv=0.4, label=bone)
        paint.paint(canvas.ellipsoid(c, r - 4, ang), hu=hu_marrow, suv=suv_marrow, label=bone)
        fh = (sign * 0.53 * thorax_a, 0.0, 35)
        paint.paint(canvas.ellipsoid(fh, (24, 24, 24)), hu=hu_cortex * 0.8, suv=0.5, label=bone)
        paint.paint(canvas.ellipsoid(fh, (19, 19, 19)), hu=hu_marrow, suv=suv_marrow, label=bone)
        paint.paint(canvas.cylinder(sign * 0.6 * thorax_a, 5, 15, 15, -400, 20), hu=hu_cortex, suv=0.4, label=bone)
        paint.paint(canvas.cylinder(sign * 0.6 * thorax_a, 5, 9, 9, -400, 20), hu=hu_marrow * 0.3, suv=0.6,
                    label=bone)
    paint.paint(canvas.ellipsoid((0, 0.75 * 112 * depth_scale, 150), (42, 18, 60), 0), hu=hu_cortex * 0.8, suv=0.6,
                label=bone)  # sacrum
    b.hu_cortex, b.suv_marrow = hu_cortex, suv_marrow


def _paint_head(b: _Build) -> None:
    """Skull, grey matter and white matter."""
    rng, paint, canvas, V = b.rng, b.paint, b.canvas, LABEL_VALUES
    head_c = (0, -5, 965 + 10 * b.side())
    head_r = np.array([70, 88, 92]) * rng.uniform(0.92, 1.08)
    paint.paint(canvas.ellipsoid(head_c, head_r), hu=b.hu_cortex * 1.2, suv=0.4, label=V["bone"])
    brain_suv = rng.uniform(5.0, 12.0)
    paint.paint(canvas.ellipsoid(head_c, head_r - 7), hu=rng.uniform(28, 40), suv=brain_suv, label=V["brain"])
    paint.paint(canvas.ellipsoid((0, 0, head_c[2] + 5), (head_r - 7) * 0.6), hu=rng.uniform(22, 30),
                suv=brain_suv * rng.uniform(0.45, 0.65), label=V["brain"])  # white matter


def _paint_lesions(b: _Build, n_lesions: int | None) -> tuple[np.ndarray, list[tuple]]:
    """Lesions of 1-4 overlapping spheres in their host (lung, liver, node station, soft tissue, bone).

    Returns the lesion-id volume (CT grid) and one ``(kind, center, diameter, suv, hu, necrotic)`` per lesion.
    """
    rng, W, paint, canvas, V = b.rng, b.variety, b.paint, b.canvas, LABEL_VALUES
    x, y, z = canvas.x, canvas.y, canvas.z
    thorax_a, thorax_b, spine_y, body, cavity = b.thorax_a, b.thorax_b, b.spine_y, b.body, b.cavity
    lesion_ids = np.zeros(canvas.shape, np.uint16)
    lesions: list[tuple[str, tuple, float, float, float, bool]] = []
    n_wanted = int(rng.integers(*W.lesions)) if n_lesions is None else int(n_lesions)
    node_stations = [  # (x, y, z) body mm: mediastinal, hilar, axillary, para-aortic, iliac, inguinal, cervical
        (0.12 * thorax_a, -0.05 * thorax_b, 630), (-0.1 * thorax_a, -0.1 * thorax_b, 600),
        (0.3 * thorax_a, 0.05 * thorax_b, 640), (-0.3 * thorax_a, 0.05 * thorax_b, 640),
        (0.75 * thorax_a, 0.0, 720), (-0.75 * thorax_a, 0.0, 720),
        (0.2 * thorax_a, spine_y - 40, 320), (-0.2 * thorax_a, spine_y - 40, 280),
        (0.35 * thorax_a, 0.0, 150), (-0.35 * thorax_a, 0.0, 150),
        (0.45 * thorax_a, -60, 10), (-0.45 * thorax_a, -60, 10),
        (30, 0, 820), (-30, 0, 820),
    ]
    organ_vol = paint.organ
    hosts = {"lung": V["lung"], "liver": V["liver"], "bone": V["bone"]}
    for _ in range(n_wanted * 4):
        if len(lesions) >= n_wanted:
            break
        kind = rng.choice(["lung", "liver", "node", "node", "soft_tissue", "bone"])
        if kind == "node":
            st = node_stations[rng.integers(len(node_stations))]
            center = (st[0] + rng.uniform(-12, 12), st[1] + rng.uniform(-12, 12), st[2] + rng.uniform(-15, 15))
            diameter = rng.uniform(*W.node_mm)
        else:
            if kind == "soft_tissue":
                candidates = np.flatnonzero((organ_vol.ravel()[::7] == 0) & cavity.ravel()[::7]) * 7
            else:
                candidates = np.flatnonzero(organ_vol.ravel()[::7] == hosts[kind]) * 7
            if candidates.size == 0:
                continue
            k, j, i = np.unravel_index(candidates[rng.integers(candidates.size)], canvas.shape)
            center = (float(x[i]), float(y[j]), float(z[k]))
            diameter = float(np.exp(rng.uniform(np.log(W.lesion_mm_lung if kind == "lung" else W.lesion_mm[0]),
                                                np.log(W.lesion_mm[1]))))
        if not (z[0] - diameter / 2 <= center[2] <= z[-1] + diameter / 2):
            continue
        host_bg = {"lung": b.suv_lung, "liver": b.suv_liver, "bone": b.suv_marrow}.get(kind, b.suv_soft)
        suv = float(np.clip(max(host_bg * rng.uniform(*W.lesion_contrast), rng.uniform(W.lesion_suv_min, 4.5)),
                            W.lesion_suv_min, 25.0))
        hu = {"lung": rng.uniform(10, 50), "liver": b.hu_liver - rng.uniform(25, 60), "node": rng.uniform(25, 50),
              "soft_tissue": rng.uniform(25, 55), "bone": rng.choice([rng.uniform(30, 80), rng.uniform(500, 900)])}[kind]
        r0 = diameter / 2
        parts = [(center, r0)]
        for _ in range(rng.integers(0, 4)):
            direction = rng.normal(size=3)
            direction /= np.linalg.norm(direction)
            parts.append((tuple(np.asarray(center) + direction * r0 * rng.uniform(0.2, 0.55)), r0 * rng.uniform(0.4, 0.8)))
        ident = len(lesions) + 1
        painted = False
        for c, r in parts:
            shape_ = canvas.ellipsoid(c, (r * rng.uniform(0.85, 1.15), r * rng.uniform(0.85, 1.15), r * rng.uniform(0.8, 1.2)),
                                      rng.uniform(0, 3))
            if shape_ is None:
                continue
            sl, mask = shape_
            mask = mask & body[sl]
            if not mask.any():
                continue
            painted = True
            sub_x, sub_y, sub_z = x[sl[2]][None, None, :], y[sl[1]][:, None][None], z[sl[0]][:, None, None]
            dist2 = ((sub_x - center[0]) ** 2 + (sub_y - center[1]) ** 2 + (sub_z - center[2]) ** 2) / (r0 * r0)
            profile = suv * (1.0 - 0.3 * np.clip(dist2, 0, 1))  # hotter centre
            paint.pet[sl][mask] = profile[mask]
            paint.ct[sl][mask] = hu
            lesion_ids[sl][mask] = ident
        if not painted:
            continue
        necrotic = diameter > 25 and rng.random() < 0.4
        if necrotic:
            core = canvas.ellipsoid(center, (r0 * 0.45,) * 3)
            if core is not None:
                sl, mask = core
                mask = mask & (lesion_ids[sl] == ident)
                paint.pet[sl][mask] = suv * rng.uniform(0.15, 0.4)
                paint.ct[sl][mask] = hu - rng.uniform(10, 25)
        lesions.append((kind, center, diameter, suv, hu, necrotic))
    return lesion_ids, lesions


def _draw_grids(b: _Build, oblique: bool) -> _Grids:
    """Place the CT grid on the table (optionally tilted) and draw the PET grid: coarser, larger, shifted."""
    rng, sx, sz = b.rng, b.sx, b.sz
    ct_dir = _rotation(rng, 8.0) if oblique else np.eye(3)
    table_shift = np.array([rng.uniform(-20, 20), rng.uniform(-40, 40), rng.uniform(-1500, -300)])
    ct_size = np.array([b.nx, b.ny, b.nz])
    ct_spacing = np.array([sx, b.sy, sz])
    ct_center_body = np.array([-b.body_dx, -b.body_dy, b.z_start + (b.nz - 1) / 2 * sz])
    ct_center = table_shift + ct_dir @ ct_center_body
    ct_origin = ct_center - ct_dir @ ((ct_size - 1) / 2 * ct_spacing)

    # PET voxels are 2-6 mm, and never finer than the CT's (tiny test CTs have coarse voxels)
    pet_spacing_xy = max(float(np.clip(sx * rng.uniform(1.3, 2.2), 2.0, 6.0)), sx * rng.uniform(1.05, 1.3))
    pet_spacing_z = max(float(np.clip(sz * rng.uniform(0.9, 1.5), 2.0, 6.0)), sz * rng.uniform(1.0, 1.2))
    pet_spacing = np.array([pet_spacing_xy, pet_spacing_xy, pet_spacing_z])
    extent = ct_size * ct_spacing * np.array([rng.uniform(1.0, 1.25), rng.uniform(1.0, 1.25), 1.0])
    extent[2] += rng.uniform(20, 50)  # the PET covers the whole CT length (with the jitter below)
    pet_size = np.maximum(np.round(extent / pet_spacing).astype(int), 8)
    pet_dir = _rotation(rng, 8.0) if oblique else np.eye(3)
    pet_center = ct_center + np.array([rng.uniform(-15, 15), rng.uniform(-15, 15), rng.uniform(-8, 8)])
    pet_origin = pet_center - pet_dir @ ((pet_size - 1) / 2 * pet_spacing)
    return _Grids(ct_spacing=ct_spacing, ct_origin=ct_origin, ct_dir=ct_dir, pet_spacing=pet_spacing,
                  pet_size=pet_size, pet_origin=pet_origin, pet_dir=pet_dir)


def _ct_image(b: _Build, g: _Grids, noise: bool) -> sitk.Image:
    """The int16 HU CT, with in-plane correlated noise as filtered back-projection gives."""
    rng, ct = b.rng, b.paint.ct
    if noise:
        sigma_hu, corr = rng.uniform(*b.variety.ct_noise_hu), rng.uniform(0.6, 1.3)
        white = rng.standard_normal(ct.shape, dtype=np.float32)
        colored = ndimage.gaussian_filter(white, sigma=(0, corr, corr), mode="wrap")
        colored *= sigma_hu / max(float(colored[:: max(1, b.nz // 8)].std()), 1e-6)
        ct = ct + colored
    return _grid_image(np.clip(np.round(ct), -1024, 3071).astype(np.int16), g.ct_spacing, g.ct_origin, g.ct_dir)


def _pet_image(b: _Build, g: _Grids, noise: bool) -> tuple[sitk.Image, float]:
    """The float32 SUV PET: PSF blur on the fine grid, onto the PET grid, counting noise, post-filter.

    Returns the image and the PSF's FWHM (mm).
    """
    rng, ct_spacing, pet_spacing, nz, ny, nx = b.rng, g.ct_spacing, g.pet_spacing, b.nz, b.ny, b.nx
    # a fine CT grid is first block-averaged to about half the PET voxel size (a detector-sized box, well
    # below the PSF), so that blurring a 512x512 CT-sized activity map stays cheap
    f = np.maximum(1, np.floor(pet_spacing / (2 * ct_spacing)).astype(int))  # x, y, z
    act = b.paint.pet
    if np.any(f > 1):
        fz, fy, fx = int(f[2]), int(f[1]), int(f[0])
        cz, cy, cx = (nz // fz) * fz, (ny // fy) * fy, (nx // fx) * fx
        act = act[:cz, :cy, :cx].reshape(cz // fz, fz, cy // fy, fy, cx // fx, fx).mean(axis=(1, 3, 5), dtype=np.float32)
    act_spacing = ct_spacing * f
    activity = _grid_image(act, act_spacing, g.ct_origin + g.ct_dir @ ((f - 1) / 2 * ct_spacing), g.ct_dir)
    fwhm = rng.uniform(5.0, 7.0)
    activity = sitk.SmoothingRecursiveGaussian(activity, fwhm / (2 * math.sqrt(2 * math.log(2))))
    pet_ref = sitk.Image([int(v) for v in g.pet_size], sitk.sitkFloat32)
    pet_ref.SetSpacing([float(v) for v in pet_spacing])
    pet_ref.SetOrigin([float(v) for v in g.pet_origin])
    pet_ref.SetDirection([float(v) for v in g.pet_dir.ravel()])
    pet = sitk.Resample(activity, pet_ref, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    if noise:
        suv = np.clip(sitk.GetArrayFromImage(pet), 0, None)
        counts_per_suv = rng.uniform(*b.variety.pet_counts) * float(np.prod(pet_spacing)) / 1000.0  # per SUV per voxel
        noisy = rng.poisson(suv * counts_per_suv).astype(np.float32) / counts_per_suv
        noisy_image = sitk.GetImageFromArray(noisy)
        noisy_image.CopyInformation(pet)
        pet = sitk.SmoothingRecursiveGaussian(noisy_image, float(pet_spacing[0]) * rng.uniform(0.4, 0.7))
    return sitk.Cast(sitk.Clamp(pet, lowerBound=0.0), sitk.sitkFloat32), fwhm


def _lesion_records(b: _Build, lesions: list[tuple], ct_image: sitk.Image) -> list[Lesion]:
    """One :class:`Lesion` per painted lesion, its centre as a CT index and as an LPS point."""
    records = []
    for kind, center, diameter, suv_value, hu, necrotic in lesions:
        index = ((center[0] + b.body_dx) / b.sx + (b.nx - 1) / 2, (center[1] + b.body_dy) / b.sy + (b.ny - 1) / 2,
                 (center[2] - b.z_start) / b.sz)
        lps = ct_image.TransformContinuousIndexToPhysicalPoint([float(v) for v in index])
        records.append(Lesion(kind=str(kind), diameter_mm=round(float(diameter), 2), suv=round(float(suv_value), 3),
                              hu=round(float(hu), 1), center_lps=tuple(round(float(v), 2) for v in lps),
                              center_index=tuple(int(round(v)) for v in index), necrotic=bool(necrotic)))
    return records


def _patient_record(b: _Build, fwhm: float) -> dict:
    """What a PET DICOM header needs: weight (from the habitus), height, sex, dose, injection and uptake times."""
    rng = b.rng
    weight = float(np.clip(72 * b.width_scale * b.depth_scale * rng.uniform(0.9, 1.1), 40, 150))
    sex = str(rng.choice(["M", "F"]))
    height = float(rng.uniform(1.62, 1.95) if sex == "M" else rng.uniform(1.5, 1.82))
    dose = float(weight * rng.uniform(3.0, 4.5) * 1e6)
    injection_s = float(rng.uniform(7.5, 14.5) * 3600)
    uptake_s = float(rng.uniform(50, 80) * 60)
    return {"weight_kg": round(weight, 2), "height_m": round(height, 3), "sex": sex, "injected_dose_bq": round(dose, 1),
            "injection_seconds_of_day": round(injection_s, 1), "uptake_seconds": round(uptake_s, 1),
            "half_life_s": F18_HALF_LIFE_S, "radiopharmaceutical": "Fluorodeoxyglucose", "psf_fwhm_mm": round(fwhm, 2),
            "contrast_ct": bool(b.contrast)}


def make_phantom(
    seed: int,
    shape: tuple[int, int, int] = (64, 128, 128),
    n_lesions: int | None = None,
    oblique: bool = False,
    noise: bool = True,
    spacing: tuple[float, float, float] | None = None,
    variety: str | Variety = "standard",
) -> Phantom:
    """Build the phantom of ``seed`` with a CT of ``shape`` (z, y, x) voxels.

    ``n_lesions`` defaults to 1-8 drawn from the seed (lesions only land in organs inside the field of view).
    ``oblique`` tilts both grids by a few degrees (each its own direction). ``spacing`` (x, y, z mm) fixes the
    CT spacing; otherwise it is drawn so that the body fills the field of view. ``noise=False`` gives the
    noise-free CT and PET (the PET still blurred and resampled). ``variety`` (:class:`Variety`, or the name of one
    of :data:`VARIETIES`) sets the ranges of the draws; with ``wide`` and no ``spacing`` the spacing is drawn and
    the matrix follows the field of view, up to ``shape``.
    """
    if len(shape) != 3 or min(shape) < 8:
        raise DinomedError(f"phantom shape must be three sizes (z, y, x) of at least 8 voxels, got {tuple(shape)}")
    if isinstance(variety, str):
        if variety not in VARIETIES:
            raise DinomedError(f"phantom variety {variety!r}: expected one of {sorted(VARIETIES)}")
        variety = VARIETIES[variety]
    # the stages draw from one generator in this order; reordering them changes every seed's phantom
    b = _draw_habitus_and_ct_grid(np.random.default_rng(seed), variety, shape, spacing)
    _paint_body_outline(b)
    _paint_abdomen_and_table(b)
    _paint_lungs(b)
    _paint_abdominal_organs(b)
    _paint_heart_and_vessels(b)
    _paint_skeleton(b)
    _paint_head(b)
    lesion_ids, lesions = _paint_lesions(b, n_lesions)
    grids = _draw_grids(b, oblique)
    ct_image = _ct_image(b, grids, noise)
    pet, fwhm = _pet_image(b, grids, noise)
    on_ct = (grids.ct_spacing, grids.ct_origin, grids.ct_dir)
    return Phantom(seed=int(seed), ct=ct_image, pet=pet, organs=_grid_image(b.paint.organ, *on_ct),
                   lesions=_grid_image((lesion_ids > 0).astype(np.uint8), *on_ct),
                   lesion_ids=_grid_image(lesion_ids, *on_ct), lesion_list=_lesion_records(b, lesions, ct_image),
                   patient=_patient_record(b, fwhm))
