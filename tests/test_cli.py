from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from damo_hybrid import EmbeddingStore, OptimizerConfig, TableConfig
from damo_hybrid.cli import main
from damo_hybrid.compat.seed_format import read_seed_format


def _store(path):
    with EmbeddingStore(path, [TableConfig("user", 4, optimizer=OptimizerConfig.sgd(0.1)),
                               TableConfig("item", 2)]) as s:
        k = np.array([1, 2, 3], np.uint64)
        s.apply_gradients("user", k, np.ones((3, 4), np.float32))
        s.apply_gradients("user", k[:1], np.ones((1, 4), np.float32))
        s.apply_gradients("item", k, np.ones((3, 2), np.float32))
        return s.lookup("user", k)


def test_demo_learns(capsys, tmp_path):
    assert main(["demo", "--steps", "30", "--batch-size", "512", "--fields", "3", "--store", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    first, last = (float(x) for x in out.split("logloss first 10 steps ")[1].split(" -> last 10 steps "))
    assert last < first  # the weights in RocksDB learned something
    assert "rows stored" in out


def test_inspect_export_dump(capsys, tmp_path):
    w = _store(tmp_path / "s")
    assert main(["inspect", "--store", str(tmp_path / "s"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["tables"]["user"]["rows"] == 3 and info["tables"]["user"]["step"] == 2
    assert info["tables"]["item"]["config"]["dim"] == 2
    assert main(["inspect", "--store", str(tmp_path / "s")]) == 0
    assert "user" in capsys.readouterr().out

    assert main(["export", "--store", str(tmp_path / "s"), "--out", str(tmp_path / "e.npz")]) == 0
    z = np.load(tmp_path / "e.npz")
    np.testing.assert_array_equal(z["keys_user"], [1, 2, 3])
    np.testing.assert_array_equal(z["weights_user"], w)

    assert main(["dump", "--store", str(tmp_path / "s"), "--out", str(tmp_path / "d.npz"),
                 "--min-count", "2", "--table", "user"]) == 0
    assert np.load(tmp_path / "d.npz")["keys_user"].tolist() == [1]
    assert main(["dump", "--store", str(tmp_path / "s"), "--out", str(tmp_path / "d.bin"), "--format", "seed"]) == 0
    groups = read_seed_format(tmp_path / "d.bin")
    assert sorted(len(k) for k, _ in groups.values()) == [3, 3]


def test_errors_are_one_line_and_exit_2(capsys, tmp_path):
    assert main(["inspect", "--store", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "error" in err and "Traceback" not in err


def test_console_script_entry_point():
    r = subprocess.run([sys.executable, "-m", "damo_hybrid.cli", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and "damo-hybrid" in r.stdout


def test_train_synthetic_learns_and_writes_summary(tmp_path, capsys):
    out = tmp_path / "s.json"
    rc = main(["train", "--steps", "40", "--batch-size", "512", "--dim", "8", "--vocab-min", "300",
               "--vocab-max", "3000", "--cache-mb", "16", "--eval-batches", "4", "--quiet",
               "--store", str(tmp_path / "store"), "--json", str(out)])
    assert rc == 0
    s = json.loads(out.read_text())
    for k in ("samples_per_s", "auc", "logloss", "steps", "hit_rate", "evictions", "peak_rss_mb"):
        assert k in s
    assert s["steps"] == 40 and s["samples_per_s"] > 0
    assert s["auc"] > 0.65  # labels depend on the ids: the embeddings in RocksDB learned them
    assert "eval AUC" in capsys.readouterr().out
    with EmbeddingStore(tmp_path / "store") as st:
        assert st.step("emb") == 40 and st.count_rows("emb") > 0


def test_demo_refuses_a_store_of_other_tables(tmp_path, capsys):
    from damo_hybrid import EmbeddingStore, TableConfig

    with EmbeddingStore(tmp_path / "s", [TableConfig("emb", 4)]):
        pass
    assert main(["demo", "--store", str(tmp_path / "s"), "--steps", "2"]) == 2
    assert "holds other tables (emb)" in capsys.readouterr().err
    with EmbeddingStore(tmp_path / "s", read_only=True) as s:
        assert list(s.tables) == ["emb"]  # nothing was added


def test_train_banner_says_when_the_row_floor_overrides_the_cache_budget(tmp_path, capsys):
    argv = ["train", "--quiet", "--steps", "1", "--batch-size", "64", "--dim", "4", "--vocab-min", "50",
            "--vocab-max", "100", "--eval-batches", "0", "--threads", "1", "--cache-mb", "0.01"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "--cache-mb 0.01" in out and "floor of 65,536 rows per table" in out


def test_train_with_another_lr_on_a_store_refuses_before_touching_it(tmp_path, capsys):
    argv = ["train", "--quiet", "--steps", "2", "--batch-size", "64", "--dim", "4", "--vocab-min", "50",
            "--vocab-max", "100", "--eval-batches", "0", "--threads", "1", "--store", str(tmp_path / "s")]
    assert main(argv + ["--lr", "0.05"]) == 0
    capsys.readouterr()
    assert main(argv + ["--lr", "0.2"]) == 2
    err = capsys.readouterr().err
    assert "optimizer.lr: 0.05 -> 0.2" in err and "--allow-config-change" in err and len(err.strip().splitlines()) == 1
    with EmbeddingStore(tmp_path / "s", read_only=True) as s:
        assert s.step("emb") == 2 and s.tables["emb"].optimizer.lr == 0.05
    assert main(argv + ["--lr", "0.2", "--allow-config-change"]) == 0  # fine-tuning with a new lr, on purpose
    with EmbeddingStore(tmp_path / "s", read_only=True) as s:
        assert s.step("emb") == 4 and s.tables["emb"].optimizer.lr == 0.2
