from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

from damo_hybrid import EmbeddingStore, MemoryStorage, TableConfig
from damo_hybrid.ops import cuda_available

settings.register_profile(
    "ci", derandomize=True, deadline=None, max_examples=60,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile("ci")


def _cuda_available() -> bool:
    return cuda_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA and CuPy")
    for item in items:
        if "requires_cuda" in item.keywords:
            item.add_marker(skip)


StoreFactory = Callable[..., EmbeddingStore]


@pytest.fixture(params=["memory", "rocksdb"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreFactory]:
    """Builds a store over each backend: the contract suite runs on both."""
    opened: list[EmbeddingStore] = []

    def factory(tables: list[TableConfig], **kw: object) -> EmbeddingStore:
        if request.param == "memory":
            s = EmbeddingStore(None, tables, storage=MemoryStorage(), **kw)  # type: ignore[arg-type]
        else:
            s = EmbeddingStore(tmp_path / f"store{len(opened)}", tables, **kw)  # type: ignore[arg-type]
        opened.append(s)
        return s

    yield factory
    for s in opened:
        s.close()


def _snapshot(path) -> dict:
    """Every stored row of every table: table -> (keys, weights, state, counts), key-ordered."""
    from damo_hybrid.store import EmbeddingStore

    out = {}
    with EmbeddingStore(path, read_only=True) as s:
        for t in s.tables:
            parts = list(s.scan(t))
            if not parts:
                out[t] = (np.zeros(0, np.uint64),) * 4
                continue
            out[t] = tuple(np.concatenate(x) for x in zip(*[(k, r.weights, r.state, r.count) for k, r in parts]))
    return out


def _assert_same_rows(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for t in a:
        for x, y in zip(a[t], b[t]):
            np.testing.assert_array_equal(x, y, err_msg=f"table {t}")


@pytest.fixture
def snapshot():
    """``snapshot(store_dir)`` reads every row; ``snapshot.same(a, b)`` asserts two are equal."""
    _snapshot.same = _assert_same_rows
    return _snapshot
