"""Procedurally generated landscape scenes with a natural up/down structure.

Each image is a stack of three horizontal strata (top, middle, bottom) with
wavy boundaries at random heights. The top stratum is always a sky (day or
sunset); the middle and bottom are ground-like materials (water, sand, grass,
snow, rock, forest). A class is an ordered triple of materials, and classes
come in pairs that share the same materials in a different vertical order
(sky/water/sand "beach" vs sky/sand/water "dunes by a lake"), so that the
label cannot be read from which textures are present (what global average
pooling keeps) but needs where they sit relative to each other - the kind of
vertical structure photos have. Textures, colours, boundary heights and
waviness, a sun disc, tree trunks on grass and forest, brightness and
noise are all randomised; images are drawn fresh for every batch from a seeded
generator, so the training set is effectively unlimited.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# material ids
SKY, SUNSET, WATER, SAND, GRASS, SNOW, ROCK, FOREST = range(8)
MATERIALS = ("sky", "sunset", "water", "sand", "grass", "snow", "rock", "forest")

CLASSES = (
    ("beach", (SKY, WATER, SAND)),
    ("dunes by a lake", (SKY, SAND, WATER)),
    ("meadow above a lake", (SKY, GRASS, WATER)),
    ("lake before a meadow", (SKY, WATER, GRASS)),
    ("snowy peak", (SKY, SNOW, ROCK)),
    ("rocks above snow", (SKY, ROCK, SNOW)),
    ("forest above a lake", (SKY, FOREST, WATER)),
    ("lake before a forest", (SKY, WATER, FOREST)),
    ("sunset beach", (SUNSET, WATER, SAND)),
    ("sunset dunes", (SUNSET, SAND, WATER)),
)

_BASE = torch.tensor(
    [
        [0.35, 0.55, 0.90],  # sky
        [0.95, 0.55, 0.30],  # sunset
        [0.15, 0.35, 0.60],  # water
        [0.85, 0.75, 0.50],  # sand
        [0.25, 0.60, 0.20],  # grass
        [0.92, 0.94, 0.97],  # snow
        [0.50, 0.48, 0.45],  # rock
        [0.08, 0.30, 0.12],  # forest
    ]
)


def _smooth_noise(b: int, h: int, w: int, cells: tuple[int, int], g: torch.Generator) -> torch.Tensor:
    """Low-frequency noise (b, 1, h, w), roughly unit variance."""
    z = torch.randn(b, 1, cells[0], cells[1], generator=g)
    return F.interpolate(z, size=(h, w), mode="bilinear", align_corners=False)


def _texture(m: int, b: int, size: int, g: torch.Generator) -> torch.Tensor:
    """Texture of material ``m`` for b images: (b, 3, size, size)."""
    h = w = size
    yy = torch.linspace(0, 1, h).view(1, 1, h, 1)
    c = max(2, size // 8)
    col = (_BASE[m].view(1, 3, 1, 1) + 0.08 * torch.randn(b, 3, 1, 1, generator=g)).expand(b, 3, h, w)

    def fine(s):
        return s * torch.randn(b, 1, h, w, generator=g)

    if m == SKY:  # brighter towards the horizon + soft, horizontally stretched clouds
        clouds = (_smooth_noise(b, h, w, (c, c // 2 + 1), g) - 0.6).clamp(min=0)
        return col + 0.25 * yy + 0.8 * clouds
    if m == SUNSET:  # warm at the bottom, purple at the top
        return col * (0.55 + 0.6 * yy) + torch.tensor([0.0, -0.1, 0.25]).view(1, 3, 1, 1) * (1 - yy)
    if m == WATER:  # horizontal ripples (stretched along x)
        rip = F.interpolate(torch.randn(b, 1, h, max(2, w // 8), generator=g), size=(h, w), mode="bilinear", align_corners=False)
        return col + 0.10 * rip + 0.06 * yy
    if m == SAND:  # fine grain + gentle dunes
        return col + fine(0.05) + 0.08 * _smooth_noise(b, h, w, (c // 2 + 1, c // 2 + 1), g)
    if m == GRASS:  # vertical blades (stretched along y) + grain
        blades = F.interpolate(torch.randn(b, 1, max(2, h // 6), w, generator=g), size=(h, w), mode="bilinear", align_corners=False)
        return col + 0.12 * blades * torch.tensor([0.5, 1.0, 0.4]).view(1, 3, 1, 1) + fine(0.04)
    if m == SNOW:  # bright with bluish shading
        return col - 0.12 * _smooth_noise(b, h, w, (c, c), g).abs() * torch.tensor([1.0, 0.8, 0.3]).view(1, 3, 1, 1)
    if m == ROCK:  # blotchy mid-frequency noise
        return col + 0.15 * _smooth_noise(b, h, w, (2 * c, 2 * c), g) + fine(0.05)
    # forest: dark blobs (tree crowns)
    return col + 0.10 * _smooth_noise(b, h, w, (2 * c, 2 * c), g) + fine(0.03)


def _boundary(b: int, w: int, level: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Wavy boundary heights (b, w) in pixels around ``level`` (b,) pixels."""
    x = torch.linspace(0, 1, w).view(1, w)
    amp = torch.rand(b, 1, generator=g) * 0.04 * w
    freq = 1 + torch.rand(b, 1, generator=g) * 3
    phase = torch.rand(b, 1, generator=g) * 2 * math.pi
    tilt = (torch.rand(b, 1, generator=g) - 0.5) * 0.12 * w
    return level.view(b, 1) + amp * torch.sin(2 * math.pi * freq * x + phase) + tilt * (x - 0.5)


def make_scenes(n: int, size: int = 56, generator: torch.Generator | None = None, labels: torch.Tensor | None = None):
    """``n`` images (n, 3, size, size), roughly zero-mean unit-range, and labels (n,)."""
    g = generator or torch.Generator().manual_seed(0)
    if labels is None:
        labels = torch.randint(len(CLASSES), (n,), generator=g)
    mats = torch.tensor([c[1] for c in CLASSES])[labels]  # (n, 3)
    strata = [torch.empty(n, 3, size, size) for _ in range(3)]
    for k in range(3):
        for m in range(len(MATERIALS)):
            idx = (mats[:, k] == m).nonzero()[:, 0]
            if idx.numel():
                strata[k][idx] = _texture(m, idx.numel(), size, g)
    top, mid, bot = strata
    # boundaries: top/mid at 20-50%, mid/bot at 15-35% further down
    b1 = (0.20 + 0.30 * torch.rand(n, generator=g)) * size
    b2 = b1 + (0.15 + 0.20 * torch.rand(n, generator=g)) * size
    y = torch.arange(size).view(1, size, 1).float()
    m1 = (y < _boundary(n, size, b1, g).unsqueeze(1)).float().unsqueeze(1)  # (n,1,H,W)
    m2 = (y < _boundary(n, size, b2, g).unsqueeze(1)).float().unsqueeze(1)
    img = m1 * top + (m2 - m1).clamp(min=0) * mid + (1 - m2) * bot
    # a sun/moon disc somewhere in the sky on half of the images
    cy = b1 * torch.rand(n, generator=g) * 0.8
    cx = torch.rand(n, generator=g) * size
    r = (0.04 + 0.05 * torch.rand(n, generator=g)) * size
    xx = torch.arange(size).view(1, 1, size).float()
    disc = (((y - cy.view(n, 1, 1)) ** 2 + (xx - cx.view(n, 1, 1)) ** 2) < r.view(n, 1, 1) ** 2).float()
    disc = disc * (torch.rand(n, 1, 1, generator=g) < 0.5).float() * m1[:, 0]
    img = img * (1 - disc.unsqueeze(1)) + disc.unsqueeze(1) * torch.tensor([1.0, 0.95, 0.7]).view(1, 3, 1, 1)
    # tree trunks standing on grass or forest strata (dark vertical strokes)
    has_trees = ((mats[:, 1] == GRASS) | (mats[:, 1] == FOREST)).float()
    trunks = (torch.rand(n, 1, 1, size, generator=g) < 0.06).float() * has_trees.view(n, 1, 1, 1)
    trunk_zone = ((y.unsqueeze(0) > (b1 - 0.12 * size).view(n, 1, 1, 1)) & (y.unsqueeze(0) < (b1 + 0.05 * size).view(n, 1, 1, 1))).float()
    tr = trunks * trunk_zone
    img = img * (1 - tr) + tr * 0.12
    # photometric jitter and sensor noise
    img = img * (0.8 + 0.4 * torch.rand(n, 1, 1, 1, generator=g)) + 0.1 * (torch.rand(n, 1, 1, 1, generator=g) - 0.5)
    img = img + 0.03 * torch.randn(img.shape, generator=g)
    return (img.clamp(0, 1.2) - 0.5) * 2.0, labels
