"""Frozen, validated configuration objects.

Every config validates itself in ``__post_init__`` and names the bad value in
its error. Hot paths never read these objects field by field per key: the
store decomposes them into plain attributes once, at open time.

Example:
    >>> from damo_hybrid import TableConfig, OptimizerConfig, InitializerConfig
    >>> cfg = TableConfig(
    ...     name="user_id",
    ...     dim=16,
    ...     initializer=InitializerConfig.normal(std=0.01),
    ...     optimizer=OptimizerConfig.adagrad(lr=0.05),
    ... )
"""

from __future__ import annotations

import enum
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from .checks import clip as _clip
from .checks import finite as _finite
from .checks import int_at_least as _int_at_least
from .checks import member as _member
from .checks import non_negative as _non_negative
from .checks import positive as _positive
from .checks import reject_unknown
from .checks import unit_interval as _unit_interval
from .keys.compression import CompressionConfig
from .precision import DEFAULT_INT16_STEP, RowDtype, check_int16_step

__all__ = ["InitializerKind", "InitializerConfig", "OptimizerKind", "OptimizerConfig", "ScheduleKind",
           "ScheduleConfig", "AdmissionConfig", "ExpiryConfig", "NonFinitePolicy", "TableConfig", "StoreConfig",
           "RowDtype"]

_TABLE_NAME = re.compile(r"^[A-Za-z0-9_.:\-]{1,128}$")


class InitializerKind(str, enum.Enum):
    ZEROS = "zeros"
    ONES = "ones"
    UNIFORM = "uniform"
    NORMAL = "normal"
    TRUNCATED_NORMAL = "truncated_normal"
    XAVIER_UNIFORM = "xavier_uniform"


@dataclass(frozen=True)
class InitializerConfig:
    """How a row that was never stored is initialised.

    Rows are a pure function of ``(seed, table name, key)``; see
    :mod:`damo_hybrid.rows.initializers`.

    Attributes:
        kind: which distribution.
        low, high: bounds of ``uniform``.
        mean, std: parameters of ``normal`` and ``truncated_normal`` (the
            latter is cut at ``mean +- 2 std``).
        seed: 64-bit seed mixed into every row.
    """

    kind: InitializerKind = InitializerKind.NORMAL
    low: float = -0.01
    high: float = 0.01
    mean: float = 0.0
    std: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", _member(InitializerKind, "initializer kind", self.kind))
        for n in ("low", "high", "mean"):
            _finite(n, getattr(self, n))
        _non_negative("std", self.std)
        if self.kind is InitializerKind.UNIFORM and not self.low < self.high:
            raise ValueError(f"uniform initializer needs low < high, got low={self.low}, high={self.high}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**64:
            raise ValueError(f"seed must be an int in [0, 2**64), got {_clip(self.seed)}")

    @classmethod
    def zeros(cls) -> InitializerConfig:
        return cls(kind=InitializerKind.ZEROS)

    @classmethod
    def ones(cls) -> InitializerConfig:
        return cls(kind=InitializerKind.ONES)

    @classmethod
    def uniform(cls, low: float = -0.01, high: float = 0.01, seed: int = 0) -> InitializerConfig:
        return cls(kind=InitializerKind.UNIFORM, low=low, high=high, seed=seed)

    @classmethod
    def normal(cls, mean: float = 0.0, std: float = 0.01, seed: int = 0) -> InitializerConfig:
        return cls(kind=InitializerKind.NORMAL, mean=mean, std=std, seed=seed)

    @classmethod
    def truncated_normal(cls, mean: float = 0.0, std: float = 0.01, seed: int = 0) -> InitializerConfig:
        return cls(kind=InitializerKind.TRUNCATED_NORMAL, mean=mean, std=std, seed=seed)

    @classmethod
    def xavier_uniform(cls, seed: int = 0) -> InitializerConfig:
        return cls(kind=InitializerKind.XAVIER_UNIFORM, seed=seed)


class ScheduleKind(str, enum.Enum):
    CONSTANT = "constant"
    EXPONENTIAL = "exponential"
    POLYNOMIAL = "polynomial"
    NATURAL_EXPONENTIAL = "natural_exponential"
    INVERSE_TIME = "inverse_time"
    COSINE = "cosine"
    LINEAR_COSINE = "linear_cosine"


@dataclass(frozen=True)
class ScheduleConfig:
    """Learning-rate schedule, a function of the table's global step.

    Formulas (``t`` = global step, ``T`` = ``decay_steps``, ``lr0`` = base lr):

    - constant: ``lr0``
    - exponential: ``lr0 * decay_rate ** (t / T)`` (``staircase`` floors ``t / T``)
    - polynomial: ``(lr0 - end_lr) * (1 - min(t, T) / T) ** power + end_lr``
    - natural_exponential: ``lr0 * exp(-decay_rate * t / T)``
    - inverse_time: ``lr0 / (1 + decay_rate * t / T)``
    - cosine: ``lr0 * (alpha + (1 - alpha) * 0.5 * (1 + cos(pi * min(t, T) / T)))``
    - linear_cosine: ``lr0 * ((alpha + (T - t') / T) * 0.5 * (1 + cos(2 pi num_periods t' / T)) + beta)``
      with ``t' = min(t, T)``

    ``warmup_steps > 0`` multiplies any of them by ``min(1, (t + 1) / warmup_steps)``
    (linear warm-up).
    """

    kind: ScheduleKind = ScheduleKind.CONSTANT
    decay_steps: float = 1000.0
    decay_rate: float = 0.96
    staircase: bool = False
    end_lr: float = 1e-4
    power: float = 1.0
    alpha: float = 0.0
    beta: float = 0.001
    num_periods: float = 0.5
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", _member(ScheduleKind, "schedule kind", self.kind))
        _positive("decay_steps", self.decay_steps)
        for n in ("decay_rate", "end_lr", "power", "alpha", "beta", "num_periods"):
            _non_negative(n, getattr(self, n))
        _int_at_least("warmup_steps", self.warmup_steps, 0)
        if not isinstance(self.staircase, bool):  # a "false" from a config file is not False
            raise TypeError(f"staircase must be a bool, got {_clip(self.staircase)}")


class OptimizerKind(str, enum.Enum):
    SGD = "sgd"
    ADAGRAD = "adagrad"
    ROWWISE_ADAGRAD = "rowwise_adagrad"
    ADAM = "adam"
    ADAMW = "adamw"
    FTRL = "ftrl"
    LION = "lion"


@dataclass(frozen=True)
class OptimizerConfig:
    """A row-wise sparse optimizer.

    Attributes:
        kind: the update rule (see :mod:`damo_hybrid.rows.optimizers`).
        lr: base learning rate (FTRL's ``alpha``).
        weight_decay: L2 for sgd/adagrad/adam, decoupled for adamw/lion.
        lr_decay: adagrad's ``lr / (1 + (count - 1) * lr_decay)``.
        eps: denominator epsilon of adagrad/adam.
        beta1, beta2: moment decays of adam/adamw/lion.
        initial_accumulator: adagrad/rowwise_adagrad starting accumulator.
        ftrl_beta, l1, l2: FTRL-proximal's beta, lambda1 and lambda2.
        schedule: learning-rate schedule over the table's global step.
    """

    kind: OptimizerKind = OptimizerKind.SGD
    lr: float = 0.01
    weight_decay: float = 0.0
    lr_decay: float = 0.0
    eps: float = 1e-10
    beta1: float = 0.9
    beta2: float = 0.999
    initial_accumulator: float = 0.0
    ftrl_beta: float = 1.0
    l1: float = 0.0
    l2: float = 0.0
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", _member(OptimizerKind, "optimizer kind", self.kind))
        if isinstance(self.schedule, dict):
            object.__setattr__(self, "schedule", ScheduleConfig(**self.schedule))
        _positive("lr", self.lr)
        for n in ("weight_decay", "lr_decay", "eps", "initial_accumulator", "ftrl_beta", "l1", "l2"):
            _non_negative(n, getattr(self, n))
        _unit_interval("beta1", self.beta1)
        _unit_interval("beta2", self.beta2)

    @classmethod
    def sgd(cls, lr: float = 0.01, weight_decay: float = 0.0, **kw: Any) -> OptimizerConfig:
        return cls(kind=OptimizerKind.SGD, lr=lr, weight_decay=weight_decay, **kw)

    @classmethod
    def adagrad(cls, lr: float = 0.01, eps: float = 1e-10, **kw: Any) -> OptimizerConfig:
        return cls(kind=OptimizerKind.ADAGRAD, lr=lr, eps=eps, **kw)

    @classmethod
    def rowwise_adagrad(cls, lr: float = 0.01, eps: float = 1e-10, **kw: Any) -> OptimizerConfig:
        return cls(kind=OptimizerKind.ROWWISE_ADAGRAD, lr=lr, eps=eps, **kw)

    @classmethod
    def adam(cls, lr: float = 0.001, eps: float = 1e-8, **kw: Any) -> OptimizerConfig:
        return cls(kind=OptimizerKind.ADAM, lr=lr, eps=eps, **kw)

    @classmethod
    def adamw(cls, lr: float = 0.001, eps: float = 1e-8, weight_decay: float = 0.01, **kw: Any) -> OptimizerConfig:
        return cls(kind=OptimizerKind.ADAMW, lr=lr, eps=eps, weight_decay=weight_decay, **kw)

    @classmethod
    def ftrl(cls, alpha: float = 0.05, beta: float = 1.0, l1: float = 0.0, l2: float = 0.0, **kw: Any) -> OptimizerConfig:
        return cls(kind=OptimizerKind.FTRL, lr=alpha, ftrl_beta=beta, l1=l1, l2=l2, **kw)

    @classmethod
    def lion(cls, lr: float = 3e-4, beta1: float = 0.9, beta2: float = 0.99, weight_decay: float = 0.0, **kw: Any) -> OptimizerConfig:
        return cls(kind=OptimizerKind.LION, lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, **kw)


@dataclass(frozen=True)
class AdmissionConfig:
    """Admit a key into storage only after it has been seen ``min_count`` times.

    A key is "seen" once per occurrence in an ``apply_gradients`` call or a
    training batch of an ``EmbeddingCollection`` (counted when it is prepared,
    in batch order; eval batches are not counted). Until then it reads as its
    initial row (or zeros), takes no cache slot and is never stored; its
    gradients are dropped and counted in ``stats().dropped_unadmitted``.
    Counts live in a counting Bloom filter (4-bit saturating counters would
    cap at 15; we use 8-bit ones, so ``min_count`` may be up to 255) sized
    from ``capacity`` and ``fpr``. A false positive admits a key early; a key
    is never admitted late.

    Attributes:
        min_count: occurrences needed before the key's gradients are applied.
        capacity: expected number of distinct keys in the filter.
        fpr: target false-positive rate at ``capacity``.
        unadmitted_value: what ``lookup`` returns for a key not yet stored:
            ``"init"`` (its deterministic initial row) or ``"zeros"``.
    """

    min_count: int = 1
    capacity: int = 1 << 24
    fpr: float = 1e-3
    unadmitted_value: str = "init"

    def __post_init__(self) -> None:
        if not isinstance(self.min_count, int) or isinstance(self.min_count, bool) or not 1 <= self.min_count <= 255:
            raise ValueError(f"min_count must be an int in [1, 255], got {_clip(self.min_count)}")
        _int_at_least("capacity", self.capacity, 1)
        _finite("fpr", self.fpr)
        if not 0 < self.fpr < 1:
            raise ValueError(f"fpr must be in (0, 1), got {self.fpr!r}")
        if self.unadmitted_value not in ("init", "zeros"):
            raise ValueError(f"unadmitted_value must be 'init' or 'zeros', got {_clip(self.unadmitted_value)}")


@dataclass(frozen=True)
class ExpiryConfig:
    """Defaults for :meth:`EmbeddingStore.expire` on this table.

    A row is removed by a sweep when it was last updated more than
    ``max_age_days`` ago, or when it has fewer than ``min_count`` updates.
    """

    max_age_days: float | None = None
    min_count: int = 0

    def __post_init__(self) -> None:
        if self.max_age_days is not None:
            _positive("max_age_days", self.max_age_days)
        _int_at_least("min_count", self.min_count, 0)


class NonFinitePolicy(str, enum.Enum):
    """What ``apply_gradients`` does with a NaN/Inf gradient row."""

    RAISE = "raise"  # raise before anything is written
    SKIP = "skip"  # drop those rows, apply the rest, count them in stats().dropped


@dataclass(frozen=True)
class TableConfig:
    """One embedding table.

    Attributes:
        name: unique within a store; letters, digits and ``_.:-``.
        dim: embedding width, 1..65535.
        initializer: how unseen rows start.
        optimizer: row-wise update rule and its learning-rate schedule.
        admission: optional frequency admission.
        expiry: optional defaults for expiry sweeps.
        nonfinite: policy for NaN/Inf gradients and for steps whose results would be NaN/Inf.
        linear_column: the row's last column is a first-order (linear) weight that starts at
            zero, the first ``dim - 1`` the embedding (``initializer``). DeepFM and Wide&Deep
            read both from one row per key: one lookup, one cache slot and one stored value
            instead of two tables fed by the same keys.
        compression: store fewer rows than ids (quotient-remainder, binary code, hashing
            trick): see :class:`~damo_hybrid.keys.compression.CompressionConfig`. ``dim`` is
            then the width of a stored row. Fixed for the table's life.
        row_dtype: how weights are held in every tier: ``float32``, or ``float16``,
            ``bfloat16``, ``int16`` (16 bits, stochastic rounding on every update; optimizer
            state stays float32): see :mod:`~damo_hybrid.precision`. Fixed for the table's life.
        int16_step: the ``int16`` grid step, a power of two in [2**-24, 2**-4] (range
            ``+-32767 * int16_step``); only with ``row_dtype="int16"``.
    """

    name: str
    dim: int
    initializer: InitializerConfig = field(default_factory=InitializerConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    admission: AdmissionConfig | None = None
    expiry: ExpiryConfig | None = None
    nonfinite: NonFinitePolicy = NonFinitePolicy.RAISE
    linear_column: bool = False
    compression: CompressionConfig | None = None
    row_dtype: RowDtype = RowDtype.FLOAT32
    int16_step: float = DEFAULT_INT16_STEP

    def __post_init__(self) -> None:
        if not isinstance(self.row_dtype, str) or self.row_dtype not in [d.value for d in RowDtype]:
            raise ValueError(f"row_dtype must be one of {[d.value for d in RowDtype]}, got {_clip(self.row_dtype)}")
        object.__setattr__(self, "row_dtype", RowDtype(self.row_dtype))
        if check_int16_step(self.int16_step) != DEFAULT_INT16_STEP and self.row_dtype is not RowDtype.INT16:
            raise ValueError(f"int16_step applies to row_dtype='int16' only, got row_dtype={self.row_dtype.value!r}")
        if isinstance(self.compression, dict):
            object.__setattr__(self, "compression", CompressionConfig(**self.compression))
        if self.compression is not None and not isinstance(self.compression, CompressionConfig):
            raise TypeError(f"compression must be a CompressionConfig or None, got {type(self.compression).__name__}")
        if not isinstance(self.name, str) or not _TABLE_NAME.match(self.name):
            raise ValueError(
                f"table name must be 1-128 characters of letters, digits or '_.:-', got {_clip(self.name)}"
            )
        if not isinstance(self.dim, int) or isinstance(self.dim, bool) or not 1 <= self.dim <= 65535:
            raise ValueError(f"dim must be an int in [1, 65535], got {_clip(self.dim)}")
        for n, typ in (("initializer", InitializerConfig), ("optimizer", OptimizerConfig)):
            if not isinstance(getattr(self, n), typ):
                raise TypeError(f"{n} must be a {typ.__name__}, got {type(getattr(self, n)).__name__}")
        if self.admission is not None and not isinstance(self.admission, AdmissionConfig):
            raise TypeError(f"admission must be an AdmissionConfig or None, got {type(self.admission).__name__}")
        if self.expiry is not None and not isinstance(self.expiry, ExpiryConfig):
            raise TypeError(f"expiry must be an ExpiryConfig or None, got {type(self.expiry).__name__}")
        object.__setattr__(self, "nonfinite", _member(NonFinitePolicy, "nonfinite", self.nonfinite))
        if not isinstance(self.linear_column, bool):
            raise TypeError(f"linear_column must be a bool, got {_clip(self.linear_column)}")
        if self.linear_column and self.dim < 2:
            raise ValueError(f"a table with linear_column needs dim >= 2 (embedding + first-order weight), got {self.dim}")
        c = self.compression
        if c is not None and c.kind.value == "double_hash":  # its admission counters count raw keys
            if self.admission is None:
                object.__setattr__(self, "admission", AdmissionConfig(min_count=c.min_count))
            elif self.admission.min_count != c.min_count:
                raise ValueError(f"double_hash min_count {c.min_count} and admission min_count "
                                 f"{self.admission.min_count} must agree (the counters decide which keys are frequent)")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; :meth:`from_dict` inverts it."""
        d = asdict(self)
        return _enums_to_str(d)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TableConfig:
        """Build from :meth:`to_dict` output; unknown keys raise ``ValueError``."""
        d = dict(d)
        _reject_unknown(cls, d)
        init = d.pop("initializer", None)
        opt = d.pop("optimizer", None)
        adm = d.pop("admission", None)
        exp = d.pop("expiry", None)
        if init is not None:
            _reject_unknown(InitializerConfig, init)
            d["initializer"] = InitializerConfig(**init)
        if opt is not None:
            opt = dict(opt)
            _reject_unknown(OptimizerConfig, opt)
            sch = opt.pop("schedule", None)
            if sch is not None:
                _reject_unknown(ScheduleConfig, sch)
                opt["schedule"] = ScheduleConfig(**sch)
            d["optimizer"] = OptimizerConfig(**opt)
        if adm is not None:
            _reject_unknown(AdmissionConfig, adm)
            d["admission"] = AdmissionConfig(**adm)
        if exp is not None:
            _reject_unknown(ExpiryConfig, exp)
            d["expiry"] = ExpiryConfig(**exp)
        return cls(**d)


@dataclass(frozen=True)
class StoreConfig:
    """Options of the RocksDB store as a whole.

    Attributes:
        ttl_seconds: if set, RocksDB drops rows not written for this long
            during compaction (RocksDB's TTL mode). A store created with a TTL
            must be reopened with one, and one created without, without.
        block_cache_mb: RocksDB block cache for reads.
        write_buffer_mb: RocksDB memtable size.
        bloom_bits_per_key: RocksDB bloom filter bits, making "is this key on
            disk at all?" cheap for never-seen keys.
        background_jobs: RocksDB flush/compaction threads.
        sync_writes: fsync the write-ahead log on every write (slow, safest); implies
            ``write_ahead_log``.
        write_ahead_log: also log the caches' write-backs (evicted dirty rows) in RocksDB's
            write-ahead log. Off (the default), they reach disk when the memtable fills
            and at every flush, checkpoint and close; a crash loses the ones since, as it
            loses the dirty rows still cached, and only a checkpoint restores a consistent
            state either way. Writes that bypass the caches are always logged.
        mmap_reads: read SST files through mmap (no copy per block read;
            about 2x faster random lookups when the files sit in the page cache).
        read_threads: threads that split a large multi-get (rocksdict releases
            the GIL while RocksDB reads); 0 picks ``min(4, cpu_count)``.
        cache_mb: host-cache budget of the tables a collection caches, shared by
            them in proportion to their row bytes. A collection given its own
            ``cache_mb`` uses that instead when it creates a table's cache; a table
            cached once keeps its cache (see ``EmbeddingStore.cache``).
        device_cache_mb: device-cache budget, split like ``cache_mb``; None picks
            2048 on the ``cuda`` backend and no device tier on ``cpu``.
        min_cache_rows: floor of rows per table and tier (a batch's distinct keys
            plus the pinned rows of the batches in flight must fit).
        key_filter_mb: the most memory each table's record of stored keys may grow
            to (MiB; it takes 4 to 8 bytes per stored row): a miss for a key the table
            never stored skips RocksDB. A table past ``key_filter_mb * 2**18`` rows
            stays correct but loses part of the saving. 0 turns the record off.
        allow_config_change: reopening a store with a table config that differs
            from the stored one in a setting that can change (learning rate and
            schedule, optimizer settings, initializer of new rows, NaN/Inf
            policy, admission threshold, expiry) applies it and logs each
            change; off (the default), it raises ``ConfigConflictError``. Dim,
            optimizer kind and admission sizing can never change.
    """

    ttl_seconds: int | None = None
    block_cache_mb: int = 256
    write_buffer_mb: int = 64
    bloom_bits_per_key: int = 10
    background_jobs: int = 2
    sync_writes: bool = False
    write_ahead_log: bool = False
    mmap_reads: bool = True
    read_threads: int = 0
    cache_mb: float = 256.0
    device_cache_mb: float | None = None
    min_cache_rows: int = 1 << 16
    key_filter_mb: int = 256
    allow_config_change: bool = False

    def __post_init__(self) -> None:
        _positive("cache_mb", self.cache_mb)
        if self.device_cache_mb is not None:
            _positive("device_cache_mb", self.device_cache_mb)
        ttl = self.ttl_seconds
        if ttl is not None and (not isinstance(ttl, int) or isinstance(ttl, bool) or ttl < 1):
            raise ValueError(f"ttl_seconds must be None or an int >= 1, got {_clip(ttl)}")
        for n in ("sync_writes", "write_ahead_log", "mmap_reads", "allow_config_change"):
            if not isinstance(getattr(self, n), bool):  # a "false" from a config file is not False
                raise TypeError(f"{n} must be a bool, got {_clip(getattr(self, n))}")
        for n, lo in (("min_cache_rows", 1), ("block_cache_mb", 1), ("write_buffer_mb", 1), ("background_jobs", 1),
                      ("read_threads", 0), ("key_filter_mb", 0), ("bloom_bits_per_key", 0)):
            _int_at_least(n, getattr(self, n), lo)


def _enums_to_str(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _enums_to_str(v) for k, v in obj.items()}
    if isinstance(obj, enum.Enum):
        return obj.value
    return obj


def _reject_unknown(cls: type, d: dict[str, Any]) -> None:
    reject_unknown(f"{cls.__name__} keys", d, cls.__dataclass_fields__)  # type: ignore[attr-defined]
