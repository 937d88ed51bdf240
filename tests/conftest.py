from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from damo_hybrid import EmbeddingStore, MemoryStorage, TableConfig

settings.register_profile(
    "ci", derandomize=True, deadline=None, max_examples=60,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile("ci")


def _cuda_available() -> bool:
    if importlib.util.find_spec("cupy") is None:
        return False
    try:
        import cupy  # type: ignore[import-not-found]

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


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
