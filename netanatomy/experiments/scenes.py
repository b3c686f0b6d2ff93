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


# ---------------------------------------------------------------------------
# "Top/bottom" scenes: the label is a vertical relation at the scale of the image.

TB_PAIRS = ((SKY, WATER), (SAND, GRASS), (SNOW, ROCK), (FOREST, SUNSET), (WATER, SAND))
TB_CLASSES = tuple(
    (f"{MATERIALS[a]} above {MATERIALS[b]}", (a, b)) for p in TB_PAIRS for (a, b) in (p, p[::-1])
)


def _clutter(n: int, size: int, g: torch.Generator) -> torch.Tensor:
    """Label-free clutter with structure along x: columns of random width and colour
    (trunks, buildings), broken by a few horizontal cuts, plus grain. (n, 3, size, size)."""
    # column index per x: random widths 2-12 px
    cols = torch.empty(n, size, dtype=torch.long)
    widths = torch.randint(2, max(3, size // 5), (n, size), generator=g)
    edges = widths.cumsum(1)
    xs = torch.arange(size).view(1, size, 1)
    cols = (xs >= edges.view(n, 1, size)).sum(2)  # (n, size): column id of every x
    ncol = size + 1
    # every column gets two colours split at a random height (a horizontal cut)
    c_top = torch.rand(n, ncol, 3, generator=g) * 0.9 + 0.05
    c_bot = torch.rand(n, ncol, 3, generator=g) * 0.9 + 0.05
    cut = torch.rand(n, ncol, generator=g) * size
    y = torch.arange(size).view(1, size, 1)
    top_c = torch.gather(c_top, 1, cols.unsqueeze(2).expand(n, size, 3))  # (n, W, 3)
    bot_c = torch.gather(c_bot, 1, cols.unsqueeze(2).expand(n, size, 3))
    cut_x = torch.gather(cut, 1, cols)  # (n, W)
    above = (y < cut_x.view(n, 1, size)).float().unsqueeze(-1)  # (n, H, W, 1)
    img = above * top_c.unsqueeze(1) + (1 - above) * bot_c.unsqueeze(1)
    img = img.permute(0, 3, 1, 2)
    return img + 0.06 * torch.randn(n, 3, size, size, generator=g)


def make_topbottom(n: int, size: int = 56, generator: torch.Generator | None = None, labels: torch.Tensor | None = None,
                   return_layout: bool = False):
    """Scenes whose class is which of two materials lies above the other, with a tall
    band of label-free clutter between them (and clutter above and below).

    Each image holds two full-width, slightly wavy strata of materials ``a`` and ``b``
    (from :data:`TB_PAIRS`): ``a`` above ``b`` is one class, ``b`` above ``a`` the other.
    The strata are 12-18% of the image tall, start anywhere in the top 14%, and are
    separated by 32-44% of the image, so their order is only readable by units whose
    receptive field spans most of the image (the last conv group of the experiment
    network), not by the mid-network layers; their presence alone (what global average
    pooling keeps) gives at most 50%. The clutter has vertical edges (columns of random
    width and colour), so x carries structure, but no label information.
    Returns (n, 3, size, size) roughly in [-1, 1.4] and labels (n,); with ``return_layout``
    also a dict of the upper and lower stratum masks, (n, 1, size, size) each.
    """
    g = generator or torch.Generator().manual_seed(0)
    if labels is None:
        labels = torch.randint(len(TB_CLASSES), (n,), generator=g)
    mats = torch.tensor([c[1] for c in TB_CLASSES])[labels]  # (n, 2): upper, lower
    layers = [torch.empty(n, 3, size, size) for _ in range(2)]
    for k in range(2):
        for m in range(len(MATERIALS)):
            idx = (mats[:, k] == m).nonzero()[:, 0]
            if idx.numel():
                layers[k][idx] = _texture(m, idx.numel(), size, g)
    clutter = _clutter(n, size, g)

    def u(lo: float, hi: float) -> torch.Tensor:
        return (lo + (hi - lo) * torch.rand(n, generator=g)) * size

    y0 = u(0.0, 0.14)
    y1 = y0 + u(0.12, 0.18)
    y2 = y1 + u(0.32, 0.44)
    y3 = y2 + u(0.12, 0.18)
    y = torch.arange(size).view(1, size, 1).float()

    def below(level):  # (n,1,H,W): 1 on and below the wavy boundary around ``level``
        return (y >= _boundary(n, size, level, g).unsqueeze(1)).float().unsqueeze(1)

    m0, m1, m2, m3 = below(y0), below(y1), below(y2), below(y3)
    upper = m0 * (1 - m1)
    lower = m2 * (1 - m3)
    img = upper * layers[0] + lower * layers[1] + (1 - upper - lower).clamp(min=0) * clutter
    img = img * (0.8 + 0.4 * torch.rand(n, 1, 1, 1, generator=g)) + 0.1 * (torch.rand(n, 1, 1, 1, generator=g) - 0.5)
    img = img + 0.03 * torch.randn(img.shape, generator=g)
    img = (img.clamp(0, 1.2) - 0.5) * 2.0
    if return_layout:
        return img, labels, {"upper": upper, "lower": lower}
    return img, labels


# ---------------------------------------------------------------------------
# Photos of upright objects: Fashion-MNIST items on a canvas.

FASHION_CLASSES = tuple((c, ()) for c in (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"))
_FASHION: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


def make_fashion(n: int, size: int = 56, generator: torch.Generator | None = None, labels: torch.Tensor | None = None,
                 split: str = "train"):
    """Fashion-MNIST photos (Debian's dataset-fashion-mnist) as RGB objects on a canvas.

    Each item is scaled to 6/7 of ``size`` (48 px of 56) and placed at a random offset
    (up to the remaining margin in x and y), tinted with a random colour on a random dark
    background, plus sensor noise. The class is the item's category: upright photos
    whose up/down structure is natural (collars above hems, soles below uppers) while
    the label is not a vertical relation; the objects have real structure along x too.
    Training images come from the ``train`` split, test images from ``test``.
    Returns (n, 3, size, size) roughly in [-1, 1] and labels (n,).
    """
    from ..datasets import fashion_mnist

    if split not in _FASHION:
        _FASHION[split] = fashion_mnist(split)
    X, Y = _FASHION[split]
    g = generator or torch.Generator().manual_seed(0)
    if labels is None:
        idx = torch.randint(len(X), (n,), generator=g)
    else:  # the first images of the requested classes (for figures)
        idx = torch.stack([torch.nonzero(Y == int(c))[i // len(FASHION_CLASSES), 0] for i, c in enumerate(labels)])
    inner = max(8, round(size * 6 / 7))
    obj = F.interpolate(X[idx].float().unsqueeze(1) / 255.0, size=(inner, inner), mode="bilinear", align_corners=False)
    canvas = torch.zeros(n, 1, size, size)
    dy = torch.randint(0, size - inner + 1, (n,), generator=g)
    dx = torch.randint(0, size - inner + 1, (n,), generator=g)
    for i in range(n):
        canvas[i, :, dy[i] : dy[i] + inner, dx[i] : dx[i] + inner] = obj[i]
    tint = 0.5 + 0.5 * torch.rand(n, 3, 1, 1, generator=g)
    bg = 0.3 * torch.rand(n, 3, 1, 1, generator=g)
    img = bg * (1 - canvas) + tint * canvas + 0.03 * torch.randn(n, 3, size, size, generator=g)
    return (img - 0.5) * 2.0, Y[idx].clone()


# ---------------------------------------------------------------------------
# Crops of real photographs whose class is where they sit vertically, and which way up.

PHOTO_BANDS = 5
PHOTO_CLASSES = tuple((f"band {b} {'upside-down' if u else 'upright'}", ()) for b in range(PHOTO_BANDS) for u in (0, 1))
PHOTO_SHORT_SIDE = 192
_PHOTOS: dict[tuple[int, int], tuple[list[torch.Tensor], list[torch.Tensor]]] = {}


def photo_strips(images, size: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Split every photo (H, W, 3 arrays in [0, 1]) into a training part and a held-out
    test strip: the right-most ``size + 8`` columns. Every photo is in both splits, so the
    test crops are unseen pixels of seen photos (no test crop overlaps a training crop)."""
    import numpy as np

    from ..errors import UserError

    train, test = [], []
    for im in images:
        t = torch.from_numpy(np.ascontiguousarray(im, dtype=np.float32)).permute(2, 0, 1)
        cut = t.shape[2] - (size + 8)
        if cut < size or t.shape[1] < size + PHOTO_BANDS:
            raise UserError(f"a photo of {tuple(t.shape[1:])} pixels is too small for {size}-pixel crops with a held-out strip")
        train.append(t[:, :, :cut])
        test.append(t[:, :, cut:])
    return train, test


def _photo_splits(size: int):
    key = (PHOTO_SHORT_SIDE, size)
    if key not in _PHOTOS:
        from ..errors import UserError
        from ._kit import load_photos

        images, _ = load_photos(PHOTO_SHORT_SIDE)
        if len(images) < 2:
            raise UserError("fewer than 2 offline photographs found (install lomiri-wallpapers-16.04, mate-backgrounds, "
                            "plasma-workspace-wallpapers or scikit-image)")
        _PHOTOS[key] = photo_strips(images, size)
    return _PHOTOS[key]


def crop_photos(photos: list[torch.Tensor], n: int, size: int, g: torch.Generator, labels: torch.Tensor | None = None):
    """``n`` crops of ``photos`` ((3, H, W) tensors in [0, 1]); class ``2 * band + upside_down``:
    ``band`` is which of ``PHOTO_BANDS`` equal ranges of the crop's top row (0 .. H - size) it
    was cut at, counted from the top of the photo, and upside-down crops are rotated 180 degrees.
    Returns (n, 3, size, size) in [-1, 1] and labels (n,)."""
    labels = _labels(labels, 2 * PHOTO_BANDS, n, g)
    which = torch.randint(len(photos), (len(labels),), generator=g)
    u01, xs = torch.rand(len(labels), generator=g), torch.rand(len(labels), generator=g)
    cuts = []
    for i, lab in enumerate(labels.tolist()):
        im = photos[int(which[i])]
        band, upside = divmod(lab, 2)
        span = im.shape[1] - size + 1  # possible top rows
        lo, hi = band * span // PHOTO_BANDS, (band + 1) * span // PHOTO_BANDS
        cuts.append((int(which[i]), lo + min(hi - lo - 1, int(u01[i] * (hi - lo))), xs[i], upside))
    return _cut(photos, cuts, size), labels.clone()


def _labels(labels, classes: int, n: int, g: torch.Generator) -> torch.Tensor:
    """The given labels as a long tensor, or ``n`` drawn uniformly from ``classes``."""
    return torch.as_tensor(torch.randint(classes, (n,), generator=g) if labels is None else labels, dtype=torch.long)


def _cut(photos: list[torch.Tensor], cuts, size: int) -> torch.Tensor:
    """(photo index, top row, x as a fraction of the free width, upside-down) per crop ->
    (n, 3, size, size) in [-1, 1]; upside-down crops are rotated 180 degrees."""
    out = torch.empty(len(cuts), 3, size, size)
    for i, (k, y, fx, upside) in enumerate(cuts):
        im = photos[k]
        x = min(im.shape[2] - size, int(fx * (im.shape[2] - size + 1)))
        patch = im[:, y : y + size, x : x + size]
        out[i] = patch.flip(1, 2) if upside else patch
    return (out - 0.5) * 2.0


def make_photos(n: int, size: int = 56, generator: torch.Generator | None = None, labels: torch.Tensor | None = None,
                split: str = "train"):
    """Crops of the offline photographs (:func:`netanatomy.experiments._kit.load_photos`, shorter
    side 192 px): the class says which fifth of the photo's height the crop comes from and
    whether it is upside-down (10 classes), so vertical position and orientation carry the
    label. Training crops come from each photo but its right-most strip; test crops
    (``split="test"``) from that strip."""
    g = generator or torch.Generator().manual_seed(0)
    train, test = _photo_splits(size)
    return crop_photos(train if split == "train" else test, n, size, g, labels)


PHOTO_IDS = 5
PHOTO_ID_CLASSES = tuple((f"photo {i} {'upside-down' if u else 'upright'}", ()) for i in range(PHOTO_IDS) for u in (0, 1))


def crop_photo_ids(photos: list[torch.Tensor], n: int, size: int, g: torch.Generator, labels: torch.Tensor | None = None):
    """``n`` crops, anywhere, of the first ``PHOTO_IDS`` of ``photos``; class ``2 * photo +
    upside_down`` (upside-down crops rotated 180 degrees). Which photo takes texture and colour
    from the whole crop; which way up takes the vertical order of what is in it."""
    if len(photos) < PHOTO_IDS:
        from ..errors import UserError

        raise UserError(f"the photo-identity task needs {PHOTO_IDS} photographs, found {len(photos)}")
    labels = _labels(labels, 2 * PHOTO_IDS, n, g)
    ys, xs = torch.rand(len(labels), generator=g), torch.rand(len(labels), generator=g)
    cuts = []
    for i, lab in enumerate(labels.tolist()):
        which, upside = divmod(lab, 2)
        h = photos[which].shape[1]
        cuts.append((which, min(h - size, int(ys[i] * (h - size + 1))), xs[i], upside))
    return _cut(photos, cuts, size), labels.clone()


def make_photo_ids(n: int, size: int = 56, generator: torch.Generator | None = None, labels: torch.Tensor | None = None,
                   split: str = "train"):
    """Crops of five offline photographs: the class says which photo and which way up
    (10 classes). Training crops from each photo but its right-most strip, test crops from it."""
    g = generator or torch.Generator().manual_seed(0)
    train, test = _photo_splits(size)
    return crop_photo_ids(train if split == "train" else test, n, size, g, labels)


# name -> (generator(n, size, generator[, labels][, split]) -> (images, labels), classes)
DATASETS = {
    "scenes": (make_scenes, CLASSES),
    "topbottom": (make_topbottom, TB_CLASSES),
    "fashion": (make_fashion, FASHION_CLASSES),
    "photos": (make_photos, PHOTO_CLASSES),
    "photo_ids": (make_photo_ids, PHOTO_ID_CLASSES),
}
