"""ONNX export of every registered model: ONNX Runtime parity, the TensorRT operator check, int8,
the predictor API for .pt/.onnx(/.engine) and the bad inputs.

Tolerances (ONNX Runtime CPU against PyTorch eager, fp32 PyTorch as the reference):

- fp32 export: ``|onnx - torch| <= 1e-4 + 1e-4 * |torch|`` on every map pixel and score;
- fp16 export: max ``|onnx - torch|`` <= 1% of the largest ``|torch|`` map value (scores too);
- ranking: image AUROC on the demo test set equal to PyTorch's within 0.005 (rd4ad, trained).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from sklearn.metrics import roc_auc_score

import fastuad
from fastuad.data.demo import make_demo_dataset
from fastuad.deploy import DeployError, load
from fastuad.engine import TrainConfig, _build_dataset, train
from fastuad.export import ExportError, calibration_images, quantize_int8, read_metadata, to_onnx, trt_operator_table, trt_violations
from fastuad.export.tensorrt import TensorRTUnavailableError, build_engine, tensorrt_available
from fastuad.models import ModelError, create_model, list_models

ort = pytest.importorskip("onnxruntime")

SIZE = 64
FP32_ATOL = FP32_RTOL = 1e-4
FP16_REL = 1e-2
AUROC_TOL = 0.005
HAS_TRT, TRT_REASON = tensorrt_available()


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _fill_memory(model, size: int = SIZE) -> None:
    """Models with banks/memories (PatchCore, DM-GRD, MDD-Net) fill them from a tiny random 'training set'."""
    if not hasattr(model, "fit_memory"):
        return
    g = torch.Generator().manual_seed(3)
    samples = [
        {"image": torch.randn(3, size, size, generator=g), "mask": torch.zeros(1, size, size), "label": 0,
         "class_index": i % 2, "class_name": "ab"[i % 2], "path": str(i)}
        for i in range(4)
    ]
    model.eval()
    with torch.no_grad():
        model.fit_memory(torch.utils.data.DataLoader(samples, batch_size=2), 0, False)


def _build(name: str, sizes: tuple[int, ...] = (SIZE,)):
    """The model at the first size it accepts (a model whose windows need a larger grid says so)."""
    for size in sizes:
        torch.manual_seed(0)
        try:
            model = create_model(name, weights="random", image_size=size).eval()
        except ModelError:
            if size == sizes[-1]:
                raise
            continue
        _fill_memory(model, size)
        return model.eval()


def _session(path) -> "ort.InferenceSession":
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _check_fp32(got: np.ndarray, want: torch.Tensor, what: str) -> float:
    want = want.float().numpy()
    err = np.abs(got - want)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    bad = err > FP32_ATOL + FP32_RTOL * np.abs(want)
    assert not bad.any(), f"{what}: max |error| {err.max():.3e} beyond {FP32_ATOL} + {FP32_RTOL}*|ref|"
    return float(err.max())


@pytest.fixture(scope="module", params=list_models())
def exported(request, tmp_path_factory):
    """One model of the registry exported at 64 px: fp32 and fp16, dynamic batch (fixed batches: rd4ad below)."""
    name = request.param
    model = _build(name, (SIZE, 2 * SIZE))
    d = tmp_path_factory.mktemp(f"export_{name}")
    files = {
        "fp32": to_onnx(model, d / "fp32.onnx", dynamic_batch=True, class_names=["a", "b"]),
        "fp16": to_onnx(model, d / "fp16.onnx", dynamic_batch=True, fp16=True),
    }
    return name, model, files


def test_fp32_export_matches_pytorch_on_random_images(exported):
    name, model, files = exported
    size = model.config["image_size"]
    sess = _session(files["fp32"])
    for b in (1, 3):  # dynamic batch: another batch than the traced one
        x = torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(100 + b))  # not the fill images
        with torch.no_grad():
            amap, score = model(x)
        got_map, got_score = sess.run(None, {"images": x.numpy()})
        _check_fp32(got_map, amap, f"{name} map B={b}")
        _check_fp32(got_score, score, f"{name} score B={b}")


def test_fp16_export_within_one_percent(exported):
    name, model, files = exported
    size = model.config["image_size"]
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        amap, score = model(x)
    got_map, got_score = _session(files["fp16"]).run(None, {"images": x.numpy()})
    bound = FP16_REL * float(amap.abs().max())
    assert got_map.dtype == np.float32 and got_map.shape == tuple(amap.shape)
    assert np.abs(got_map - amap.numpy()).max() <= bound, f"{name} fp16 map error beyond {bound:.3e}"
    assert np.abs(got_score - score.numpy()).max() <= bound


def test_every_node_is_in_tensorrts_onnx_parser_table(exported):
    name, _, files = exported
    for kind, path in files.items():
        assert trt_violations(path) == [], f"{name} {kind}: TensorRT would refuse these nodes"


def test_metadata_names_model_size_normalisation_and_classes(exported):
    name, model, files = exported
    meta = read_metadata(files["fp32"])
    assert meta["model"] == name and meta["image_size"] == model.config["image_size"] and meta["batch"] == "dynamic"
    assert meta["mean"] == [0.485, 0.456, 0.406] and meta["std"] == [0.229, 0.224, 0.225]
    assert meta["class_names"] == ["a", "b"] and meta["version"] == fastuad.__version__
    assert meta["config"]["name"] == name and read_metadata(files["fp16"])["precision"] == "fp16"


# ------------------------------------------------------------------------------------------
# The ops lower to standard ONNX on their own (covers models not yet registered)
# ------------------------------------------------------------------------------------------


class _AllOps(torch.nn.Module):
    """Every fused op once, as a model would call it (banks as buffers), and every fastuad.nn layer."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("mem", torch.randn(10, 16, generator=g))
        self.register_buffer("class_mem", torch.randn(3, 10, 16, generator=g))
        self.register_buffer("bank", torch.randn(50, 16, generator=g))
        layers = fastuad.nn
        self.lca = layers.LocalCrossAttention(16, 2, 3, grid_size=8)
        self.nma = layers.NeighborMaskedAttention(16, 2, 3)
        self.memory = layers.MemoryModule(12, 16)
        self.class_memory = layers.MemoryModule(12, 16, num_classes=3)
        self.membank = layers.MemoryBank(16).fit(torch.randn(40, 16, generator=g))
        self.cosmap = layers.CosineDistanceMap(out_size=32, reduction="mean", blur_sigma=2)

    def layers(self, x: torch.Tensor):
        t = x.permute(0, 2, 3, 1)  # [B, 8, 8, 16] channels last
        cross = self.lca(t)
        masked = self.nma(t, key=self.lca.reference, value=t)  # RLR: key from the batch-1 reference
        read = self.memory(t)
        read_cls = self.class_memory(t, class_index=torch.zeros(t.shape[0], dtype=torch.int64))
        nn_d, _ = self.membank(t.reshape(-1, 16), k=2)
        amap = self.cosmap([x], [x.flip(-1)])
        return cross, masked, read, read_cls, nn_d, amap

    def forward(self, x: torch.Tensor):  # x [B, 16, 8, 8]
        ops = fastuad.ops
        b = x.shape[0]
        amap = ops.cosine_distance_map([x, x[:, :, ::2, ::2]], [x.flip(-1), 2 * x[:, :, ::2, ::2] + 0.1], out_size=32, reduction="sum", blur_sigma=4.0)
        dist = ops.cosine_distance(x, x.flip(-2))
        q = x.permute(0, 2, 3, 1).reshape(-1, 16)
        read = ops.memory_read(q, self.mem, shrink_threshold=0.05)
        read_cls = ops.memory_read(q, self.class_mem, class_index=torch.zeros(q.shape[0], dtype=torch.int64))
        nn_d, _ = ops.knn(q, self.bank, k=3)
        t = x.permute(0, 2, 3, 1).reshape(b, 8, 8, 2, 8)
        inside = ops.local_attention(t, 0.5 * t, t, window=3, mode="inside")
        outside = ops.local_attention(t, 0.5 * t, t, window=3, mode="outside")
        return (amap, dist, read, read_cls, nn_d.reshape(b, -1), inside, outside, *self.layers(x))


def test_every_fused_op_lowers_to_tensorrt_parsable_onnx(tmp_path):
    mod = _AllOps().eval()
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    path = tmp_path / "ops.onnx"
    with fastuad.ops.trace() as calls, torch.no_grad(), fastuad.ops.force_backend("triton"):
        torch.onnx.export(mod, (x,), str(path), dynamo=False, opset_version=17, input_names=["x"], dynamic_axes={"x": {0: "b"}})
    assert {c.op for c in calls} == {"cosine_distance_map", "cosine_distance", "memory_read", "knn", "local_attention"}
    assert {c.backend for c in calls} == {"torch"}, "exporting must override any forced backend"
    ops_used = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"Range", "OneHot", "Loop", "ScatterND"}.isdisjoint(ops_used), ops_used  # constants, no index arithmetic
    assert trt_violations(path) == []
    sess = _session(path)
    for b in (2, 3):
        xb = torch.randn(b, 16, 8, 8, generator=torch.Generator().manual_seed(b))
        with torch.no_grad():
            want = mod(xb)
        for got, ref in zip(sess.run(None, {"x": xb.numpy()}), want):
            np.testing.assert_allclose(got, ref.numpy(), atol=2e-5, rtol=1e-4)


def test_adaptive_pooling_over_a_reshaped_dynamic_batch_exports(tmp_path):
    """PatchCore-style channel pooling: the exporter lowers it to a constant averaging matmul."""

    class Pool(torch.nn.Module):
        def forward(self, x):
            b, c, h, w = x.shape
            flat = x.permute(0, 2, 3, 1).reshape(-1, 1, c)
            return torch.nn.functional.adaptive_avg_pool1d(flat, 7).reshape(b, h, w, 7)

    x = torch.randn(2, 24, 4, 4)
    path = tmp_path / "pool.onnx"
    with fastuad.ops.exporting():  # the lowering is active inside to_onnx's trace; use the same helper
        from fastuad.export.onnx_export import _lowered_functions

        with _lowered_functions():
            torch.onnx.export(Pool(), (x,), str(path), dynamo=False, opset_version=17, input_names=["x"], dynamic_axes={"x": {0: "b"}})
    assert torch.nn.functional.adaptive_avg_pool1d is not None and "matmul" not in torch.nn.functional.adaptive_avg_pool1d.__name__
    xb = torch.randn(3, 24, 4, 4)
    got = _session(path).run(None, {"x": xb.numpy()})[0]
    np.testing.assert_allclose(got, Pool()(xb).numpy(), atol=1e-6, rtol=1e-5)
    assert trt_violations(path) == []


def test_force_backend_overrides_the_callers_choice():
    a = torch.randn(1, 4, 3, 3)
    with fastuad.ops.trace() as calls:
        with fastuad.ops.force_backend("torch"):
            fastuad.ops.cosine_distance(a, a + 1, backend="auto")
        fastuad.ops.cosine_distance(a, a + 1, backend="torch")
    assert [c.backend for c in calls] == ["torch", "torch"]
    with pytest.raises(ValueError, match="backend must be one of"):
        with fastuad.ops.force_backend("fast"):
            pass
    with pytest.raises(fastuad.ops.BackendUnavailableError, match="cuda"):
        with fastuad.ops.force_backend("cuda"):
            fastuad.ops.cosine_distance(a, a + 1)


# ------------------------------------------------------------------------------------------
# The TensorRT operator table and its checker
# ------------------------------------------------------------------------------------------


def test_pinned_table_names_its_tensorrt_version_and_source():
    table = trt_operator_table()
    assert table["tensorrt"].startswith("10.") and "onnx-tensorrt" in table["source"] and len(table["source_commit"]) == 40
    assert table["opset_range"] == [9, 20]
    ops = table["operators"]
    assert ops["Conv"]["supported"] and not ops["Unique"]["supported"] and "sorted" in ops["TopK"]["restrictions"]


def test_checker_reports_what_tensorrt_refuses():
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    k_in = helper.make_tensor_value_info("k", TensorProto.INT64, [1])
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("u", "r", "v", "q")]
    scales = helper.make_tensor("scales", TensorProto.FLOAT, [2], [1.0, 2.0])
    zp = helper.make_tensor("zp", TensorProto.INT8, [], [3])
    qs = helper.make_tensor("qs", TensorProto.FLOAT, [], [0.1])
    nodes = [
        helper.make_node("Unique", ["x"], ["u"]),
        helper.make_node("Resize", ["x", "", "scales"], ["r"], mode="cubic"),
        helper.make_node("TopK", ["x", "k"], ["v", "i"], sorted=0),
        helper.make_node("QuantizeLinear", ["x", "qs", "zp"], ["q8"]),
        helper.make_node("DequantizeLinear", ["q8", "qs", "zp"], ["q"]),
    ]
    graph = helper.make_graph(nodes, "bad", [x, k_in], outs, initializer=[scales, zp, qs])
    problems = "\n".join(trt_violations(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])))
    assert "Unique" in problems and "mode 'cubic'" in problems
    assert "sorted must be 1" in problems and "input 1 ('k') must be a build-time constant" in problems
    assert "zero point must be 0" in problems


# ------------------------------------------------------------------------------------------
# A trained RD4AD on the demo set: ranking, int8, predictors, CLI
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    work = tmp_path_factory.mktemp("demo")
    root = make_demo_dataset(work / "data", image_size=SIZE, n_train=6, n_test_good=4, n_test_per_defect=2)
    torch.set_num_threads(1)
    cfg = TrainConfig(model="rd4ad", dataset="mvtec", data_root=str(root), out=str(work / "ckpt"), epochs=2, batch_size=8,
                      image_size=SIZE, evaluate=False, progress=False)
    ckpt = train(cfg)["checkpoint"]
    test_set = _build_dataset("mvtec", str(root), "test", None, SIZE)
    images = torch.stack([test_set[i]["image"] for i in range(len(test_set))])
    labels = np.array([int(test_set[i]["label"]) for i in range(len(test_set))])
    classes = [test_set[i]["class_name"] for i in range(len(test_set))]
    return {"root": root, "ckpt": ckpt, "work": work, "images": images, "labels": labels, "classes": classes}


def _mean_image_auroc(scores: np.ndarray, labels: np.ndarray, classes: list[str]) -> float:
    names = sorted(set(classes))
    cls = np.array(classes)
    return float(np.mean([roc_auc_score(labels[cls == c], scores[cls == c]) for c in names]))


def test_trained_rd4ad_onnx_keeps_the_maps_and_the_image_ranking(trained, tmp_path, capsys):
    torch_pred = load(trained["ckpt"])
    path = tmp_path / "rd4ad.onnx"
    code, out, err = _cli(capsys, "export", "--checkpoint", trained["ckpt"], "--format", "onnx", "--out", str(path), "--dynamic-batch")
    assert code == 0, err
    assert "TensorRT-parsable" in out
    onnx_pred = load(path)
    assert onnx_pred.class_names == ["brick", "chelsea", "coffee", "grass", "gravel"] == torch_pred.class_names
    t_map, t_score = torch_pred.predict(trained["images"])
    o_map, o_score = onnx_pred.predict(trained["images"])
    _check_fp32(o_map.numpy(), t_map, "demo map")
    _check_fp32(o_score.numpy(), t_score, "demo score")
    auroc_t = _mean_image_auroc(t_score.numpy(), trained["labels"], trained["classes"])
    auroc_o = _mean_image_auroc(o_score.numpy(), trained["labels"], trained["classes"])
    assert abs(auroc_t - auroc_o) <= AUROC_TOL, (auroc_t, auroc_o)
    assert auroc_t > 0.6  # trained, not random: the ranking being compared means something


def test_int8_is_calibrated_on_normal_training_images_and_keeps_most_accuracy(trained, tmp_path):
    fp32 = to_onnx(load(trained["ckpt"]).model, tmp_path / "fp32.onnx", batch=4)
    calib = calibration_images(trained["root"], SIZE, limit=16)
    assert calib.shape == (16, 3, SIZE, SIZE)
    int8 = quantize_int8(fp32, tmp_path / "int8.onnx", calib)
    assert read_metadata(int8)["precision"] == "int8"
    assert trt_violations(int8) == []  # symmetric Q/DQ: TensorRT-parsable too
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(str(int8)).graph.node)
    scores = {k: load(p).predict(trained["images"])[1].numpy() for k, p in (("fp32", fp32), ("int8", int8))}
    aurocs = {k: _mean_image_auroc(s, trained["labels"], trained["classes"]) for k, s in scores.items()}
    assert aurocs["int8"] >= aurocs["fp32"] - 0.1, aurocs
    assert not np.allclose(scores["int8"], scores["fp32"])  # really quantized


def test_predictors_share_one_api_and_predict_paths(trained, tmp_path, capsys):
    paths = sorted(str(p) for p in (trained["root"] / "brick" / "test").rglob("*.png"))[:5]
    pt = load(trained["ckpt"])
    b1 = load(to_onnx(pt.model, tmp_path / "b1.onnx"))  # fixed batch 1: predict chunks
    assert b1.batch == 1 and b1.session.get_inputs()[0].shape == [1, 3, SIZE, SIZE]
    assert trt_violations(tmp_path / "b1.onnx") == []
    m_pt, s_pt = pt.predict_paths(paths, batch_size=2)
    m_b1, s_b1 = b1.predict_paths(paths, batch_size=2)
    assert m_pt.shape == (5, 1, SIZE, SIZE) and s_pt.shape == (5,)
    _check_fp32(m_b1.numpy(), m_pt, "predict_paths map")
    _check_fp32(s_b1.numpy(), s_pt, "predict_paths score")
    out = tmp_path / "heat"
    code, _, err = _cli(capsys, "predict", "--checkpoint", str(tmp_path / "b1.onnx"), *paths[:2], "--out", str(out), "--device", "cpu", "--threads", "1")
    assert code == 0, err
    assert len(list(out.glob("*_heatmap.png"))) == 2


def test_bad_inputs_name_the_cause(trained, tmp_path):
    pred = load(trained["ckpt"])
    with pytest.raises(DeployError, match=r"images must be \[B, 3, 64, 64\].*got \[1, 3, 32, 32\]"):
        pred.predict(torch.zeros(1, 3, 32, 32))
    with pytest.raises(DeployError, match="unknown format '.bin'"):
        load(tmp_path / "model.bin")
    plain = tmp_path / "plain.onnx"
    torch.onnx.export(torch.nn.Conv2d(3, 1, 1), (torch.zeros(1, 3, 8, 8),), str(plain), dynamo=False)
    with pytest.raises(ExportError, match="not a fastuad export"):
        load(plain)
    old = tmp_path / "old.onnx"
    proto = onnx.load(str(to_onnx(pred.model, tmp_path / "cur.onnx")))
    for p in proto.metadata_props:
        if p.key == "fastuad.format":
            p.value = "fastuad-onnx-v0"
    onnx.save(proto, str(old))
    with pytest.raises(ExportError, match="format 'fastuad-onnx-v0'.*re-export"):
        load(old)
    ck = torch.load(trained["ckpt"], weights_only=False)
    ck["config"]["name"] = "no_such_model"
    torch.save(ck, tmp_path / "other.pt")
    with pytest.raises(fastuad.errors.FastUADError, match="no_such_model"):
        load(tmp_path / "other.pt")
    ck["format"] = "fastuad-checkpoint-v0"
    torch.save(ck, tmp_path / "v0.pt")
    with pytest.raises(DeployError, match="not a fastuad checkpoint"):
        load(tmp_path / "v0.pt")
    with pytest.raises(ExportError, match="either batch=N .* or dynamic_batch"):
        to_onnx(pred.model, tmp_path / "x.onnx", batch=2, dynamic_batch=True)
    with pytest.raises(ExportError, match=r"opset must be an int in \[17, 20\]"):
        to_onnx(pred.model, tmp_path / "x.onnx", opset=13)
    with pytest.raises(ExportError, match="no model.config"):
        to_onnx(torch.nn.Conv2d(3, 1, 1), tmp_path / "x.onnx")


def test_other_image_size_and_external_data(tmp_path):
    model = _build("rd4ad")
    path = to_onnx(model, tmp_path / "big.onnx", image_size=96, external_data=True)
    assert (tmp_path / "big.onnx.data").stat().st_size > 1_000_000
    pred = load(path)
    assert pred.image_size == 96
    amap, score = pred.predict(torch.randn(1, 3, 96, 96))
    ref = create_model("rd4ad", weights="random", image_size=96)
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        want_map, _ = ref.eval()(torch.zeros(1, 3, 96, 96))
    assert amap.shape == (1, 1, 96, 96) and score.shape == (1,)
    _check_fp32(pred.predict(torch.zeros(1, 3, 96, 96))[0].numpy(), want_map, "96 px map")


# ------------------------------------------------------------------------------------------
# TensorRT (runs where tensorrt imports and a GPU is visible)
# ------------------------------------------------------------------------------------------


def test_trt_export_without_tensorrt_says_what_to_install(trained, tmp_path, capsys):
    if HAS_TRT:
        pytest.skip("tensorrt is available here; the engine test covers this path")
    code, _, err = _cli(capsys, "export", "--checkpoint", trained["ckpt"], "--format", "trt", "--out", str(tmp_path / "m.engine"))
    assert code == 2 and "pip install tensorrt" in err
    with pytest.raises(TensorRTUnavailableError, match="tensorrt"):
        build_engine(to_onnx(load(trained["ckpt"]).model, tmp_path / "m.onnx", dynamic_batch=True), tmp_path / "m.engine")


@pytest.mark.skipif(not HAS_TRT, reason=f"TensorRT engine path: {TRT_REASON}")
def test_tensorrt_engine_matches_pytorch_and_checks_its_profile(trained, tmp_path):  # pragma: no cover - needs TensorRT
    onnx_path = to_onnx(load(trained["ckpt"]).model, tmp_path / "m.onnx", dynamic_batch=True)
    engine = build_engine(onnx_path, tmp_path / "m.engine", min_batch=1, opt_batch=4, max_batch=8)
    pred, ref = load(engine, "cuda"), load(trained["ckpt"])
    x = trained["images"][:4]
    got_map, got_score = pred.predict(x)
    want_map, want_score = ref.predict(x)
    assert (got_map - want_map).abs().max() <= 1e-3 * max(1.0, float(want_map.abs().max()))
    with pytest.raises(ExportError, match="outside the engine's profile"):
        pred.predict(trained["images"][:9])


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run ``fastuad ARGS`` in this process (a subprocess would re-import torch and timm)."""
    from fastuad.cli import main

    before = torch.get_num_threads()
    try:
        code = main(list(args))
    finally:
        torch.set_num_threads(before)
    captured = capsys.readouterr()
    return code, captured.out, captured.err
