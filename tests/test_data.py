from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from damo_hybrid.cli import main
from damo_hybrid.data.readers import CriteoTSV
from damo_hybrid.keys.hashing import hash_feature

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "criteo_dac_head8k"


def _line(label="0", ints=None, cats=None):
    ints = ints if ints is not None else [str(i) for i in range(13)]
    cats = cats if cats is not None else [f"{i:08x}" for i in range(26)]
    return "\t".join([label, *ints, *cats]) + "\n"


def test_parses_rows_missing_values_and_gzip(tmp_path):
    lines = [_line("1"), _line("0", ints=[""] * 12 + ["-1"], cats=[""] * 26)]
    p = tmp_path / "d.tsv.gz"
    with gzip.open(p, "wt") as f:
        f.writelines(lines)
    d = CriteoTSV(p, batch_size=1)
    assert d.n == 2 and d.batches_per_epoch == 2
    b0, b1 = d.batch(0), d.batch(1)
    np.testing.assert_array_equal(b0.label, [1.0])
    np.testing.assert_allclose(b0.dense[0], np.log1p(np.arange(13)), rtol=1e-6)
    np.testing.assert_array_equal(b1.dense, np.zeros((1, 13), np.float32))  # missing and negative -> 0
    assert b0.sparse["C1"][0] == hash_feature("C1", ["00000000"])[0]
    assert b1.sparse["C1"][0] == hash_feature("C1", [""])[0]
    np.testing.assert_array_equal(d.batch(2).label, b0.label)  # epochs wrap


@pytest.mark.parametrize("content, match", [
    (_line() + "1\t2\t3\n", r"d.tsv:2: 3 columns, expected 40"),
    (_line("yes"), r"d.tsv:1: label 'yes' is not a number"),
    (_line("2"), r"d.tsv:1: label '2' is not 0 or 1"),
    (_line("0", ints=["x"] + ["1"] * 12), r"d.tsv:1: I1 value 'x' is not a number"),
    ("", "holds no rows"),
])
def test_bad_files_name_file_and_line(tmp_path, content, match):
    p = tmp_path / "d.tsv"
    p.write_text(content)
    with pytest.raises(ValueError, match=match):
        CriteoTSV(p)


def test_truncated_gzip_is_a_clear_error(tmp_path):
    p = tmp_path / "d.tsv.gz"
    with gzip.open(p, "wt") as f:
        f.writelines([_line()] * 2000)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="unreadable after"):
        CriteoTSV(p)


@pytest.mark.skipif(not (SHARED / "criteo_train.tsv.gz").exists(), reason="shared Criteo sample not present")
def test_train_on_the_real_criteo_sample(tmp_path, capsys):
    rc = main(["train", "--data", str(SHARED / "criteo_train.tsv.gz"), "--eval-data", str(SHARED / "criteo_test.tsv.gz"),
               "--batch-size", "512", "--epochs", "2", "--dim", "8", "--cache-mb", "16", "--quiet",
               "--store", str(tmp_path / "s")])
    assert rc == 0
    out = capsys.readouterr().out
    auc = float(out.split("eval AUC ")[1].split()[0])
    assert auc > 0.6  # real labels learned from real ids
