"""Chest-X-ray-like phantoms rendered from an anatomy and a set of findings.

Rendering the same :class:`Anatomy` with one finding toggled gives the true counterfactual: every
random choice (shapes, positions, noise) belongs to the anatomy, none to the rendering. Each
finding also yields a region mask (where it can change pixels) to measure change outside it.
Intensities are in [0, 1], bright = dense, as on a conventional radiograph.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

FINDINGS = ("cardiomegaly", "pleural_effusion", "support_devices")


@dataclass(frozen=True)
class Findings:
    cardiomegaly: bool = False
    pleural_effusion: bool = False
    support_devices: bool = False

    def toggled(self, name: str) -> Findings:
        return replace(self, **{name: not getattr(self, name)})

    def as_vector(self) -> np.ndarray:
        return np.array([getattr(self, n) for n in FINDINGS], dtype=np.float32)


@dataclass(frozen=True)
class Anatomy:
    """Everything random about one patient and one exposure, drawn from ``seed``."""

    seed: int
    size: int = 128
    params: dict = field(default_factory=dict, compare=False)

    @classmethod
    def sample(cls, seed: int, size: int = 128) -> Anatomy:
        r = np.random.default_rng(seed)
        p = {
            "cx": r.uniform(0.47, 0.53),
            "body_w": r.uniform(0.40, 0.46),
            "lung_w": r.uniform(0.15, 0.19),
            "lung_h": r.uniform(0.30, 0.36),
            "lung_top": r.uniform(0.16, 0.22),
            "lung_gap": r.uniform(0.055, 0.075),
            "rib_phase": r.uniform(0, 2 * np.pi),
            "rib_period": r.uniform(0.075, 0.095),
            "heart_cy": r.uniform(0.58, 0.63),
            "heart_dx": r.uniform(0.03, 0.06),
            "heart_w": r.uniform(0.12, 0.14),
            "heart_big": r.uniform(1.35, 1.5),
            "exposure": r.uniform(0.9, 1.1),
            "gamma": r.uniform(0.9, 1.1),
            "noise": r.uniform(0.008, 0.018),
            "effusion_side": int(r.integers(0, 3)),  # 0 right, 1 left, 2 both
            "effusion_level": r.uniform(0.15, 0.35),
            "pacemaker_side": int(r.integers(0, 2)),
            "pacemaker_xy": (r.uniform(0.18, 0.26), r.uniform(0.14, 0.2)),
            "leads": [(r.uniform(0.2, 0.8), r.uniform(0.25, 0.8)) for _ in range(int(r.integers(2, 5)))],
            "tube": bool(r.integers(0, 2)),
            "texture_seed": int(r.integers(0, 2**31)),
        }
        return cls(seed=seed, size=size, params=p)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    return y, x


def _ellipse(y, x, cy, cx, ry, rx, soft: float = 0.01) -> np.ndarray:
    d = ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2
    return np.clip((1.0 - d) / (2 * soft / min(ry, rx)) + 0.5, 0, 1)


def _segment(y, x, p0, p1, width: float) -> np.ndarray:
    (y0, x0), (y1, x1) = p0, p1
    vy, vx = y1 - y0, x1 - x0
    t = np.clip(((y - y0) * vy + (x - x0) * vx) / (vy * vy + vx * vx + 1e-9), 0, 1)
    d = np.hypot(y - (y0 + t * vy), x - (x0 + t * vx))
    return np.clip(1.5 - d / width, 0, 1)


def _polyline(y, x, points, width: float) -> np.ndarray:
    out = np.zeros_like(y)
    for a, b in zip(points[:-1], points[1:], strict=True):
        out = np.maximum(out, _segment(y, x, a, b, width))
    return out


def _smooth_noise(rng: np.random.Generator, size: int, scale: int) -> np.ndarray:
    coarse = rng.standard_normal((size // scale + 2, size // scale + 2)).astype(np.float32)
    idx = np.arange(size) / scale
    i0 = idx.astype(int)
    f = (idx - i0)[:, None]
    rows = coarse[i0] * (1 - f) + coarse[i0 + 1] * f
    g = (idx - i0)[None, :]
    return rows[:, i0] * (1 - g) + rows[:, i0 + 1] * g


def _lungs(y, x, p) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    cx, gap, lw, lh, top = p["cx"], p["lung_gap"], p["lung_w"], p["lung_h"], p["lung_top"]
    centres = (cx - gap - lw, cx + gap + lw)
    lungs = []
    for c in centres:
        shape = _ellipse(y, x, top + lh, c, lh, lw)
        shape *= (y > top).astype(np.float32) + (y <= top) * _ellipse(y, x, top + 0.02, c, 0.05, lw * 0.8)
        lungs.append(np.clip(shape, 0, 1))
    return lungs[0], lungs[1], centres


def _heart(y, x, p, big: bool) -> np.ndarray:
    scale = p["heart_big"] if big else 1.0
    w = p["heart_w"] * scale
    return _ellipse(y, x, p["heart_cy"], p["cx"] + p["heart_dx"] * scale, 0.1 * (1 + (scale - 1) * 0.6), w)


def _effusion(y, x, p, lung: np.ndarray, centre: float, side_sign: float) -> np.ndarray:
    bottom = p["lung_top"] + 2 * p["lung_h"]
    level = bottom - p["effusion_level"] * 2 * p["lung_h"]
    meniscus = level - 0.06 * np.clip(side_sign * (x - centre) / p["lung_w"], 0, 1)
    fill = np.clip((y - meniscus) / 0.02, 0, 1)
    return fill * (lung > 0.05)


def _devices(y, x, p) -> np.ndarray:
    size = y.shape[0]
    d = np.zeros_like(y)
    px, py = p["pacemaker_xy"]
    if p["pacemaker_side"]:
        px = 1 - px
    box = np.clip(1.5 - np.maximum(np.abs(x - px) / 0.055, np.abs(y - py) / 0.035), 0, 1) ** 0.5
    d = np.maximum(d, box)
    heart_pt = (p["heart_cy"] - 0.04, p["cx"] + p["heart_dx"])
    lead_path = [(py, px), (py + 0.08, (px + p["cx"]) / 2), (py + 0.2, p["cx"]), heart_pt]
    d = np.maximum(d, 0.9 * _polyline(y, x, lead_path, 1.2 / size))
    for ly, lx in p["leads"]:
        d = np.maximum(d, _ellipse(y, x, lx, ly, 0.025, 0.025, soft=0.004))
        d = np.maximum(d, 0.8 * _polyline(y, x, [(lx, ly), (lx + 0.1, ly * 0.6), (1.05, ly * 0.5)], 0.9 / size))
    if p["tube"]:
        d = np.maximum(
            d, 0.85 * _polyline(y, x, [(-0.05, p["cx"]), (0.3, p["cx"] + 0.01), (0.45, p["cx"])], 1.3 / size)
        )
    return np.clip(d, 0, 1)


def render(anatomy: Anatomy, findings: Findings) -> np.ndarray:
    """The phantom radiograph (size x size, float32 in [0, 1])."""
    p, size = anatomy.params, anatomy.size
    y, x = _grid(size)
    rng = np.random.default_rng(p["texture_seed"])
    body = _ellipse(y, x, 0.62, p["cx"], 0.62, p["body_w"], soft=0.03)
    img = 0.08 + 0.42 * body
    img += 0.35 * _ellipse(y, x, 0.0, p["cx"], 0.14, 0.5 * p["body_w"]) * (y < 0.12) * body
    right, left, centres = _lungs(y, x, p)
    lungs = np.maximum(right, left)
    ribs = 0.5 + 0.5 * np.cos(2 * np.pi * (y + 0.25 * (x - p["cx"]) ** 2 * 4) / p["rib_period"] + p["rib_phase"])
    ribs = (ribs > 0.8).astype(np.float32) * 0.07
    texture = 0.03 * _smooth_noise(rng, size, 8)
    img = img - lungs * (0.27 - ribs - texture)
    img += 0.22 * (np.abs(x - p["cx"]) < 0.045) * (y > 0.05) * body
    img = np.maximum(img, 0.62 * _heart(y, x, p, findings.cardiomegaly) * body + 0.1 * (1 - body))
    if findings.pleural_effusion:
        side = p["effusion_side"]
        for k, (lung, c, sign) in enumerate(((right, centres[0], -1.0), (left, centres[1], 1.0))):
            if side == 2 or side == k:
                fluid = _effusion(y, x, p, lung, c, sign)
                img = img * (1 - fluid) + np.maximum(img, 0.5) * fluid
    if findings.support_devices:
        dev = _devices(y, x, p)
        img = img * (1 - dev) + 0.97 * dev
    img = np.clip(img * p["exposure"], 0, 1) ** p["gamma"]
    img = img + p["noise"] * rng.standard_normal((size, size)).astype(np.float32)
    return np.clip(img, 0, 1).astype(np.float32)


def anatomy_mask(anatomy: Anatomy) -> np.ndarray:
    """The identity-defining anatomy the guided method keeps (seed 003's bone mask: spine and
    mediastinum, clavicles and shoulders, not the lungs): the spine strip and the shoulder girdle,
    without the heart, which cardiomegaly edits."""
    p, size = anatomy.params, anatomy.size
    y, x = _grid(size)
    body = _ellipse(y, x, 0.62, p["cx"], 0.62, p["body_w"], soft=0.03) > 0.5
    spine = (np.abs(x - p["cx"]) < 0.045) & (y > 0.05)
    shoulders = _ellipse(y, x, 0.0, p["cx"], 0.14, 0.5 * p["body_w"]) > 0.5
    heart = region_mask(anatomy, "cardiomegaly") | (_heart(y, x, p, True) > 0.05)
    return (spine | shoulders) & body & ~heart


def region_mask(anatomy: Anatomy, finding: str) -> np.ndarray:
    """Boolean mask of where ``finding`` can change the image (both states, dilated by 2 px)."""
    base = Findings()
    on = base.toggled(finding)
    a, b = render(anatomy, base), render(anatomy, on)
    changed = np.abs(a - b) > 0.02
    return _dilate(changed, 2)


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    out = mask.copy()
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            out |= np.roll(np.roll(mask, dy, 0), dx, 1)
    return out


def training_phantom(seed: int, size: int = 128) -> tuple[np.ndarray, Findings]:
    """Training anatomy ``seed`` (uint8) with each finding present with probability 1/2."""
    rng = np.random.default_rng(10_000_000 + seed)
    findings = Findings(*(bool(v) for v in rng.random(3) < 0.5))
    return np.round(render(Anatomy.sample(seed, size), findings) * 255).astype(np.uint8), findings


def region_fractions(seed: int, size: int = 128, side: int = 16) -> np.ndarray:
    """Area fraction (3, side, side) of each finding's region of anatomy ``seed``, for the
    attention supervision."""
    anatomy = Anatomy.sample(seed, size)
    masks = np.stack([region_mask(anatomy, name) for name in FINDINGS]).astype(np.float32)
    return masks.reshape(len(FINDINGS), side, size // side, side, size // side).mean((2, 4)).astype(np.float16)
