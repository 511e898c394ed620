"""Phantom chest X-ray trees in the exact layouts of the real datasets, tables included.

`cxr demo-data` writes them; tests, the demo and the benchmarks use them. Nothing here is real data:
the images are drawn (dark background, soft tissue, dark lungs with vessel markings, ribs,
clavicles, spine and a heart shadow) and a chosen subset of findings is drawn into the pixels, so a
small CNN can learn them at 64 px:

    Cardiomegaly                     wider heart shadow (cardiothoracic ratio ~0.6 instead of ~0.4)
    Effusion, Pleural Effusion       bright lower lung zone with a meniscus, blunted costophrenic angle
    Pneumothorax                     dark apical region without vessel markings, thin pleural line
    Nodule                           1-3 small bright round blobs in the lungs
    Mass                             one larger bright oval
    Edema                            bilateral perihilar haze
    Atelectasis                      a bright plate/band in a lower zone
    Lung Opacity, Consolidation,
    Pneumonia, Infiltration          dense blurred patch(es) in one lung
    Support Devices                  very bright tube, line and/or pacemaker box
    Enlarged Cardiomediastinum       wider upper mediastinum
    Emphysema                        taller, darker lungs
    Hernia                           round density with an air bubble behind the heart

Each source draws a fixed subset (NIH_PREVALENCE, MIMIC_PREVALENCE); every other label is always
negative (0 in NIH, blank or 0.0 in MIMIC). `phantom.json` at the tree root records the labels
drawn, n, the seed and the image size. Everything is a pure function of the arguments: the same
call writes byte-identical trees. Images are drawn at <= 512 px with OpenCV primitives and numpy
(no per-pixel Python), then enlarged with fine noise to the requested size.
"""
from __future__ import annotations

import gzip
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from manifests import __version__
from manifests.atomic import write_bytes_atomic
from manifests.errors import CxrError
from phantom import DEFAULT_SIZES, SOURCES


# Labels drawn per source, with their prevalence (per image for NIH, per study for MIMIC).
NIH_PREVALENCE: dict[str, float] = {
    "Atelectasis": 0.14, "Cardiomegaly": 0.15, "Effusion": 0.20, "Mass": 0.10, "Nodule": 0.14,
    "Pneumothorax": 0.10, "Edema": 0.12,
}
MIMIC_PREVALENCE: dict[str, float] = {
    "Atelectasis": 0.15, "Cardiomegaly": 0.18, "Edema": 0.14, "Lung Opacity": 0.20,
    "Pleural Effusion": 0.20, "Pneumothorax": 0.10, "Support Devices": 0.25,
}
# Per-study chance of an uncertain (-1.0) mention of a drawn label; its finding is drawn at half strength.
MIMIC_UNCERTAIN: dict[str, float] = {
    "Atelectasis": 0.06, "Cardiomegaly": 0.04, "Edema": 0.05, "Lung Opacity": 0.03,
    "Pleural Effusion": 0.04, "Pneumothorax": 0.02, "Support Devices": 0.01,
}
FOLDER_ABNORMAL_FRACTION = 0.4

NIH_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
              "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")
# The label columns of mimic-cxr-2.0.0-negbio/-chexpert.csv.gz in file order (= manifests.vocab.MIMIC_LABELS).
MIMIC_LABEL_COLUMNS = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
    "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
    "Pneumothorax", "Support Devices",
)
MIMIC_METADATA_COLUMNS = (
    "dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows",
    "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
    "PatientOrientationCodeSequence_CodeMeaning",
)
MIMIC_TABLES = ("metadata", "negbio", "chexpert", "split")
MIMIC_REAL_IMAGES = 377_110

# Seed-sequence tags: every random stream is named, so one image's pixels never depend on another's.
_SRC_TAG = {"nih": 1, "mimic": 2, "cardiomegaly": 3, "mimic-tables": 4}
_ANATOMY, _NOISE, _FINDING, _TABLE = 0, 1, 2, 3

_SHIFT = 4                # cv2 drawing: coordinates in 1/16 px
_ONE = 1 << _SHIFT
_CANVAS = 512             # images are drawn at most this large, then enlarged


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in keys]))


# --- drawing -----------------------------------------------------------------------------------


def _pt(x: float, y: float) -> tuple[int, int]:
    return int(round(x * _ONE)), int(round(y * _ONE))


def _axes(a: float, b: float) -> tuple[int, int]:
    return max(1, int(round(a * _ONE))), max(1, int(round(b * _ONE)))


@dataclass
class _Lung:
    cx: float          # centre, canvas px
    cy: float
    a: float           # half width, half height
    b: float
    lateral: int       # +1: the lateral side is towards larger x, -1 towards smaller x
    mask: np.ndarray = field(repr=False, default=None)  # uint8 0/255 filled outline
    alpha: np.ndarray = field(repr=False, default=None)  # float32 0..1, soft


class _Canvas:
    """A float32 image being drawn, with the geometry of one phantom chest."""

    def __init__(self, height: int, width: int, rng: np.random.Generator) -> None:
        self.h, self.w = height, width
        self.u = float(min(height, width))
        self.img = np.zeros((height, width), np.float32)
        self.yy, self.xx = np.mgrid[0:height, 0:width].astype(np.float32)
        self.rng = rng
        self.body_alpha = np.zeros((height, width), np.float32)  # set when the body is drawn

    def mask(self) -> np.ndarray:
        return np.zeros((self.h, self.w), np.uint8)

    def soft(self, mask: np.ndarray, sigma_u: float) -> np.ndarray:
        """uint8 mask -> float32 alpha 0..1, blurred by sigma_u * u (bit-exact 8-bit Gaussian)."""
        sigma = max(0.5, sigma_u * self.u)
        return cv2.GaussianBlur(mask, (0, 0), sigma).astype(np.float32) * (1.0 / 255.0)

    def set(self, alpha: np.ndarray, value: float) -> None:
        self.img += alpha * (np.float32(value) - self.img)

    def add(self, alpha: np.ndarray, amount: float) -> None:
        self.img += alpha * np.float32(amount)

    def ellipse(self, mask, cx, cy, a, b, angle=0.0, start=0.0, end=360.0, thickness=-1) -> np.ndarray:
        cv2.ellipse(mask, _pt(cx, cy), _axes(a, b), float(angle), float(start), float(end), 255,
                    thickness, cv2.LINE_AA, _SHIFT)
        return mask

    def line(self, mask, p, q, thickness: int) -> np.ndarray:
        cv2.line(mask, _pt(*p), _pt(*q), 255, max(1, int(thickness)), cv2.LINE_AA, _SHIFT)
        return mask

    def px(self, fraction_of_u: float) -> int:
        return max(1, int(round(fraction_of_u * self.u)))


@dataclass
class _Anatomy:
    scale: float
    cx: float
    cy: float
    background: float
    body: float
    lung: float
    lung_w: float
    lung_h: float
    lung_dx: float
    lung_tilt: float
    heart_w: float
    heart_h: float
    heart_val: float
    mediastinum_w: float
    rib: float
    clavicle: float
    vessels: int
    gain: float
    offset: float
    noise: float
    texture: float
    rotation: float


def _anatomy(rng: np.random.Generator, height: int, width: int) -> _Anatomy:
    u = min(height, width)
    s = float(rng.uniform(0.84, 1.06))
    body = float(rng.uniform(100, 145))
    return _Anatomy(
        scale=s,
        cx=width / 2 + float(rng.normal(0, 0.02)) * u,
        cy=height / 2 + float(rng.normal(0, 0.02)) * u,
        background=float(rng.uniform(4, 28)),
        body=body,
        lung=body - float(rng.uniform(55, 80)),
        lung_w=0.135 * s * float(rng.uniform(0.92, 1.08)),
        lung_h=0.27 * s * float(rng.uniform(0.92, 1.08)),
        lung_dx=0.185 * s * float(rng.uniform(0.96, 1.04)),
        lung_tilt=float(rng.uniform(2, 8)),
        heart_w=0.125 * s * float(rng.uniform(0.88, 1.1)),
        heart_h=0.125 * s * float(rng.uniform(0.9, 1.1)),
        heart_val=body + float(rng.uniform(4, 16)),
        mediastinum_w=0.05 * s * float(rng.uniform(0.9, 1.1)),
        rib=float(rng.uniform(10, 20)),
        clavicle=float(rng.uniform(18, 30)),
        vessels=int(rng.integers(6, 11)),
        gain=float(rng.uniform(0.88, 1.12)),
        offset=float(rng.uniform(-8, 8)),
        noise=float(rng.uniform(1.5, 4.0)),
        texture=float(rng.uniform(6, 14)),
        rotation=float(rng.uniform(-4, 4)),
    )


def _point_in(lung: _Lung, rng: np.random.Generator, rmax: float = 0.75) -> tuple[float, float]:
    """A random point inside the lung ellipse (within rmax of its radius)."""
    r = rmax * np.sqrt(rng.uniform(0, 1))
    t = rng.uniform(0, 2 * np.pi)
    return lung.cx + r * np.cos(t) * lung.a, lung.cy + r * np.sin(t) * lung.b


# Findings drawn before the heart change the anatomy; the others paint over the lungs.
def _pre_cardiomegaly(an: _Anatomy, rng, strength: float) -> None:
    big = an.scale * float(rng.uniform(0.16, 0.21))
    an.heart_w += strength * (big - an.heart_w)
    an.heart_h *= 1.0 + 0.12 * strength


def _pre_mediastinum(an: _Anatomy, rng, strength: float) -> None:
    an.mediastinum_w *= 1.0 + strength * float(rng.uniform(0.6, 0.9))


def _pre_emphysema(an: _Anatomy, rng, strength: float) -> None:
    an.lung_h *= 1.0 + 0.12 * strength
    an.lung_w *= 1.0 + 0.06 * strength
    an.lung -= 14 * strength


def _effusion(cv: _Canvas, lungs: list[_Lung], an: _Anatomy, rng, strength: float) -> None:
    picks = [lungs[int(rng.integers(len(lungs)))]] if rng.random() > 0.3 or len(lungs) == 1 else lungs
    for lung in picks:
        frac = float(rng.uniform(0.14, 0.38)) * (0.55 + 0.45 * strength)
        level = lung.cy + lung.b - 2 * frac * lung.b
        d = np.clip((cv.xx - lung.cx) * (lung.lateral / lung.a), 0, 1)
        top = level - 0.45 * frac * lung.b * d * d  # the meniscus climbs laterally
        ramp = np.clip((cv.yy - top) / (0.025 * cv.u) + 0.5, 0, 1)
        cv.set(ramp * lung.alpha, an.body + float(rng.uniform(0, 12)))


def _pneumothorax(cv: _Canvas, lungs, an, rng, strength: float) -> None:
    lung = lungs[int(rng.integers(len(lungs)))]
    k = float(rng.uniform(0.5, 1.0)) * (0.75 + 0.25 * strength)
    cx = lung.cx + lung.lateral * 0.35 * lung.a
    cy = lung.cy - 0.55 * lung.b
    a, b = 0.62 * lung.a * k, 0.55 * lung.b * k
    region = np.minimum(cv.ellipse(cv.mask(), cx, cy, a, b), lung.mask)
    alpha = cv.soft(region, 0.003)
    cv.set(alpha, min(an.background + float(rng.uniform(6, 22)), an.lung - 18))  # no lung tissue, no vessels
    edge = np.minimum(cv.ellipse(cv.mask(), cx, cy, a, b, thickness=cv.px(0.006)), lung.mask)
    cv.add(cv.soft(edge, 0.002), float(rng.uniform(25, 40)))  # the visceral pleural line


def _blobs(cv: _Canvas, lungs, rng, count: int, radius: tuple[float, float], amount: tuple[float, float],
           strength: float, aspect: float = 0.0) -> None:
    m = cv.mask()
    for _ in range(count):
        lung = lungs[int(rng.integers(len(lungs)))]
        x, y = _point_in(lung, rng, 0.7)
        r = float(rng.uniform(*radius)) * cv.u
        q = 1.0 + aspect * float(rng.uniform(-1, 1))
        cv.ellipse(m, x, y, r * q, r / q, angle=float(rng.uniform(0, 180)))
    cv.add(cv.soft(m, 0.004), float(rng.uniform(*amount)) * strength)


def _nodule(cv, lungs, an, rng, strength):
    _blobs(cv, lungs, rng, int(rng.integers(1, 4)), (0.016, 0.03), (35, 75), strength)


def _mass(cv, lungs, an, rng, strength):
    _blobs(cv, lungs, rng, 1, (0.04, 0.075), (35, 75), strength, aspect=0.3)


def _edema(cv: _Canvas, lungs, an, rng, strength) -> None:
    m = cv.mask()
    for lung in lungs:
        hx = lung.cx - lung.lateral * 0.35 * lung.a
        cv.ellipse(m, hx, lung.cy + 0.05 * lung.b, 0.85 * lung.a, 0.6 * lung.b)
    lungs_alpha = np.maximum.reduce([lung.alpha for lung in lungs]) if len(lungs) > 1 else lungs[0].alpha
    cv.add(cv.soft(m, 0.05) * lungs_alpha, float(rng.uniform(18, 40)) * strength)


def _atelectasis(cv: _Canvas, lungs, an, rng, strength) -> None:
    lung = lungs[int(rng.integers(len(lungs)))]
    m = cv.mask()
    y = lung.cy + float(rng.uniform(0.25, 0.5)) * lung.b
    tilt = float(rng.uniform(-0.12, 0.12)) * lung.b
    p = (lung.cx - 0.75 * lung.a, y - tilt)
    q = (lung.cx + 0.75 * lung.a, y + tilt)
    cv.line(m, p, q, cv.px(float(rng.uniform(0.025, 0.04))))
    cv.add(cv.soft(m, 0.006) * lung.alpha, float(rng.uniform(28, 58)) * strength)


def _opacity(cv: _Canvas, lungs, an, rng, strength) -> None:
    lung = lungs[int(rng.integers(len(lungs)))]
    m = cv.mask()
    for _ in range(int(rng.integers(1, 3))):
        x, y = _point_in(lung, rng, 0.5)
        cv.ellipse(m, x, y, float(rng.uniform(0.45, 0.75)) * lung.a, float(rng.uniform(0.25, 0.4)) * lung.b,
                   angle=float(rng.uniform(-30, 30)))
    cv.add(cv.soft(m, 0.025) * lung.alpha, float(rng.uniform(26, 55)) * strength)


def _devices(cv: _Canvas, lungs, an, rng, strength) -> None:
    u, cx, cy = cv.u, an.cx, an.cy
    parts = rng.random(3) < (0.6, 0.5, 0.4)
    if not parts.any():
        parts[int(rng.integers(3))] = True
    m = cv.mask()
    if parts[0]:  # endotracheal / nasogastric tube down the midline
        cv.line(m, (cx + 0.01 * u, 0), (cx - 0.005 * u, cy - float(rng.uniform(0.15, 0.25)) * u), cv.px(0.011))
    if parts[1]:  # central line from a shoulder towards the heart
        side = 1 if rng.random() < 0.5 else -1
        pts = [(cx + side * 0.3 * u, cy - 0.36 * u), (cx + side * 0.12 * u, cy - 0.28 * u),
               (cx + side * 0.03 * u, cy - float(rng.uniform(0.05, 0.15)) * u)]
        for p, q in zip(pts, pts[1:]):
            cv.line(m, p, q, cv.px(0.008))
    if parts[2]:  # pacemaker box with its lead
        bx, by = cx - 0.28 * u, cy - 0.3 * u
        cv2.rectangle(m, _pt(bx - 0.04 * u, by - 0.025 * u), _pt(bx + 0.04 * u, by + 0.025 * u), 255, -1,
                      cv2.LINE_AA, _SHIFT)
        cv.line(m, (bx, by), (cx + 0.05 * u, cy + 0.1 * u), cv.px(0.006))
    cv.set(cv.soft(m, 0.002) * min(1.0, 0.5 + 0.5 * strength), float(rng.uniform(225, 250)))


def _hernia(cv: _Canvas, lungs, an, rng, strength) -> None:
    x, y, r = an.cx - 0.02 * cv.u, an.cy + 0.2 * cv.u, float(rng.uniform(0.05, 0.07)) * cv.u
    cv.add(cv.soft(cv.ellipse(cv.mask(), x, y, r, 0.8 * r), 0.005), 30 * strength)
    cv.set(cv.soft(cv.ellipse(cv.mask(), x, y - 0.2 * r, 0.5 * r, 0.3 * r), 0.004) * strength, an.background + 20)


_PRE = {"Cardiomegaly": _pre_cardiomegaly, "Enlarged Cardiomediastinum": _pre_mediastinum,
        "Emphysema": _pre_emphysema}
_PNEUMOTHORAX = {"Pneumothorax": _pneumothorax}  # drawn before the bones: ribs stay visible over it
_LUNG = {"Effusion": _effusion, "Pleural Effusion": _effusion, "Edema": _edema, "Atelectasis": _atelectasis,
         "Lung Opacity": _opacity, "Consolidation": _opacity, "Pneumonia": _opacity, "Infiltration": _opacity,
         "Nodule": _nodule, "Mass": _mass, "Lung Lesion": _mass, "Hernia": _hernia}
_LAST = {"Support Devices": _devices}
DRAWABLE = tuple(sorted({*_PRE, *_PNEUMOTHORAX, *_LUNG, *_LAST}))
_FINDING_TAG = {name: i for i, name in enumerate(DRAWABLE)}


def _texture(cv: _Canvas) -> np.ndarray:
    """A smooth random field in -1..1 (a coarse uint8 grid enlarged bilinearly: bit-exact)."""
    grid = cv.rng.integers(0, 256, size=(24, 24), dtype=np.uint8)
    field = cv2.resize(grid, (cv.w, cv.h), interpolation=cv2.INTER_LINEAR)
    return field.astype(np.float32) * np.float32(2 / 255) - np.float32(1)


def _frontal(cv: _Canvas, an: _Anatomy) -> list[_Lung]:
    u, cx, cy, s = cv.u, an.cx, an.cy, an.scale
    cv.img[:] = an.background
    body = cv.ellipse(cv.mask(), cx, cy + 0.12 * u * s, 0.45 * u * s, 0.62 * u * s)
    cv.ellipse(body, cx, cy - 0.3 * u * s, 0.47 * u * s, 0.13 * u * s)  # shoulders
    cv2.rectangle(body, _pt(cx - 0.09 * u * s, 0), _pt(cx + 0.09 * u * s, cy - 0.3 * u * s), 255, -1,
                  cv2.LINE_AA, _SHIFT)  # neck
    body_alpha = cv.body_alpha = cv.soft(body, 0.01)
    cv.set(body_alpha, an.body)
    cv.add(np.clip((cv.yy - cy) / (0.6 * u), 0, 1) * body_alpha, 18)  # abdomen denser
    lungs = []
    for side in (-1, 1):
        lung = _Lung(cx + side * an.lung_dx * u, cy - 0.03 * u * s, an.lung_w * u, an.lung_h * u, side)
        lung.mask = cv.ellipse(cv.mask(), lung.cx, lung.cy, lung.a, lung.b, angle=-side * an.lung_tilt)
        lung.alpha = cv.soft(lung.mask, 0.008)
        cv.set(lung.alpha, an.lung)
        cv.add(np.clip((cv.yy - lung.cy + lung.b) / (2 * lung.b), 0, 1) * lung.alpha, 14)  # denser at the base
        lungs.append(lung)
    vessels = cv.mask()
    for lung in lungs:
        hx, hy = lung.cx - lung.lateral * 0.55 * lung.a, lung.cy + 0.05 * lung.b
        for _ in range(an.vessels):
            t = cv.rng.uniform(-1.2, 1.2) + (0 if lung.lateral > 0 else np.pi)
            length = cv.rng.uniform(0.35, 0.9)
            q = (hx + np.cos(t) * length * 1.6 * lung.a, hy + np.sin(t) * length * lung.b)
            cv.line(vessels, (hx, hy), q, cv.px(0.005))
    both = np.maximum(lungs[0].alpha, lungs[1].alpha)
    cv.add(cv.soft(vessels, 0.003) * both, 14)
    cv.add(_texture(cv) * both, an.texture)  # mottled parenchyma
    return lungs


def _mediastinum_and_heart(cv: _Canvas, an: _Anatomy) -> None:
    u, cx, cy, s = cv.u, an.cx, an.cy, an.scale
    m = cv.mask()
    cv2.rectangle(m, _pt(cx - an.mediastinum_w * u, 0), _pt(cx + an.mediastinum_w * u, cy + 0.05 * u), 255, -1,
                  cv2.LINE_AA, _SHIFT)
    cv.ellipse(m, cx + 0.04 * u * s, cy - 0.17 * u * s, 0.035 * u * s, 0.03 * u * s)  # aortic knob
    cv.set(cv.soft(m, 0.008), an.body + 22)
    cv.set(cv.soft(_heart(cv, an), 0.01), an.heart_val)


def _heart(cv: _Canvas, an: _Anatomy) -> np.ndarray:
    """uint8 0/255 mask of the heart of a frontal film (before rotation)."""
    u, s = cv.u, an.scale
    return cv.ellipse(cv.mask(), an.cx + 0.03 * u * s + 0.35 * (an.heart_w - 0.125 * s) * u, an.cy + 0.09 * u * s,
                      an.heart_w * u, an.heart_h * u, angle=-12)


def _bones(cv: _Canvas, an: _Anatomy, lungs: list[_Lung]) -> None:
    u, cx, cy, s = cv.u, an.cx, an.cy, an.scale
    ribs = cv.mask()
    for lung in lungs:
        start, end = (180, 265) if lung.lateral < 0 else (275, 360)
        for k in range(9):
            y = lung.cy - lung.b + (0.12 + k * 0.24) * lung.b
            cv.ellipse(ribs, cx + lung.lateral * 0.02 * u, y + 0.15 * u * s, 0.34 * u * s, 0.17 * u * s,
                       start=start, end=end, thickness=cv.px(0.014))
    cv.add(cv.soft(ribs, 0.003) * np.maximum(lungs[0].alpha, lungs[1].alpha), an.rib)
    spine = cv.mask()
    cv2.rectangle(spine, _pt(cx - 0.03 * u * s, 0), _pt(cx + 0.03 * u * s, cv.h), 255, -1, cv2.LINE_AA, _SHIFT)
    cv.add(cv.soft(spine, 0.006) * cv.body_alpha, 18)
    clav = cv.mask()
    for side in (-1, 1):
        cv.line(clav, (cx + side * 0.04 * u * s, cy - 0.33 * u * s), (cx + side * 0.3 * u * s, cy - 0.4 * u * s),
                cv.px(0.024))
    cv.add(cv.soft(clav, 0.004), an.clavicle)


def _lateral(cv: _Canvas, an: _Anatomy) -> list[_Lung]:
    """A lateral film: one lung field, spine behind (larger x), heart in front and low."""
    u, cx, cy, s = cv.u, an.cx, an.cy, an.scale
    cv.img[:] = an.background
    body = cv.ellipse(cv.mask(), cx, cy + 0.08 * u * s, 0.44 * u * s, 0.62 * u * s)
    body_alpha = cv.body_alpha = cv.soft(body, 0.01)
    cv.set(body_alpha, an.body)
    cv.add(np.clip((cv.yy - cy) / (0.6 * u), 0, 1) * body_alpha, 18)
    lung = _Lung(cx - 0.02 * u * s, cy - 0.04 * u * s, 0.26 * u * s, 0.3 * u * s, 1)
    lung.mask = cv.ellipse(cv.mask(), lung.cx, lung.cy, lung.a, lung.b, angle=8)
    lung.alpha = cv.soft(lung.mask, 0.01)
    cv.set(lung.alpha, an.lung + 10)
    cv.add(_texture(cv) * lung.alpha, an.texture)
    spine = cv.mask()
    for k in range(12):
        y = cy - 0.5 * u + k * 0.085 * u * s
        cv2.rectangle(spine, _pt(cx + 0.27 * u * s, y), _pt(cx + 0.36 * u * s, y + 0.065 * u * s), 255, -1,
                      cv2.LINE_AA, _SHIFT)
    cv.add(cv.soft(spine, 0.004), 40)
    heart = cv.ellipse(cv.mask(), cx - 0.1 * u * s, cy + 0.14 * u * s, (an.heart_w + 0.02 * s) * u, an.heart_h * u,
                       angle=-30)
    cv.set(cv.soft(heart, 0.012), an.heart_val - 10)
    return [lung]


def _start(height: int, width: int, findings: dict[str, float] | None, seed):
    """(findings, seed keys, canvas, anatomy after the findings that change it, finding streams)."""
    findings = {k: float(v) for k, v in (findings or {}).items() if v}
    unknown = sorted(set(findings) - set(DRAWABLE))
    if unknown:
        raise CxrError(f"phantom cannot draw {', '.join(unknown)}; it draws {', '.join(DRAWABLE)}")
    keys = tuple(seed) if isinstance(seed, (tuple, list)) else (int(seed),)
    scale = min(1.0, _CANVAS / max(height, width))
    ch, cw = max(16, round(height * scale)), max(16, round(width * scale))
    cv = _Canvas(ch, cw, _rng(*keys, _ANATOMY, 1))
    an = _anatomy(_rng(*keys, _ANATOMY), ch, cw)

    def stream(name: str) -> np.random.Generator:
        return _rng(*keys, _FINDING, _FINDING_TAG[name])

    for name, fn in _PRE.items():
        if name in findings:
            fn(an, stream(name), findings[name])
    return findings, keys, cv, an, stream


def heart_mask(height: int, width: int, findings: dict[str, float] | None = None,
               seed: int | tuple[int, ...] = 0) -> np.ndarray:
    """bool height x width: where `render_chest(height, width, findings, "PA", seed)` drew the heart."""
    _findings, _keys, cv, an, _stream = _start(height, width, findings, seed)
    mask = _heart(cv, an)
    turn = cv2.getRotationMatrix2D((cv.w / 2, cv.h / 2), an.rotation, 1.0)
    mask = cv2.warpAffine(mask, turn, (cv.w, cv.h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    if (cv.h, cv.w) != (height, width):
        mask = cv2.resize(mask, (width, height), interpolation=cv2.INTER_LINEAR)
    return mask >= 128


def folder_heart_mask(name: str, height: int, width: int, seed: int = 0, label: str = "Cardiomegaly") -> np.ndarray:
    """bool height x width: where `write_folder(..., seed, label)` drew the heart in its file `name`
    (`normal/personNNNN_IIII.png` or `abnormal/...`, as written), at the file's own size."""
    match = re.fullmatch(r"(normal|abnormal)/person\d+_(\d+)\.(png|jpg)", str(name).replace("\\", "/"))
    if match is None:
        raise CxrError(f"{name}: not a file name write_folder writes (normal|abnormal/personNNNN_IIII.png|jpg)")
    findings = {label: 1.0} if match.group(1) == "abnormal" else None
    return heart_mask(height, width, findings, (seed, _SRC_TAG["cardiomegaly"], int(match.group(2)) - 1))


def render_chest(height: int, width: int, findings: dict[str, float] | None = None, view: str = "PA",
                 seed: int | tuple[int, ...] = 0) -> np.ndarray:
    """One phantom film, uint8 height x width.

    `findings` maps drawable label names (DRAWABLE) to a strength in 0..1 (1 positive, 0.5 uncertain).
    `view` LATERAL or LL draws a lateral film, anything else a frontal one. The anatomy, each finding and
    the noise have their own random streams derived from `seed`, so the same seed with and without a
    finding gives the same patient.
    """
    findings, keys, cv, an, stream = _start(height, width, findings, seed)
    ch, cw = cv.h, cv.w
    if view.upper() in ("LATERAL", "LL"):
        lungs = _lateral(cv, an)
    else:
        lungs = _frontal(cv, an)
    for name in sorted(findings):
        if name in _PNEUMOTHORAX:
            _PNEUMOTHORAX[name](cv, lungs, an, stream(name), findings[name])
    if view.upper() not in ("LATERAL", "LL"):
        _mediastinum_and_heart(cv, an)
    for name in sorted(findings):
        if name in _LUNG:
            _LUNG[name](cv, lungs, an, stream(name), findings[name])
    if view.upper() not in ("LATERAL", "LL"):
        _bones(cv, an, lungs)
    for name in sorted(findings):
        if name in _LAST:
            _LAST[name](cv, lungs, an, stream(name), findings[name])

    noise_rng = _rng(*keys, _NOISE)
    img = np.clip(cv.img * an.gain + an.offset + 0.5, 0, 255).astype(np.uint8)
    turn = cv2.getRotationMatrix2D((cw / 2, ch / 2), an.rotation, 1.0)
    img = cv2.warpAffine(img, turn, (cw, ch), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    img = cv2.GaussianBlur(img, (0, 0), max(0.6, 0.003 * cv.u))
    grain = noise_rng.standard_normal((ch, cw), dtype=np.float32) * np.float32(an.noise)
    img = np.clip(img + grain + 0.5, 0, 255).astype(np.uint8)
    if (ch, cw) != (height, width):
        img = cv2.resize(img, (width, height), interpolation=cv2.INTER_LINEAR)
        grain = noise_rng.standard_normal((height, width), dtype=np.float32) * np.float32(1.5)
        img = np.clip(img + grain + 0.5, 0, 255).astype(np.uint8)
    return img


def _png(img: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", img, [cv2.IMWRITE_PNG_COMPRESSION, 3])
    assert ok
    return data.tobytes()


def _jpeg(img: np.ndarray, quality: int = 95) -> bytes:
    ok, data = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return data.tobytes()


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _check_args(n: int, image_size: int | None) -> None:
    if int(n) < 1:
        raise CxrError(f"--n must be at least 1, got {n}")
    if image_size is not None and int(image_size) < 16:
        raise CxrError(f"--image-size must be at least 16 pixels, got {image_size}")


def _card(source: str, n: int, seed: int, image_size: int, drawn: dict[str, float], **extra) -> dict:
    return {"generator": "cxr demo-data (phantom)", "phantom": True, "source": source, "n": int(n),
            "seed": int(seed), "image_size": int(image_size), "labels_drawn": list(drawn),
            "prevalence": {k: float(v) for k, v in drawn.items()}, "tool_version": __version__, **extra}


def _write_card(out: Path, card: dict) -> None:
    write_bytes_atomic(out / "phantom.json", (json.dumps(card, indent=2) + "\n").encode())


# --- NIH ChestX-ray14 --------------------------------------------------------------------------

_NIH_ORIGINAL = (  # OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y] as the real table prints them
    "2500,2048,0.168,0.168", "2992,2991,0.14300000000000002,0.14300000000000002", "3056,2544,0.139,0.139",
    "2500,2048,0.171,0.171", "2048,2500,0.168,0.168",
)


def nih_folder(index: int) -> str:
    """The Kaggle folder of the index-th image (0-based): images_001 holds 4,999, the others 10,000."""
    return f"images_{1 if index < 4999 else 2 + (index - 4999) // 10000:03d}"


def write_nih(out: str | Path, n: int, image_size: int = 1024, seed: int = 0) -> dict:
    """A ChestX-ray14 tree: Data_Entry_2017_v2020.csv, train_val_list.txt, test_list.txt and
    images_NNN/images/PPPPPPPP_FFF.png (8-bit gray, image_size square). Returns the phantom card."""
    _check_args(n, image_size)
    out = Path(out)
    rng = _rng(seed, _SRC_TAG["nih"], _TABLE)
    per_patient = rng.geometric(1 / 2.6, size=n)
    patient_of = np.repeat(np.arange(n), per_patient)[:n]
    n_patients = int(patient_of[-1]) + 1
    first = np.searchsorted(patient_of, np.arange(n_patients))
    follow_up = np.arange(n) - first[patient_of]
    pid = patient_of + 1
    labels = list(NIH_PREVALENCE)
    positive = rng.random((n, len(labels))) < np.array([NIH_PREVALENCE[k] for k in labels])
    age0 = rng.integers(1, 90, n_patients)
    sex = np.where(rng.random(n_patients) < 0.56, "M", "F")
    view = np.where(rng.random(n) < 0.6, "PA", "AP")
    original = rng.integers(0, len(_NIH_ORIGINAL), n)
    test_patient = rng.random(n_patients) < 0.2
    if n_patients >= 2 and not test_patient.any():
        test_patient[-1] = True
    if n_patients >= 2 and test_patient.all():
        test_patient[0] = False

    names, rows = [], []
    for i in range(n):
        name = f"{pid[i]:08d}_{follow_up[i]:03d}.png"
        found = [labels[j] for j in np.flatnonzero(positive[i])]
        finding = "|".join(sorted(found)) or "No Finding"
        rows.append(f"{name},{finding},{follow_up[i]},{pid[i]},{age0[patient_of[i]] + follow_up[i] // 3},"
                    f"{sex[patient_of[i]]},{view[i]},{_NIH_ORIGINAL[original[i]]}")
        names.append(name)
        img = render_chest(image_size, image_size, dict.fromkeys(found, 1.0), view[i], (seed, _SRC_TAG["nih"], i))
        _write(out / nih_folder(i) / "images" / name, _png(img))
    _write(out / "Data_Entry_2017_v2020.csv", ("\n".join([NIH_HEADER, *rows]) + "\n").encode())
    is_test = test_patient[patient_of]
    _write(out / "train_val_list.txt", "\n".join(np.asarray(names)[~is_test]).encode())
    _write(out / "test_list.txt", "\n".join(np.asarray(names)[is_test]).encode())
    card = _card("nih", n, seed, image_size, NIH_PREVALENCE, patients=n_patients,
                 positives={k: int(positive[:, j].sum()) for j, k in enumerate(labels)})
    _write_card(out, card)
    return card


# --- MIMIC-CXR-JPG -----------------------------------------------------------------------------

_VIEWS = np.array(["AP", "PA", "AP AXIAL", "", "AP LLD", "PA LLD", "LATERAL", "LL"], dtype=object)
_REAL_FRONTAL_P = (0.62, 0.33, 0.01, 0.02, 0.01, 0.01)  # codes 0..5: the real view mix of frontal films
_DEMO_FRONTAL_P = (0.8, 0.15, 0.01, 0.02, 0.01, 0.01)   # more AP: the cohort rule keeps one AP film per subject
_LATERAL_CODES = (6, 7)
_AP_CODES = (0, 2, 4)
_VIEW_MEANING = np.array(["antero-posterior", "postero-anterior", "antero-posterior", "", "antero-posterior",
                          "postero-anterior", "lateral", "left lateral"], dtype=object)
_REAL_SIZES = np.array([(3056, 2544), (3050, 2539), (2544, 3056), (2539, 3050), (3056, 2496), (2022, 1736)])

Columns = dict  # ordered {column name: 1-d numpy array}, one table


@dataclass
class MimicTables:
    metadata: Columns
    negbio: Columns
    chexpert: Columns
    split: Columns
    strength: np.ndarray   # [images, drawn labels]: 1 positive, 0.5 uncertain, 0 otherwise (what to draw)
    subjects: int
    studies: int


_LABEL_TEXT = np.array(["", "-1.0", "0.0", "1.0"], dtype=object)


def _text_column(values: np.ndarray) -> list[str]:
    """CSV cells as pandas writes them: ints plainly, floats by repr, NaN and None as empty."""
    if values.dtype.kind == "f":
        nan = np.isnan(values)
        if np.isin(values[~nan], (-1.0, 0.0, 1.0)).all():  # label columns: a lookup, not 200k reprs
            return _LABEL_TEXT[np.where(nan, 0, np.nan_to_num(values).astype(np.int64) + 2)].tolist()
        return ["" if c != c else repr(c) for c in values.tolist()]
    if values.dtype.kind in "iu":
        return list(map(str, values.tolist()))
    cells = values.astype(object).tolist()
    for cell in set(cells):  # few distinct texts: check them once
        if cell is not None and ("," in cell or '"' in cell or "\n" in cell):
            raise ValueError(f"phantom CSV cell needs quoting: {cell!r}")
    return ["" if c is None else c for c in cells]


def _csv_gz(table: Columns) -> bytes:
    """The table as CSV (header, comma, LF), gzip level 1 with mtime 0: same table, same bytes."""
    columns = [_text_column(np.asarray(v)) for v in table.values()]
    body = "\n".join(map(",".join, zip(*columns)))
    text = ",".join(table) + "\n" + body + ("\n" if body else "")
    return gzip.compress(text.encode(), compresslevel=1, mtime=0)


def _dicom_ids(rng: np.random.Generator, n: int) -> np.ndarray:
    """n ids like '02aa804e-bde0afdd-112c0b34-7bc16630-4e384014', vectorised."""
    raw = rng.integers(0, 16, size=(n, 40), dtype=np.uint8)
    chars = np.frombuffer(b"0123456789abcdef", np.uint8)[raw]
    out = np.full((n, 44), ord("-"), np.uint8)
    for g in range(5):
        out[:, g * 9 : g * 9 + 8] = chars[:, g * 8 : g * 8 + 8]
    ids = out.view("S44").ravel().astype(str).astype(object)
    if len(set(ids.tolist())) != n:  # 160 random bits: never in practice, but never silently
        raise RuntimeError("duplicate phantom dicom_id")
    return ids


def _mimic_tables(n: int, seed: int, tag: int, *, studies_mean: float, lateral_p: float,
                  split_p: tuple[float, float, float], frontal_p: tuple[float, ...],
                  sizes: np.ndarray | None) -> MimicTables:
    """All four MIMIC tables for exactly n images as numpy columns (377,110 rows in about a second).

    Subjects have geometric(mean studies_mean) studies; a study has one frontal image, a lateral one
    with probability lateral_p and another frontal one with probability 0.05. Rows of the metadata and
    split tables are in generation order: by subject (ascending id), then study in date order."""
    rng = _rng(seed, tag, _TABLE)
    studies_per = rng.geometric(1 / studies_mean, size=n)
    study_subject = np.repeat(np.arange(n), studies_per)
    images_per = 1 + (rng.random(len(study_subject)) < lateral_p) + (rng.random(len(study_subject)) < 0.05)
    ends = np.cumsum(images_per)
    n_studies = int(np.searchsorted(ends, n)) + 1
    study_subject, images_per = study_subject[:n_studies], images_per[:n_studies].copy()
    images_per[-1] -= int(ends[n_studies - 1] - n)
    n_subjects = int(study_subject[-1]) + 1
    image_study = np.repeat(np.arange(n_studies), images_per)
    pos = np.arange(n) - np.repeat(np.cumsum(images_per) - images_per, images_per)

    subject_ids = 10_000_000 + np.sort(rng.choice(10_000_000, n_subjects, replace=False))
    study_ids = 50_000_000 + rng.choice(10_000_000, n_studies, replace=False)  # random: lowest is not earliest
    dicom = _dicom_ids(rng, n)
    image_subject = subject_ids[study_subject[image_study]]

    # views: the first image of a study is frontal, the second lateral (when there is one), a third frontal
    frontal = rng.choice(len(frontal_p), n, p=frontal_p)
    lateral = np.where(rng.random(n) < 0.3, _LATERAL_CODES[1], _LATERAL_CODES[0])
    has_lat = np.repeat(images_per >= 2, images_per)
    view = np.where((pos == 1) & has_lat, lateral, frontal)
    is_ap = np.isin(view, _AP_CODES)
    ap_study = np.bincount(image_study, weights=is_ap, minlength=n_studies) > 0
    procedure = np.array(["CHEST (PA AND LAT)", "CHEST (PORTABLE AP)"], dtype=object)[ap_study.astype(int)]
    orientation = np.array(["Erect", "Recumbent", ""], dtype=object)[
        np.where(rng.random(n) < 0.03, 2, np.where(is_ap & (rng.random(n) < 0.5), 1, 0))]

    # dates: each subject's studies in generation order, the study ids unrelated to it
    first_day = rng.integers(0, 90 * 365, n_subjects)
    gaps = rng.integers(1, 400, n_studies)
    start = np.cumsum(gaps) - gaps
    subj_first_study = np.searchsorted(study_subject, np.arange(n_subjects))
    day = first_day[study_subject] + start - start[subj_first_study[study_subject]]
    ymd = (np.datetime64("2110-01-01") + day.astype("timedelta64[D]")).astype("datetime64[D]")
    years = ymd.astype("datetime64[Y]")
    months = ymd.astype("datetime64[M]")
    study_date = ((years.astype(np.int64) + 1970) * 10000 + (months - years).astype(np.int64) * 100 + 100
                  + (ymd - months).astype(np.int64) + 1)
    ms = rng.integers(0, 86400 * 1000, n_studies)
    study_time = np.round((ms // 3_600_000) * 10000 + (ms // 60_000 % 60) * 100 + ms // 1000 % 60
                          + (ms % 1000) / 1000.0, 3)

    rows_cols = sizes if sizes is not None else _REAL_SIZES[rng.choice(len(_REAL_SIZES), n,
                                                                         p=[0.42, 0.2, 0.15, 0.1, 0.08, 0.05])]
    metadata = {
        "dicom_id": dicom,
        "subject_id": image_subject,
        "study_id": study_ids[image_study],
        "PerformedProcedureStepDescription": procedure[image_study],
        "ViewPosition": _VIEWS[view],
        "Rows": rows_cols[:, 0],
        "Columns": rows_cols[:, 1],
        "StudyDate": study_date[image_study],
        "StudyTime": study_time[image_study],
        "ProcedureCodeSequence_CodeMeaning": procedure[image_study],
        "ViewCodeSequence_CodeMeaning": _VIEW_MEANING[view],
        "PatientOrientationCodeSequence_CodeMeaning": orientation,
    }

    # labels per study
    drawn = list(MIMIC_PREVALENCE)
    values = np.full((n_studies, len(MIMIC_LABEL_COLUMNS)), np.nan)
    values[rng.random(values.shape) < 0.06] = 0.0  # labels never drawn: blank, sometimes an explicit negative
    strength = np.zeros((n_studies, len(drawn)), np.float32)
    u = rng.random((n_studies, len(drawn)))
    for j, name in enumerate(drawn):
        p, q = MIMIC_PREVALENCE[name], MIMIC_UNCERTAIN[name]
        pos_, unc = u[:, j] < p, (u[:, j] >= p) & (u[:, j] < p + q)
        neg = (u[:, j] >= p + q) & (u[:, j] < p + q + 0.25 * (1 - p - q))
        column = np.where(pos_, 1.0, np.where(unc, -1.0, np.where(neg, 0.0, np.nan)))
        values[:, MIMIC_LABEL_COLUMNS.index(name)] = column
        strength[:, j] = np.where(pos_, 1.0, np.where(unc, 0.5, 0.0))
    finding = (strength[:, [j for j, k in enumerate(drawn) if k != "Support Devices"]] > 0).any(axis=1)
    values[:, MIMIC_LABEL_COLUMNS.index("No Finding")] = np.where(finding, np.nan, 1.0)
    missing = np.zeros(n_studies, bool)  # a few studies have no label row, as in the release
    if n_studies >= 10:
        missing[rng.choice(n_studies, max(1, round(0.015 * n_studies)), replace=False)] = True
    strength[missing] = 0.0
    chex = values.copy()
    chex[(chex == -1.0) & (rng.random(values.shape) < 0.3)] = 1.0  # the two labelers disagree on some
    keep = np.flatnonzero(~missing)
    keep = keep[np.lexsort((study_ids[keep], subject_ids[study_subject[keep]]))]

    def label_table(v: np.ndarray) -> Columns:
        table = {"subject_id": subject_ids[study_subject[keep]], "study_id": study_ids[keep]}
        table.update({name: v[keep, c] for c, name in enumerate(MIMIC_LABEL_COLUMNS)})
        return table

    subject_split = np.array(["train", "validate", "test"], dtype=object)[rng.choice(3, n_subjects, p=list(split_p))]
    split = {"dicom_id": dicom, "study_id": study_ids[image_study], "subject_id": image_subject,
             "split": subject_split[study_subject[image_study]]}
    return MimicTables(metadata, label_table(values), label_table(chex), split, strength[image_study], n_subjects,
                       n_studies)


def _write_mimic_tables(out: Path, t: MimicTables) -> None:
    for name in MIMIC_TABLES:
        _write(out / f"mimic-cxr-2.0.0-{name}.csv.gz", _csv_gz(getattr(t, name)))


def mimic_path(subject_id: int, study_id: int, dicom_id: str) -> str:
    """files/pNN/pSUBJECT/sSTUDY/DICOM.jpg, as in MIMIC-CXR-JPG."""
    subject = str(subject_id)
    return f"files/p{subject[:2]}/p{subject}/s{study_id}/{dicom_id}.jpg"


def write_mimic(out: str | Path, n: int, image_size: int = 3000, seed: int = 0) -> dict:
    """A MIMIC-CXR-JPG tree: the metadata, negbio, chexpert and split tables (.csv.gz) and
    files/pNN/pSUBJECT/sSTUDY/DICOM.jpg (quality 95, 8-bit gray). `image_size` is the long side; the
    short side is 0.80-0.86 of it (2500 x 3000 by default), one film in ten is landscape.
    Returns the phantom card."""
    _check_args(n, image_size)
    out = Path(out)
    size_rng = _rng(seed, _SRC_TAG["mimic"], _TABLE, 1)
    short = np.round(image_size * size_rng.uniform(0.80, 0.86, n)).astype(np.int64)
    landscape = size_rng.random(n) < 0.1
    sizes = np.stack([np.where(landscape, short, image_size), np.where(landscape, image_size, short)], axis=1)
    t = _mimic_tables(n, seed, _SRC_TAG["mimic"], studies_mean=1.6, lateral_p=0.35, split_p=(0.8, 0.1, 0.1),
                      frontal_p=_DEMO_FRONTAL_P, sizes=sizes)
    drawn = list(MIMIC_PREVALENCE)
    meta = t.metadata
    for i, (subject, study, dicom, view) in enumerate(zip(meta["subject_id"].tolist(), meta["study_id"].tolist(),
                                                          meta["dicom_id"].tolist(), meta["ViewPosition"].tolist())):
        findings = {k: float(t.strength[i, j]) for j, k in enumerate(drawn) if t.strength[i, j] > 0}
        img = render_chest(int(sizes[i, 0]), int(sizes[i, 1]), findings, view, (seed, _SRC_TAG["mimic"], i))
        _write(out / mimic_path(subject, study, dicom), _jpeg(img, 95))
    _write_mimic_tables(out, t)
    card = _card("mimic", n, seed, image_size, MIMIC_PREVALENCE, subjects=t.subjects, studies=t.studies,
                 studies_without_labels=t.studies - len(t.negbio["study_id"]),
                 uncertain=MIMIC_UNCERTAIN)
    _write_card(out, card)
    return card


def write_mimic_tables(out: str | Path, n_images: int = MIMIC_REAL_IMAGES, seed: int = 0) -> dict:
    """Only the four MIMIC tables, at real scale by default (377,110 images, about 65,000 subjects,
    3.5 studies per subject, 1.65 images per study, the real train/validate/test shares), with the
    real image sizes in Rows/Columns. No images: for manifest benchmarks. A few seconds."""
    _check_args(n_images, None)
    out = Path(out)
    t = _mimic_tables(n_images, seed, _SRC_TAG["mimic-tables"], studies_mean=3.5, lateral_p=0.6,
                      split_p=(0.978, 0.008, 0.014), frontal_p=_REAL_FRONTAL_P, sizes=None)
    _write_mimic_tables(out, t)
    card = _card("mimic", n_images, seed, 0, MIMIC_PREVALENCE, tables_only=True,
                 subjects=t.subjects, studies=t.studies)
    _write_card(out, card)
    return card


# --- folder sets (cardiomegaly) ----------------------------------------------------------------


def write_folder(out: str | Path, n: int, image_size: int = 1024, seed: int = 0, label: str = "Cardiomegaly") -> dict:
    """A folder set: normal/personNNNN_MMMM.png|jpg and abnormal/... (abnormal shows `label`).
    Files of one patient share the `personNNNN_` prefix and class. Landscape films like Kermany's:
    image_size wide, 0.75-0.95 of it high. Returns the phantom card."""
    _check_args(n, image_size)
    if label not in DRAWABLE:
        raise CxrError(f"phantom cannot draw {label!r}; choose one of {', '.join(DRAWABLE)}")
    out = Path(out)
    rng = _rng(seed, _SRC_TAG["cardiomegaly"], _TABLE)
    per_patient = rng.geometric(1 / 1.3, size=n)
    patient_of = np.repeat(np.arange(n), per_patient)[:n]
    n_patients = int(patient_of[-1]) + 1
    abnormal_patient = rng.random(n_patients) < FOLDER_ABNORMAL_FRACTION
    if n_patients >= 2 and not abnormal_patient.any():
        abnormal_patient[-1] = True
    if n_patients >= 2 and abnormal_patient.all():
        abnormal_patient[0] = False
    ext = np.where(rng.random(n) < 0.2, "jpg", "png")
    heights = np.round(image_size * rng.uniform(0.75, 0.95, n)).astype(int)
    counts = {"normal": 0, "abnormal": 0}
    for i in range(n):
        cls = "abnormal" if abnormal_patient[patient_of[i]] else "normal"
        counts[cls] += 1
        img = render_chest(int(heights[i]), image_size, {label: 1.0} if cls == "abnormal" else None, "PA",
                           (seed, _SRC_TAG["cardiomegaly"], i))
        name = f"{cls}/person{patient_of[i] + 1:04d}_{i + 1:04d}.{ext[i]}"
        _write(out / name, _png(img) if ext[i] == "png" else _jpeg(img, 95))
    card = _card("cardiomegaly", n, seed, image_size, {label: FOLDER_ABNORMAL_FRACTION}, label=label,
                 patients=n_patients, counts=counts, patient_pattern=r"person(\d+)_")
    _write_card(out, card)
    return card


# --- the one entry point -----------------------------------------------------------------------

_OWN = ("phantom.json", "Data_Entry_2017_v2020.csv", "train_val_list.txt", "test_list.txt", "files", "normal",
        "abnormal", *(f"mimic-cxr-2.0.0-{t}.csv.gz" for t in MIMIC_TABLES))


def _prepare_out(out: Path) -> None:
    """`out` must be missing, empty, or an earlier phantom tree (whose files are then removed)."""
    if out.exists() and not out.is_dir():
        raise CxrError(f"--out {out} is a file, not a folder")
    if not out.exists() or not any(out.iterdir()):
        return
    if not (out / "phantom.json").is_file():
        raise CxrError(f"--out {out} is not empty and holds no phantom.json: choose a new folder or empty it")
    for entry in out.iterdir():
        if entry.name in _OWN or entry.name.startswith("images_"):
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def make_demo_data(source: str, out: str | Path, n: int, image_size: int | None = None, seed: int = 0) -> dict:
    """Write a phantom raw tree of `source` (nih, mimic, cardiomegaly) with n images into `out`.

    image_size None takes the real size (NIH 1024, MIMIC 3000 long side, cardiomegaly 1024). An earlier
    phantom tree in `out` is replaced; any other non-empty folder is refused. Returns the phantom card
    (also written to out/phantom.json) with `out` added."""
    if source not in SOURCES:
        raise CxrError(f"unknown phantom source {source!r}: choose one of {', '.join(SOURCES)}")
    _check_args(n, image_size)
    size = int(image_size or DEFAULT_SIZES[source])
    out = Path(out)
    _prepare_out(out)
    out.mkdir(parents=True, exist_ok=True)
    if source == "nih":
        card = write_nih(out, n, size, seed)
    elif source == "mimic":
        card = write_mimic(out, n, size, seed)
    else:
        card = write_folder(out, n, size, seed, label="Cardiomegaly")
    return {**card, "out": str(out)}


__all__ = [
    "DEFAULT_SIZES", "DRAWABLE", "MIMIC_LABEL_COLUMNS", "MIMIC_METADATA_COLUMNS", "MIMIC_PREVALENCE",
    "MIMIC_UNCERTAIN", "NIH_HEADER", "NIH_PREVALENCE", "SOURCES", "make_demo_data", "mimic_path", "nih_folder",
    "render_chest", "write_folder", "write_mimic", "write_mimic_tables", "write_nih",
]
