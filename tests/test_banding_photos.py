"""The photos design of the banding experiment: dataset labels and the smoke config end to end."""

import torch

from netanatomy.experiments.scenes import PHOTO_BANDS, crop_photos, photo_strips


def _synthetic_photo(h=60, w=80):
    """Each pixel's red channel is its row / h, green its column / w."""
    rows = torch.arange(h).float().view(h, 1).expand(h, w) / h
    cols = torch.arange(w).float().view(1, w).expand(h, w) / w
    return torch.stack([rows, cols, torch.zeros(h, w)], dim=-1).numpy()


def test_photo_labels_give_band_and_orientation():
    size = 10
    train, test = photo_strips([_synthetic_photo()], size)
    assert train[0].shape[2] + test[0].shape[2] == 80 and test[0].shape[2] == size + 8
    labels = torch.arange(2 * PHOTO_BANDS).repeat(20)
    x, y = crop_photos(train, len(labels), size, torch.Generator().manual_seed(0), labels)
    assert torch.equal(y, labels)
    red = x[:, 0] / 2 + 0.5  # row / h
    span = 60 - size + 1
    for i, lab in enumerate(labels.tolist()):
        band, upside = divmod(lab, 2)
        col = red[i, :, 0]
        top = (col.min() * 60).round().int().item()
        assert band * span // PHOTO_BANDS <= top < (band + 1) * span // PHOTO_BANDS
        # upright crops get brighter downwards, upside-down ones darker
        assert (col[-1] > col[0]) == (not upside)


def test_photos_smoke_config_end_to_end(tmp_path, monkeypatch):
    from netanatomy.experiments import scenes
    from netanatomy.experiments.banding import run_experiment

    size = 28
    photos = [_synthetic_photo(64, 96), _synthetic_photo(70, 90)]
    monkeypatch.setitem(scenes._PHOTOS, (scenes.PHOTO_SHORT_SIDE, size), photo_strips(photos, size))
    torch.set_num_threads(1)
    res = run_experiment("photos_smoke", tmp_path, write=False)
    layers = {k for k in res.layers}
    assert ("baseline", "5b") in layers and ("xpool_rotate", "5a") in layers
    rows = res.table()
    assert {r["experiment"] for r in rows} == {"baseline", "rotate", "nopool", "xpool", "xpool_rotate"}
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows)
