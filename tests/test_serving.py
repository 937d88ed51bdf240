"""The ONNX export of a trained model, served by onnxruntime from raw keys, equals the model."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from damo_hybrid import (
    CompressionConfig,
    EmbeddingStore,
    InitializerConfig,
    OptimizerConfig,
    TableConfig,
)
from damo_hybrid.data.synthetic import SyntheticCriteo
from damo_hybrid.nn.models import MODELS, model_tables
from damo_hybrid.pipeline.trainer import Trainer
from damo_hybrid.serving import export_onnx

pytest.importorskip("onnxruntime")
from damo_hybrid.serving import Predictor  # noqa: E402

OPT, INIT = OptimizerConfig.adagrad(0.05), InitializerConfig.normal(std=0.1)


COMPRESSED = {"qr mult": CompressionConfig.qr(10**6, 1000), "qr add 3": CompressionConfig.qr(10**6, 100, "add", 3),
              "binary code concat": CompressionConfig.binary_code(2**16, 4, "concat"),
              "double hash": CompressionConfig.double_hash(300, 2)}


def _two_tables(compression=None) -> list[TableConfig]:
    return [TableConfig("emb", 4, initializer=INIT, optimizer=OPT, compression=compression),
            TableConfig("lin", 1, optimizer=OPT)]


FIELD_TABLES = {"C2": "emb.C2", "C5": "emb.C5"}


def _tables(model: str, layout: str) -> list[TableConfig]:
    if layout == "fields on three tables":  # a field of its own compressed, another of 16-bit rows
        return [*model_tables(model, 4, OPT, INIT),
                *model_tables(model, 4, OPT, INIT, name="emb.C2", compression=COMPRESSED["binary code concat"]),
                *[dataclasses.replace(t, row_dtype="float16") for t in model_tables(model, 4, OPT, INIT, name="emb.C5")]]
    if layout == "qr, separate first-order table":
        return _two_tables(COMPRESSED["qr mult"])
    if layout == "one row per key":
        return model_tables(model, 4, OPT, INIT)
    if layout in COMPRESSED:
        return model_tables(model, 4, OPT, INIT, compression=COMPRESSED[layout])
    return _two_tables()


@pytest.mark.parametrize("model, layout", [("deepfm", "one row per key"), ("wide_deep", "two tables"),
                                           ("dcn", "one row per key"), ("dlrm", "one row per key"),
                                           ("deepfm", "qr mult"), ("dcn", "qr add 3"),
                                           ("wide_deep", "binary code concat"), ("dlrm", "double hash"),
                                           ("deepfm", "qr, separate first-order table"),
                                           ("deepfm", "fields on three tables"), ("dlrm", "fields on three tables")])
def test_predictions_equal_the_trained_models_eval_output(tmp_path, model, layout):
    torch.manual_seed(0)
    data = SyntheticCriteo(64, seed=1, vocab_min=50, vocab_max=400)
    with EmbeddingStore(tmp_path / "s", _tables(model, layout)) as store:
        kw = {"hidden": (16,)} if model != "dlrm" else {"top": (16,)}
        if layout == "fields on three tables":
            kw["field_tables"] = FIELD_TABLES
        m = MODELS[model](store, data.sparse_fields, len(data.dense_fields), cache_mb=1, min_cache_rows=512,
                          backend="cpu", **kw)
        Trainer(m, torch.optim.Adam(m.parameters(), lr=1e-2), data.batch).fit(6)
        export_onnx(m, tmp_path / "export")
        m.eval()
        b = data.batch(3)  # trained on: every key is stored
        with torch.no_grad():
            want = m(m.prepare(b.sparse), torch.from_numpy(b.dense)).numpy()
    got = Predictor(tmp_path / "export").predict(b.sparse, b.dense)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_unknown_keys_read_the_zero_row(tmp_path):
    data = SyntheticCriteo(32, seed=1, vocab_min=50, vocab_max=400)
    with EmbeddingStore(tmp_path / "s", model_tables("deepfm", 4, OPT, INIT)) as store:
        m = MODELS["deepfm"](store, data.sparse_fields, len(data.dense_fields), hidden=(8,), cache_mb=1,
                             min_cache_rows=512, backend="cpu")
        Trainer(m, torch.optim.Adam(m.parameters(), lr=1e-2), data.batch).fit(2)
        export_onnx(m, tmp_path / "export")
        m.eval()
        b = data.batch(0)
        never = {f: k + np.uint64(10**15) for f, k in b.sparse.items()}  # keys no table stored
        with torch.no_grad():
            # what the graph computes for them: every embedding and first-order weight zero
            e = torch.zeros(32, len(data.sparse_fields), m.dim)
            d = torch.from_numpy(b.dense)
            want = m.dense_part(e, torch.zeros(32), d, d).numpy()  # DeepFM's FM term is zero too
    got = Predictor(tmp_path / "export").predict(never, b.dense)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_cli_exports_the_latest_training_checkpoint(tmp_path, capsys):
    from damo_hybrid.cli import main
    from damo_hybrid.nn.models import DeepFM
    from damo_hybrid.pipeline.checkpoint import load_latest

    store = tmp_path / "s"
    assert main(["train", "--steps", "4", "--batch-size", "128", "--store", str(store), "--checkpoint-every", "2",
                 "--quiet", "--dim", "4"]) == 0
    assert main(["export", "--store", str(store), "--onnx", str(tmp_path / "onnx")]) == 0
    ck, state = load_latest(tmp_path / "s.ckpt")
    b = SyntheticCriteo(128, seed=0).batch(1)
    with EmbeddingStore(ck / "store", read_only=True) as s:
        m = DeepFM(s, state["model_spec"]["fields"], state["model_spec"]["n_dense"], backend="cpu")
        m.load_state_dict(state["model"])
        m.eval()
        with torch.no_grad():
            want = m(m.prepare(b.sparse), torch.from_numpy(b.dense)).numpy()
    np.testing.assert_allclose(Predictor(tmp_path / "onnx").predict(b.sparse, b.dense), want, atol=1e-5, rtol=0)
    assert main(["export", "--store", str(tmp_path / "nothing"), "--onnx", str(tmp_path / "o2")]) == 2
    assert "no complete training checkpoint" in capsys.readouterr().err
