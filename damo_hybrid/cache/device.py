"""Device cache: one table's hot rows in accelerator memory, in front of its host cache.

The tiers are exclusive: a row lives in the device cache, or in the host cache, or only in
RocksDB, and the fastest tier holding it is the truth. A key missing on the device is taken
from the host cache (:meth:`HostCache.take_rows`: a host hit leaves the host, a miss is read
from RocksDB or initialised there); an evicted row that holds updates goes back down into the
host cache (:meth:`HostCache.put_rows`), which writes it to RocksDB when it evicts it in turn.

Layout on the device: ``weights`` (capacity, dim) in the table's ``row_dtype`` (float32, or
16 bits: see :mod:`~damo_hybrid.precision`), ``state`` float32 (capacity,
width) and ``count`` int64 (capacity,); creation and update times, dirty and stored flags
stay in host memory (they never enter the math). The key -> slot mapping, pins and CLOCK
replacement are a :class:`~damo_hybrid.cache.slots.SlotPool` kept by the host manager.

Streams (CUDA): the host manager stages missing rows in pinned host buffers and copies them
up on a copy stream, gathers evicted dirty rows down on the same stream, and records an
event the worker's compute stream waits on before it reads the batch. Before touching a slot
another batch may have used, the copy stream waits on the worker's last *fence*: an event
the worker records on the compute stream before it unpins a batch. So a copy never races a
kernel, and the only host synchronisations are the download of evicted rows (in the host
manager, which must hand them to the host cache) and one finiteness check per step.

On the CPU device (the ``cpu`` backend with an explicit device budget) the same code runs
with synchronous copies; tests use it to check the tier's logic without a GPU.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from ..precision import RowDtype
from ..rows.codec import Rows
from .host import CacheStats, HostCache
from .slots import SlotPool

__all__ = ["DeviceCache", "DeviceBatch"]


@dataclass
class DeviceBatch:
    """One table's part of a prepared batch on the device.

    Attributes:
        slots: int64 (U,) pinned slots of the batch's unique keys, host copy.
        slots_t: the same on the device.
        tensors: index tensors uploaded with the rows (inverse indices, offsets), by name.
        ready: event the compute stream waits on before reading (None on the CPU device).
        keys_t: int64 (U,) the keys' bits on the device, for a 16-bit table's rounding (else None).
    """

    slots: np.ndarray
    slots_t: torch.Tensor
    tensors: dict[str, torch.Tensor]
    ready: object | None
    keys_t: torch.Tensor | None = None


class _CpuDevice:
    """Synchronous transfers and numpy kernels: the CPU twin of :class:`_CudaDevice`."""

    def __init__(self, device: torch.device) -> None:
        from ..ops import cpu

        self.device = device
        self._ops = cpu

    def upload(self, arrays: list[np.ndarray]) -> list[torch.Tensor]:
        return [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]

    def ready(self) -> object | None:
        return None

    def scatter(self, slabs: list[torch.Tensor], slots_t: torch.Tensor, rows: list[torch.Tensor]) -> None:
        for slab, r in zip(slabs, rows):
            slab.index_copy_(0, slots_t, r)

    def download(self, slabs: list[torch.Tensor], slots: np.ndarray) -> list[np.ndarray]:
        s = torch.from_numpy(slots)
        return [slab.index_select(0, s).numpy() for slab in slabs]

    def wait_fence(self) -> None:
        pass

    def fence(self) -> None:
        pass

    def begin(self, batch: DeviceBatch) -> None:
        pass

    def optimizer_step(self, opt: object, w: torch.Tensor, st: torch.Tensor, g: torch.Tensor,
                       cnt: torch.Tensor, lr: float) -> None:
        self._ops.optimizer_step(opt, w.numpy(), st.numpy(), g.numpy(), cnt.numpy(), lr)


class _CudaDevice:
    """Pinned staging, a copy stream ordered with events, and the CUDA kernels via DLPack."""

    def __init__(self, device: torch.device) -> None:
        import cupy  # type: ignore[import-not-found]

        from ..ops import cuda

        self.device = device
        self._cp, self._ops = cupy, cuda
        self.copy = torch.cuda.Stream(device)
        self._fence: torch.cuda.Event | None = None

    def _pinned(self, a: np.ndarray) -> torch.Tensor:
        t = torch.empty(a.shape, dtype=torch.from_numpy(a[:0]).dtype, pin_memory=True)
        t.numpy()[...] = a
        return t

    def upload(self, arrays: list[np.ndarray]) -> list[torch.Tensor]:
        with torch.cuda.stream(self.copy):
            return [self._pinned(a).to(self.device, non_blocking=True) for a in arrays]

    def ready(self) -> object | None:
        """An event after everything queued on the copy stream so far (uploads and scatters)."""
        e = torch.cuda.Event()
        e.record(self.copy)
        return e

    def scatter(self, slabs: list[torch.Tensor], slots_t: torch.Tensor, rows: list[torch.Tensor]) -> None:
        with torch.cuda.stream(self.copy):
            for slab, r in zip(slabs, rows):
                slab.index_copy_(0, slots_t, r)

    def download(self, slabs: list[torch.Tensor], slots: np.ndarray) -> list[np.ndarray]:
        with torch.cuda.stream(self.copy):
            s = self._pinned(slots).to(self.device, non_blocking=True)
            outs = []
            for slab in slabs:
                host = torch.empty((len(slots), *slab.shape[1:]), dtype=slab.dtype, pin_memory=True)
                host.copy_(slab.index_select(0, s), non_blocking=True)
                outs.append(host)
            done = torch.cuda.Event()
            done.record(self.copy)
        done.synchronize()  # the host cache needs the values now
        return [o.numpy() for o in outs]

    def wait_fence(self) -> None:
        """Order the copy stream after everything the worker did before its last unpin."""
        f = self._fence
        if f is not None:
            self.copy.wait_event(f)

    def fence(self) -> None:
        """Called by the worker before it unpins: slots it used may be reused after this point."""
        e = torch.cuda.Event()
        e.record(torch.cuda.current_stream(self.device))
        self._fence = e

    def begin(self, batch: DeviceBatch) -> None:
        """Make the compute stream wait for the batch's copies; keep its tensors alive for it."""
        cur = torch.cuda.current_stream(self.device)
        cur.wait_event(batch.ready)  # type: ignore[arg-type]
        batch.slots_t.record_stream(cur)
        for t in batch.tensors.values():
            t.record_stream(cur)
        if batch.keys_t is not None:  # a 16-bit table's rounding reads them in stage()
            batch.keys_t.record_stream(cur)

    def optimizer_step(self, opt: object, w: torch.Tensor, st: torch.Tensor, g: torch.Tensor,
                       cnt: torch.Tensor, lr: float) -> None:
        cp = self._cp
        with cp.cuda.ExternalStream(torch.cuda.current_stream(self.device).cuda_stream):
            self._ops.optimizer_step(opt, cp.from_dlpack(w), cp.from_dlpack(st), cp.from_dlpack(g.contiguous()),
                                     cp.from_dlpack(cnt), lr)


class DeviceCache:
    """One table's rows on a device, above its :class:`HostCache`.

    Args:
        host: the table's host cache (the tier below).
        capacity: device slots. Rows of two batches (the one training and the one being
            prepared) are pinned, so it must hold both batches' distinct keys.
        device: ``cuda[:i]`` for the GPU tier; ``cpu`` runs the same logic in host memory.

    Raises:
        ValueError: capacity < 1 or a device type other than cuda or cpu.
    """

    def __init__(self, host: HostCache, capacity: int, device: torch.device | str) -> None:
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        if dev.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda, got {dev}")
        self.host, self.table, self.name, self.opt = host, host.table, host.name, host.opt
        self.dim, self.width = host.dim, host.width
        self.capacity, self.device = capacity, dev
        self.slots = SlotPool(capacity, f"device cache of table {self.name!r}")
        self.prec = prec = host.prec
        self.weights = torch.zeros((capacity, self.dim), dtype=prec.torch_dtype, device=dev)
        # bfloat16 moves between host and device as its bits (numpy has no bfloat16)
        bf16 = prec.dtype is RowDtype.BFLOAT16
        self._wview = self.weights.view(torch.int16) if bf16 else self.weights
        self._wnp = np.dtype(np.int16) if bf16 else prec.slab_dtype
        self.state = torch.zeros((capacity, self.width), dtype=torch.float32, device=dev)
        self.count = torch.zeros(capacity, dtype=torch.int64, device=dev)
        self.created = np.zeros(capacity, dtype=np.int64)
        self.updated = np.zeros(capacity, dtype=np.int64)
        self.dirty = np.zeros(capacity, dtype=bool)
        self.stored = np.zeros(capacity, dtype=bool)
        self.row_bytes = prec.itemsize * self.dim + 4 * self.width + 8
        self.stats = CacheStats()
        self._dev = _CudaDevice(dev) if dev.type == "cuda" else _CpuDevice(dev)  # chosen once

    @classmethod
    def nbytes_per_row(cls, dim: int, state_width: int, weight_bytes: int = 4) -> int:
        """Device bytes one slot costs."""
        return weight_bytes * dim + 4 * state_width + 8

    @property
    def _slabs(self) -> list[torch.Tensor]:
        return [self._wview, self.state, self.count]

    def _download(self, slots: np.ndarray) -> Rows:
        """Rows in ``slots`` copied to the host (float32 weights); times from the host arrays."""
        w, st, cnt = self._dev.download(self._slabs, slots)
        return Rows(self.prec.unpack(w.view(self.prec.slab_dtype)), st, cnt, self.created[slots], self.updated[slots])

    # ------------------------------------------------------ host manager
    def prepare(self, ukeys: np.ndarray, tensors: dict[str, np.ndarray]) -> DeviceBatch:
        """Make ``ukeys`` resident and pinned, and upload the batch's index arrays with them.

        Args:
            ukeys: uint64 (U,) distinct keys.
            tensors: int64 index arrays the worker needs on the device (inverse indices, offsets).
        Returns:
            The batch's :class:`DeviceBatch`; release it with :meth:`release`.
        """
        slots = self.slots.lookup(ukeys)
        hit = slots >= 0
        self.stats.hits += int(hit.sum())
        miss = np.nonzero(~hit)[0]
        names = list(tensors)
        arrays = [tensors[n] for n in names]
        if not self.prec.exact:  # the rounding stream needs the keys on the device
            arrays.append(ukeys.view(np.int64))
        self.slots.pin(slots[hit])  # protects this batch's hits from the evictions below
        try:
            if not len(miss):
                up = self._dev.upload([slots, *arrays])
                rest = up[1:]
            else:
                keys = ukeys[miss]
                new_slots = self.slots.take(len(miss), self._evict)
                try:
                    rows, stored, dirty = self.host.take_rows(keys)
                except BaseException:
                    self.slots.free(new_slots)
                    raise
                try:
                    slots[miss] = new_slots
                    packed = self.prec.pack(rows.weights).view(self._wnp)
                    up = self._dev.upload([slots, new_slots, packed, rows.state, rows.count, *arrays])
                    self._dev.wait_fence()  # a victim's slot may still be read by queued compute
                    self._dev.scatter(self._slabs, up[1], up[2:5])
                except BaseException:  # the rows left the host cache: give them back
                    slots[miss] = -1
                    self.slots.free(new_slots)
                    self.host.put_rows(keys, rows, stored)
                    raise
                rest = up[5:]
                self.stats.misses += len(miss)
                self.stats.bytes_read += len(miss) * self.row_bytes
                self.created[new_slots], self.updated[new_slots] = rows.created, rows.updated
                self.stored[new_slots], self.dirty[new_slots] = stored, dirty
                self.slots.assign(keys, new_slots)
                self.slots.pin(new_slots)
        except BaseException:
            self.slots.unpin(slots[hit])
            raise
        self.slots.touch(slots[hit])  # rows uploaded just now enter unused (see SlotPool)
        keys_t = None if self.prec.exact else rest.pop()
        return DeviceBatch(slots, up[0], dict(zip(names, rest)), self._dev.ready(), keys_t)

    def _evict(self, victims: np.ndarray) -> None:
        """Send victims holding updates down to the host cache (called with victims still mapped)."""
        d = victims[self.dirty[victims]]
        if len(d):
            self._dev.wait_fence()  # read only after the worker's queued steps of these rows
            self._send_down(d)
        self.dirty[victims] = False
        self.stats.evictions += len(victims)

    def _send_down(self, d: np.ndarray) -> None:
        self.host.put_rows(self.slots.keys[d], self._download(d), self.stored[d])
        self.stats.write_backs += len(d)
        self.stats.bytes_written += len(d) * self.row_bytes

    # ------------------------------------------------------------- worker
    def gather(self, batch: DeviceBatch) -> torch.Tensor:
        """float32 (U, dim): the batch's rows, read on the compute stream after its copies."""
        self._dev.begin(batch)
        return self.prec.unpack_t(self.weights.index_select(0, batch.slots_t))

    def stage(self, batch: DeviceBatch, g: torch.Tensor, lr: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One optimizer step of the batch's rows on copies (fused kernel on CUDA); nothing
        changes until :meth:`commit`, so the caller can check the results first.

        Args:
            batch: the prepared batch.
            g: float32 (U, dim) summed gradients, on the device.
            lr: scheduled learning rate.
        Returns:
            ``(weights (U, dim), state (U, width), count (U,))`` after the step, on the device.
        """
        s_t = batch.slots_t
        w = self.prec.unpack_t(self.weights.index_select(0, s_t))
        st = self.state.index_select(0, s_t)
        cnt = self.count.index_select(0, s_t) + 1
        self._dev.optimizer_step(self.opt, w, st, g.contiguous(), cnt, lr)
        return self.prec.stochastic_t(w, batch.keys_t, cnt), st, cnt

    def commit(self, batch: DeviceBatch, w: torch.Tensor, st: torch.Tensor, cnt: torch.Tensor,
               keep: np.ndarray | None = None) -> None:
        """Store a staged step (see :meth:`stage`); ``keep``: optional bool (U,) rows to store
        (the others keep their value)."""
        s_t, s = batch.slots_t, batch.slots
        if keep is not None:
            k = torch.from_numpy(keep).to(s_t.device)
            s_t, s, w, st, cnt = s_t[k], s[keep], w[k], st[k], cnt[k]
        self.weights.index_copy_(0, s_t, self.prec.pack_t(w))
        self.state.index_copy_(0, s_t, st)
        self.count.index_copy_(0, s_t, cnt)
        self.updated[s] = int(time.time())
        self.dirty[s] = True

    def release(self, batch: DeviceBatch) -> None:
        """Unpin a batch (any thread); work queued on the compute stream so far is fenced first."""
        self._dev.fence()
        self.slots.unpin(batch.slots)

    # -------------------------------------------------------------- both
    def peek(self, keys: np.ndarray) -> tuple[Rows, np.ndarray, np.ndarray]:
        """Resident rows of ``keys``, copied to the host, without changing residency or stats.

        Returns:
            ``(rows, hit, known)`` as :meth:`HostCache.peek`.
        """
        slots = self.slots.lookup(keys)
        hit = slots >= 0
        s = slots[hit]
        self._dev.fence()
        self._dev.wait_fence()
        rows = self._download(s) if len(s) else Rows.empty(0, self.dim, self.width)
        return rows, hit, self.stored[s] | self.dirty[s]

    def send_down(self, keys: np.ndarray) -> None:
        """Move the resident rows of ``keys`` down into the host cache (rows with updates go
        dirty; clean ones are dropped, the host tier or the storage has them).

        Raises:
            RuntimeError: a row is pinned by a batch in flight.
        """
        slots = self.slots.lookup(keys)
        s = slots[slots >= 0]
        if not len(s):
            return
        if (self.slots.pins[s] > 0).any():
            raise RuntimeError(f"rows of table {self.name!r} are pinned by a batch in flight; "
                               "apply or release the batch first")
        self._dev.fence()
        self._evict(s)
        self.slots.release(s)

    def flush(self) -> None:
        """Copy every row holding updates down into the host cache, which writes them to the
        storage; the rows stay resident and clean.

        In chunks of at most the host tier's capacity, each written back before the next, so a
        device tier of any size flushes through a host tier of any size."""
        self._dev.fence()
        self._dev.wait_fence()
        d = np.nonzero(self.dirty)[0]
        step = max(1, self.host.capacity - int(np.count_nonzero(self.host.pins)))
        for i in range(0, len(d), step):
            c = d[i:i + step]
            self.dirty[c] = False
            try:
                self._send_down(c)
            except BaseException:
                self.dirty[c] = True  # still only here: keep them for the next flush
                raise
            self.stored[c] = True  # the host cache holds them dirty and writes them before dropping them
            self.host.write_back_dirty()  # frees the host tier for the next chunk

    def __len__(self) -> int:
        return len(self.slots)
