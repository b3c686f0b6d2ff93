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


def test_xpool_control_on_hand_made_weights():
    from netanatomy.experiments.banding import CONFIGS, analyse_runs, xpool_control

    g = torch.Generator().manual_seed(0)
    cfg = CONFIGS["quick"]
    shapes = {"1": (4, 3, 3, 3), "2": (8, 4, 3, 3), "3a": (8, 8, 3, 3), "3b": (8, 8, 3, 3), "5a": (12, 8, 3, 3), "5b": (12, 12, 3, 3)}

    def weights(banded_5a: bool):
        w = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
        if banded_5a:  # constant along x: every row of every kernel the same value
            w["5a"] = torch.randn(12, 8, 3, 1, generator=g).expand(12, 8, 3, 3).clone()
        return w

    runs = {name: {"weights": weights(name == "xpool"), "accuracy": 0.5} for name in ("baseline", "xpool", "xpool_rotate")}
    res = analyse_runs(cfg, runs, layers=("5a", "5b"))
    out = xpool_control([res, res])
    row = out["rows"][0]
    assert row["xpool_horizontal"] > 0.9 and row["baseline_horizontal"] < 0.5 and row["xpool_rotate_horizontal"] < 0.5
    assert out["moved_earlier_every_seed"] and out["spread"]["xpool_horizontal"] == 0.0
