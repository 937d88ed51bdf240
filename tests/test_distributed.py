"""Tables sharded over ranks (torch.distributed, gloo on loopback): a run on 2 ranks, each given
its slice of the global batch, ends with the rows and dense weights of one process on the global
batch; each rank's store holds exactly the keys it owns."""

from __future__ import annotations

import json
import shutil
import socket
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from damo_hybrid import EmbeddingStore, InitializerConfig, OptimizerConfig
from damo_hybrid.data.synthetic import SyntheticCriteo
from damo_hybrid.dist import shard_of, split_by_owner
from damo_hybrid.models import DeepFM
from damo_hybrid.nn.models import model_tables

BATCH, STEPS = 96, 12
OPTS = {"adagrad": OptimizerConfig.adagrad(0.05), "adam": OptimizerConfig.adam(0.01)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(root: Path, opt: str, rank: int, world: int, sizes: tuple[int, ...]) -> dict[str, np.ndarray]:
    """``STEPS`` steps of DeepFM on this rank's slice of each global batch (``sizes``: each rank's
    share); dense gradients averaged over ranks. Returns the shard's rows and the dense weights."""
    torch.set_num_threads(1)
    data = SyntheticCriteo(BATCH, seed=1, vocab_min=200, vocab_max=3000, n_sparse=6, n_dense=3)
    tables = model_tables("deepfm", 8, OPTS[opt], InitializerConfig.normal(std=0.1, seed=3))
    lo = sum(sizes[:rank])
    part = slice(lo, lo + sizes[rank])
    with EmbeddingStore(root / f"rank{rank}", tables) as store:
        torch.manual_seed(0)
        # 400 rows per tier: far fewer than the keys a run touches, so the shards evict
        model = DeepFM(store, data.sparse_fields, 3, hidden=(16,), cache_mb=1e-9, min_cache_rows=400, backend="cpu")
        dense_opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for step in range(STEPS):
            b = data.batch(step)
            prepared = model.prepare({f: k[part] for f, k in b.sparse.items()})
            logit = model(prepared, torch.from_numpy(b.dense[part]))
            # each rank's loss is the mean over its slice; averaging the gradients over ranks
            # gives the global mean's (slices of unequal size are weighted by their share)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                logit, torch.from_numpy(b.label[part]), reduction="sum") * (world / BATCH)
            loss.backward()
            model.apply_sparse_gradients()
            for p in model.parameters():
                if world > 1:
                    dist.all_reduce(p.grad)
                    p.grad /= world
            dense_opt.step()
            dense_opt.zero_grad()
        model.sparse.flush()
        keys = np.concatenate([k for k, _ in store.scan("emb")])
        rows = store.read_rows("emb", keys)[0]
        evictions = sum(c.stats.evictions for c in model.sparse.caches.values())
        out = {"keys": keys, "weights": rows.weights, "state": rows.state, "count": rows.count,
               "evictions": np.array(evictions), "step": np.array(store.step("emb"))}
        out.update({f"dense.{n}": p.detach().numpy() for n, p in model.state_dict().items()})
        return out


def _rank_main(rank: int, world: int, port: int, root: str, opt: str, sizes: tuple[int, ...]) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    try:
        out = _train(Path(root), opt, rank, world, sizes)
        np.savez(Path(root) / f"out{rank}.npz", **out)
    finally:
        dist.destroy_process_group()


def _run_ranks(root: Path, opt: str, sizes: tuple[int, ...]) -> list[dict[str, np.ndarray]]:
    world = len(sizes)
    mp.start_processes(_rank_main, args=(world, _free_port(), str(root), opt, sizes), nprocs=world,
                       start_method="spawn")
    return [dict(np.load(root / f"out{r}.npz")) for r in range(world)]


@pytest.mark.parametrize("opt, sizes", [("adagrad", (48, 48)), ("adam", (48, 48)), ("adagrad", (80, 16))],
                         ids=["adagrad", "adam", "uneven-batches"])
def test_two_ranks_equal_one_process_on_the_global_batch(tmp_path, opt, sizes):
    ref = _train(tmp_path / "one", opt, 0, 1, (BATCH,))
    outs = _run_ranks(tmp_path / "two", opt, sizes)
    assert all(int(o["evictions"]) > 0 for o in outs), "the test must force evictions on every rank"
    for r, o in enumerate(outs):  # a rank stores exactly the keys it owns, and steps every step
        assert (shard_of(o["keys"], 2) == r).all() and len(o["keys"]) > 0
        assert int(o["step"]) == STEPS
    keys = np.concatenate([o["keys"] for o in outs])
    order = np.argsort(keys)
    np.testing.assert_array_equal(keys[order], np.sort(ref["keys"]))
    ref_order = np.argsort(ref["keys"])
    for f in ("weights", "state"):
        got = np.concatenate([o[f] for o in outs])[order]
        np.testing.assert_allclose(got, ref[f][ref_order], rtol=1e-5, atol=1e-5, err_msg=f)
    np.testing.assert_array_equal(np.concatenate([o["count"] for o in outs])[order], ref["count"][ref_order])
    for name in (n for n in ref if n.startswith("dense.")):
        for o in outs:
            np.testing.assert_allclose(o[name], ref[name], rtol=1e-5, atol=1e-5, err_msg=name)


def test_the_sharding_rule_is_stable_and_splits_keys_by_owner():
    keys = np.arange(10_000, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    owner = shard_of(keys, 3)
    assert set(owner.tolist()) == {0, 1, 2} and abs(np.bincount(owner).min() - 10_000 / 3) < 300
    assert (shard_of(keys, 1) == 0).all()
    order, counts = split_by_owner(keys, 3)
    np.testing.assert_array_equal(np.repeat([0, 1, 2], counts), owner[order])
    # pinned values: the rule is part of the on-disk contract of a sharded store
    probe = np.array([0, 1, 2**63, 12345], np.uint64)
    assert shard_of(probe, 2).tolist() == [0, 0, 1, 1] and shard_of(probe, 3).tolist() == [0, 0, 1, 0]


class _Slice:
    """Rank ``rank``'s part of each global batch of ``data``: an even share, or (``cuts``) the rows
    between ``cuts[rank]`` and ``cuts[rank + 1]``."""

    def __init__(self, data: SyntheticCriteo, rank: int, world: int, cuts: tuple[int, ...] | None = None) -> None:
        cuts = cuts or tuple(r * BATCH // world for r in range(world + 1))
        self.data, self.part = data, slice(cuts[rank], cuts[rank + 1])

    def __call__(self, i: int):  # type: ignore[no-untyped-def]
        b = self.data.batch(i)
        return type(b)({f: k[self.part] for f, k in b.sparse.items()}, b.dense[self.part], b.label[self.part])


def _fit(root: Path, rank: int, world: int, prefetch: bool, cuts: tuple[int, ...] | None = None) -> dict[str, np.ndarray]:
    """The Trainer's own loop (DDP for the dense layers when sharded), pipelined or not."""
    from damo_hybrid.trainer import Trainer

    torch.set_num_threads(1)
    data = SyntheticCriteo(BATCH, seed=1, vocab_min=200, vocab_max=3000, n_sparse=6, n_dense=3)
    with EmbeddingStore(root / f"rank{rank}", model_tables("deepfm", 8, OPTS["adagrad"],
                                                           InitializerConfig.normal(std=0.1, seed=3))) as store:
        torch.manual_seed(rank)  # other weights on rank 1: DDP gives every rank rank 0's initial ones
        model = DeepFM(store, data.sparse_fields, 3, hidden=(16,), cache_mb=1e-9, min_cache_rows=400, backend="cpu")
        held = SyntheticCriteo(BATCH, seed=1, vocab_min=200, vocab_max=3000, n_sparse=6, n_dense=3, split=1)
        trainer = Trainer(model, torch.optim.Adam(model.parameters(), lr=1e-2), _Slice(data, rank, world, cuts),
                          _Slice(held, rank, world))
        trainer.fit(STEPS, prefetch=prefetch)
        keys = np.concatenate([k for k, _ in store.scan("emb")])
        out = {"keys": keys, "weights": store.read_rows("emb", keys)[0].weights, "eval": np.array(trainer.evaluate(3))}
        out.update({f"dense.{n}": p.detach().numpy() for n, p in model.state_dict().items()})
        return out


def _fit_main(rank: int, world: int, port: int, root: str, cuts: tuple[int, ...] | None = None) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    try:
        np.savez(Path(root) / f"fit{rank}.npz", **_fit(Path(root), rank, world, prefetch=True, cuts=cuts))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("cuts", [None, (0, 29, BATCH), (0, 0, BATCH)], ids=["even", "uneven", "one-empty"])
def test_the_trainers_pipelined_run_on_two_ranks_equals_one_sequential_process(tmp_path, cuts):
    """Prefetch runs each rank's key exchange in the host-manager thread while the worker
    exchanges rows and gradients (each on its own process group) and DDP averages the dense ones;
    a global batch split unevenly (or leaving a rank no rows) gives the same steps: each rank's
    loss counts by its rows."""
    ref = _fit(tmp_path / "one", 0, 1, prefetch=False)
    mp.start_processes(_fit_main, args=(2, _free_port(), str(tmp_path), cuts), nprocs=2, start_method="spawn")
    outs = [dict(np.load(tmp_path / f"fit{r}.npz")) for r in range(2)]
    keys = np.concatenate([o["keys"] for o in outs])
    order, ref_order = np.argsort(keys), np.argsort(ref["keys"])
    np.testing.assert_array_equal(keys[order], ref["keys"][ref_order])
    np.testing.assert_allclose(np.concatenate([o["weights"] for o in outs])[order], ref["weights"][ref_order],
                               rtol=1e-5, atol=1e-5)
    for name in (n for n in ref if n.startswith("dense.")):
        for o in outs:
            np.testing.assert_allclose(o[name], ref[name], rtol=1e-5, atol=1e-5, err_msg=name)
    for o in outs:  # every rank reports the AUC and logloss of all ranks' held-out slices together
        np.testing.assert_allclose(o["eval"], ref["eval"], rtol=1e-5, atol=1e-6)


def test_a_shard_store_records_its_rank_and_refuses_another(tmp_path):
    from damo_hybrid.dist import claim_shard
    from damo_hybrid.errors import ConfigConflictError

    claim_shard(tmp_path, 2, 1)
    claim_shard(tmp_path, 2, 1)  # the same shard again: fine
    for world, rank in ((2, 0), (3, 1), (1, 0)):
        with pytest.raises(ConfigConflictError, match="holds shard 1 of 2 .* this is rank"):
            claim_shard(tmp_path, world, rank)


def test_the_communication_benchmark_counts_what_the_exchanges_send_and_the_model_adds_up():
    from damo_hybrid.bench.dist import run_dist_bench, scaling_model

    res = run_dist_bench(world=2, batch=256, steps=3, warmup=1, cache_mb=1.0)
    remote = [(r["keys_bytes_per_step"] - 8) / 8 for r in res["ranks"]]  # 8 bytes a key, and one count sent
    assert min(remote) > 0 and all(r["step_ms_median"] > 0 and r["dense_bytes"] > 0 for r in res["ranks"])
    # each key sent to another rank comes back as a row (17 floats) and goes out again as a gradient
    sent = sum(r["rows_and_grads_bytes_per_step"] for r in res["ranks"])
    assert sent == pytest.approx(2 * 4 * 17 * sum(remote))
    m = scaling_model(10_000, 68, 4096, 10.0, 1e6, 200.0, 4, dense_bytes=1_000_000)
    net = 10_000 * 0.75 * 76 + 2 * 0.75 * 1_000_000
    assert m["net_ms"] == pytest.approx(1000 * net / 1.25e9) and m["host_ms"] == pytest.approx(10.0)
    assert m["compute_ms"] == 50.0 and m["bound"] == "compute" and m["samples_per_s"] == pytest.approx(4096 / 0.05)


def _doomed_main(rank: int, port: int, root: str) -> None:
    """Rank 1 is killed (SIGKILL) at step 5; rank 0 records how its run ended."""
    import os
    import signal
    import time

    from damo_hybrid.trainer import Trainer

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=30))
    torch.set_num_threads(1)
    data = SyntheticCriteo(BATCH, seed=1, vocab_min=200, vocab_max=3000, n_sparse=6, n_dense=3)
    tables = model_tables("deepfm", 8, OPTS["adagrad"], InitializerConfig.normal(std=0.1, seed=3))
    with EmbeddingStore(Path(root) / f"rank{rank}", tables) as store:
        model = DeepFM(store, data.sparse_fields, 3, hidden=(16,), cache_mb=1, backend="cpu")
        t0 = time.monotonic()

        def progress(step: int, loss: float) -> None:
            if rank == 1 and step == 5:
                os.kill(os.getpid(), signal.SIGKILL)

        try:
            Trainer(model, torch.optim.Adam(model.parameters(), lr=1e-2), _Slice(data, rank, 2)).fit(
                50, progress=progress)
            result = "finished"
        except Exception as e:  # what the surviving rank reports
            result = f"{type(e).__name__}: {e}"
        (Path(root) / "rank0.txt").write_text(f"{time.monotonic() - t0:.1f}\n{result}")


def test_a_rank_killed_mid_run_stops_the_other_with_a_clear_error(tmp_path):
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_doomed_main, args=(r, port, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert not any(p.is_alive() for p in procs), "no rank may hang on a collective"
    seconds, result = (tmp_path / "rank0.txt").read_text().split("\n", 1)
    assert float(seconds) < 60
    assert result.startswith("ExchangeError") and "a rank stopped" in result, result


def _lonely_table():  # type: ignore[no-untyped-def]
    from damo_hybrid import ScheduleConfig, TableConfig
    from damo_hybrid.config import ScheduleKind

    sched = ScheduleConfig(ScheduleKind.EXPONENTIAL, decay_steps=1, decay_rate=0.5, staircase=True)
    return TableConfig("t", 4, optimizer=OptimizerConfig(kind="sgd", lr=0.5, schedule=sched))  # lr 0.5, 0.25, ...


def _lonely_keys() -> tuple[np.ndarray, np.ndarray]:
    keys = np.arange(200, dtype=np.uint64)
    return keys[shard_of(keys, 2) == 0], keys[shard_of(keys, 2) == 1]


def _lonely_main(rank: int, port: int, root: str) -> None:
    """Step 0: every key belongs to rank 0, so rank 1 serves nothing; step 1: a key of each."""
    from damo_hybrid.dist import ShardedEmbeddingCollection
    from damo_hybrid.nn import Feature

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    try:
        with EmbeddingStore(Path(root) / f"rank{rank}", [_lonely_table()]) as store:
            coll = ShardedEmbeddingCollection(store, [Feature("f", "t")], backend="cpu")
            own0, own1 = _lonely_keys()
            for batch in (own0[:4] if rank == 0 else own0[4:6], np.array([own0[0], own1[0]], np.uint64)):
                out = coll(coll.prepare({"f": batch}))["f"]
                out.sum().backward()
                coll.apply_gradients()
            coll.flush()
            np.savez(Path(root) / f"lonely{rank}.npz", step=store.step("t"),
                     w=store.lookup("t", np.array([own1[0]], np.uint64)))
    finally:
        dist.destroy_process_group()


def test_a_rank_that_serves_no_key_in_a_step_still_counts_the_step(tmp_path):
    """The learning-rate schedule follows each table's global step: every shard counts every step."""
    from damo_hybrid.store import open_memory_store

    mp.start_processes(_lonely_main, args=(_free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    r0, r1 = (dict(np.load(tmp_path / f"lonely{r}.npz")) for r in range(2))
    assert int(r0["step"]) == int(r1["step"]) == 2
    own1 = _lonely_keys()[1][:1]
    with open_memory_store([_lonely_table()]) as st:
        init = st.lookup("t", own1)
    # own1[0] is stepped once, at step 1 (lr 0.25), by a gradient of ones from each rank, averaged
    np.testing.assert_array_equal(r1["w"], init - np.float32(0.25))


def _ckpt_main(rank: int, port: int, root: str) -> None:
    """6 sharded steps, then a sharded checkpoint at step 6."""
    from damo_hybrid.dist.checkpoint import save_sharded_checkpoint

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    try:
        torch.set_num_threads(1)
        data = SyntheticCriteo(BATCH, seed=1, vocab_min=200, vocab_max=3000, n_sparse=6, n_dense=3)
        tables = model_tables("deepfm", 8, OPTS["adagrad"], InitializerConfig.normal(std=0.1, seed=3))
        with EmbeddingStore(Path(root) / f"rank{rank}", tables) as store:
            from damo_hybrid.trainer import Trainer

            model = DeepFM(store, data.sparse_fields, 3, hidden=(16,), cache_mb=1e-9, min_cache_rows=400, backend="cpu")
            trainer = Trainer(model, torch.optim.Adam(model.parameters(), lr=1e-2), _Slice(data, rank, 2))
            trainer.fit(6)
            model.sparse.flush()
            save_sharded_checkpoint(Path(root) / "ck", 6, store, trainer.state() if rank == 0 else None)
    finally:
        dist.destroy_process_group()


def test_a_sharded_checkpoint_restores_onto_any_number_of_ranks(tmp_path):
    from damo_hybrid.dist.checkpoint import latest_sharded_checkpoint, restore_shard
    from damo_hybrid.errors import DamoHybridError
    from damo_hybrid.trainer import Trainer

    mp.start_processes(_ckpt_main, args=(_free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    ck, marker = latest_sharded_checkpoint(tmp_path / "ck")
    assert marker["world"] == 2 and (ck / "trainer.pt").is_file()

    def rows_of(stores):  # every row of every store, by key
        keys, w, st = [], [], []
        for s in stores:
            for k, r in s.scan("emb"):
                keys.append(k), w.append(r.weights), st.append(r.state)
        keys, w, st = np.concatenate(keys), np.concatenate(w), np.concatenate(st)
        o = np.argsort(keys)
        return keys[o], w[o], st[o]

    saved = [EmbeddingStore(ck / f"shard-{r:05d}-of-00002", read_only=True) for r in range(2)]
    want = rows_of(saved)
    for s in saved:
        s.close()
    for world in (1, 2, 3):
        stores = [restore_shard(ck, tmp_path / f"w{world}r{r}", r, world) for r in range(world)]
        try:
            got = rows_of(stores)
            for a, b in zip(got, want):
                np.testing.assert_array_equal(a, b)
            for r, s in enumerate(stores):  # each new shard holds exactly its keys, at the saved step
                k = np.concatenate([k for k, _ in s.scan("emb")])
                assert (shard_of(k, world) == r).all() and s.step("emb") == 6
        finally:
            for s in stores:
                s.close()
    # training goes on from the 2 -> 1 restore, in one process
    with EmbeddingStore(tmp_path / "w1r0") as store:
        data = SyntheticCriteo(BATCH, seed=1, vocab_min=200, vocab_max=3000, n_sparse=6, n_dense=3)
        model = DeepFM(store, data.sparse_fields, 3, hidden=(16,), cache_mb=1e-9, min_cache_rows=2000, backend="cpu")
        trainer = Trainer(model, torch.optim.Adam(model.parameters(), lr=1e-2), data.batch)
        trainer.load_state(torch.load(ck / "trainer.pt", weights_only=False))
        trainer.fit(2)
        assert store.step("emb") == 8
    (ck / "COMPLETE.json").unlink()  # a checkpoint a rank left incomplete is never used
    assert latest_sharded_checkpoint(tmp_path / "ck") is None
    with pytest.raises(DamoHybridError, match="not a complete checkpoint"):
        restore_shard(ck, tmp_path / "never", 0, 1)


def _resume_main(rank: int, port: int, root: str, phase: str) -> None:
    """``full``: 9 steps with a sharded checkpoint every 3; ``killed``: the same, rank 1 killed
    (SIGKILL) at step 7; ``resume``: both ranks restore the newest complete checkpoint and run to 9."""
    import os
    import signal

    from damo_hybrid.dist.checkpoint import latest_sharded_checkpoint, restore_shard
    from damo_hybrid.trainer import Trainer

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    torch.set_num_threads(1)
    data = SyntheticCriteo(BATCH, seed=1, vocab_min=200, vocab_max=3000, n_sparse=6, n_dense=3)
    tables = model_tables("deepfm", 8, OPTS["adagrad"], InitializerConfig.normal(std=0.1, seed=3))
    ck_root = Path(root) / ("ck_full" if phase == "full" else "ck")
    if phase == "resume":
        ck, _ = latest_sharded_checkpoint(ck_root)
        store = restore_shard(ck, Path(root) / f"resumed{rank}", rank, 2)
    else:
        store = EmbeddingStore(Path(root) / f"{phase}{rank}", tables)
    with store:
        torch.manual_seed(0)  # the same initial dense weights in both runs
        model = DeepFM(store, data.sparse_fields, 3, hidden=(16,), cache_mb=1e-9, min_cache_rows=400, backend="cpu")
        trainer = Trainer(model, torch.optim.Adam(model.parameters(), lr=1e-2), _Slice(data, rank, 2))
        if phase == "resume":
            trainer.load_state(torch.load(ck / "trainer.pt", weights_only=False))

        def progress(step: int, loss: float) -> None:
            if phase == "killed" and rank == 1 and step == 7:
                os.kill(os.getpid(), signal.SIGKILL)

        try:
            trainer.fit(9 - trainer.step, progress=progress, checkpoint_every=3, checkpoint_dir=ck_root)
        except Exception:
            assert phase == "killed"
            return
        model.sparse.flush()
        keys = np.concatenate([k for k, _ in store.scan("emb")])
        out = {"keys": keys, "weights": store.read_rows("emb", keys)[0].weights, "step": store.step("emb")}
        out.update({f"dense.{n}": p.detach().numpy() for n, p in model.state_dict().items()})
        np.savez(Path(root) / f"{phase}{rank}.npz", **out)
    dist.destroy_process_group()


def test_after_a_rank_is_killed_every_rank_resumes_exactly_from_the_last_checkpoint(tmp_path):
    import multiprocessing

    from damo_hybrid.dist.checkpoint import latest_sharded_checkpoint

    ctx = multiprocessing.get_context("spawn")
    for phase in ("full", "killed", "resume"):
        port = _free_port()
        procs = [ctx.Process(target=_resume_main, args=(r, port, str(tmp_path), phase)) for r in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(120)
        assert not any(p.is_alive() for p in procs), f"{phase}: no rank may hang"
        if phase == "killed":
            assert latest_sharded_checkpoint(tmp_path / "ck")[1]["step"] == 6
    for r in range(2):
        full, resumed = dict(np.load(tmp_path / f"full{r}.npz")), dict(np.load(tmp_path / f"resume{r}.npz"))
        assert int(resumed["step"]) == int(full["step"]) == 9
        np.testing.assert_array_equal(resumed["keys"], full["keys"])
        for name in (n for n in full if n == "weights" or n.startswith("dense.")):
            np.testing.assert_array_equal(resumed[name], full[name], err_msg=name)


def test_train_under_torchrun_shards_the_tables_over_the_ranks(tmp_path):
    import subprocess
    import sys

    store = tmp_path / "s"
    train = ["-m", "damo_hybrid.cli", "train", "--batch-size", "256", "--dim", "8", "--vocab-min", "300", "--vocab-max",
             "3000", "--eval-batches", "1", "--quiet", "--backend", "cpu", "--store", str(store), "--checkpoint-every", "3"]

    def ranks(n: int) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-port",
                str(_free_port())]

    cmd = ranks(2) + train + ["--steps", "6"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("samples/s") == 1  # rank 0 alone prints
    for rank in range(2):
        with EmbeddingStore(store / f"rank-{rank:05d}-of-00002", read_only=True) as st:
            keys = np.concatenate([k for k, _ in st.scan("emb")])
            assert len(keys) > 0 and (shard_of(keys, 2) == rank).all() and st.step("emb") == 6
    from damo_hybrid.dist.checkpoint import latest_sharded_checkpoint

    ck, marker = latest_sharded_checkpoint(tmp_path / "s.ckpt")
    assert {k: marker[k] for k in ("world", "sharding_version", "step")} == {"world": 2, "sharding_version": 1, "step": 6}
    assert "sha256" in marker["manifest"]["files"]["trainer.pt"] and (ck / "trainer.pt").is_file()
    saved, weights = set(), {}
    for rank in range(2):
        with EmbeddingStore(store / f"rank-{rank:05d}-of-00002", read_only=True) as st:
            for k, rows in st.scan("emb"):
                saved |= set(k.tolist())
                weights.update(zip(k.tolist(), rows.weights))
    # export, dump (both formats) and inspect read the run's rank stores as one store: one output
    cli = [sys.executable, "-m", "damo_hybrid.cli"]
    for cmd_out in (["export", "--out", str(tmp_path / "rows.npz")], ["dump", "--out", str(tmp_path / "dump.npz")],
                    ["dump", "--format", "seed", "--out", str(tmp_path / "seed.bin")]):
        r = subprocess.run(cli + [cmd_out[0], "--store", str(store)] + cmd_out[1:], capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
    with np.load(tmp_path / "rows.npz") as z:
        keys = z["keys_emb"]
        assert set(keys.tolist()) == saved and (keys[1:] > keys[:-1]).all()  # every shard's rows, sorted by key
        np.testing.assert_array_equal(z["weights_emb"], np.stack([weights[k] for k in keys.tolist()]))
    from damo_hybrid.compat.seed_format import read_seed_format

    assert set(np.concatenate([k for k, _ in read_seed_format(tmp_path / "seed.bin").values()]).tolist()) == saved
    r = subprocess.run(cli + ["inspect", "--store", str(store), "--json"], capture_output=True, text=True, timeout=120)
    info = json.loads(r.stdout)["tables"]["emb"]
    assert info["rows"] == len(saved) and info["step"] == 6
    # export --onnx of the sharded checkpoint: one export of every rank's rows, as one process's
    pytest.importorskip("onnxruntime")
    from damo_hybrid.pipeline.checkpoint import load_trainer_state
    from damo_hybrid.serving import Predictor

    r = subprocess.run(cli + ["export", "--store", str(store), "--onnx", str(tmp_path / "onnx")], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(saved) == np.load(tmp_path / "onnx" / "keys_emb.npy").tolist()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merge-")]  # the merged store is removed
    state = load_trainer_state(ck)
    with EmbeddingStore(store / "rank-00000-of-00002", read_only=True) as st:
        tables = list(st.tables.values())
    with EmbeddingStore(tmp_path / "merged", tables) as merged:  # the reference: the shards' rows loaded by hand
        for rank in range(2):
            with EmbeddingStore(store / f"rank-{rank:05d}-of-00002", read_only=True) as st:
                for t in tables:
                    for k, rows in st.scan(t.name):
                        merged.load_rows(t.name, k, rows)
        m = DeepFM(merged, state["model_spec"]["fields"], state["model_spec"]["n_dense"], backend="cpu")
        m.load_state_dict(state["model"])
        m.eval()
        b = SyntheticCriteo(256, seed=0, vocab_min=300, vocab_max=3000).batch(1)  # a trained batch
        with torch.no_grad():
            want = m(m.prepare(b.sparse), torch.from_numpy(b.dense)).numpy()
    np.testing.assert_allclose(Predictor(tmp_path / "onnx").predict(b.sparse, b.dense), want, atol=1e-5, rtol=0)
    # --resume on 2 ranks: every rank restores its shard of the newest checkpoint and trains on
    r = subprocess.run([sys.executable] + train + ["--steps", "9", "--resume", "--nproc", "2"], capture_output=True,
                       text=True, timeout=300)  # --nproc: the command launches torchrun itself
    assert r.returncode == 0, r.stderr[-3000:]
    assert "at step 6" in r.stdout
    for rank in range(2):
        with EmbeddingStore(store / f"rank-{rank:05d}-of-00002", read_only=True) as st:
            assert st.step("emb") == 9
    # one process resumes the sharded run: the shards of its newest checkpoint merged into one store
    r = subprocess.run([sys.executable] + train + ["--steps", "12", "--resume"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "at step 9" in r.stdout
    with EmbeddingStore(store, read_only=True) as st:
        assert st.step("emb") == 12
        assert saved <= set(np.concatenate([k for k, _ in st.scan("emb")]).tolist())
    # 3 ranks resume from the newest checkpoint of either kind: the one process's, at step 12 (the
    # sharded one at step 9 is older); its store gives way to the ranks' stores
    r = subprocess.run([sys.executable] + train + ["--steps", "15", "--resume", "--nproc", "3"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "at step 12" in r.stdout
    # then 2 ranks: the 3 ranks' stores go, so the run's store reads as one
    r = subprocess.run([sys.executable] + train + ["--steps", "18", "--resume", "--nproc", "2"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "at step 15" in r.stdout
    assert sorted(p.name for p in store.iterdir() if not p.name.startswith(".")) == [
        "rank-00000-of-00002", "rank-00001-of-00002"]
    r = subprocess.run(cli + ["inspect", "--store", str(store), "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["tables"]["emb"]["step"] == 18


def test_a_sharded_runs_store_directory_is_read_whole_or_refused(tmp_path):
    from damo_hybrid.dist.shards import shard_dirs
    from damo_hybrid.errors import DamoHybridError

    assert shard_dirs(tmp_path / "absent") is None
    (tmp_path / "rank-00001-of-00002").mkdir()
    with pytest.raises(DamoHybridError, match=r"lacks the stores of ranks \[0\] of 2"):
        shard_dirs(tmp_path)
    (tmp_path / "rank-00000-of-00002").mkdir()
    assert [p.name for p in shard_dirs(tmp_path)] == ["rank-00000-of-00002", "rank-00001-of-00002"]
    (tmp_path / "rank-00000-of-00003").mkdir()
    with pytest.raises(DamoHybridError, match=r"runs on \[2, 3\] ranks"):
        shard_dirs(tmp_path)
    (tmp_path / "meta.json").write_text("{}")  # a store of its own
    assert shard_dirs(tmp_path) is None


@pytest.mark.parametrize("how", ["config", "abbreviation"])
def test_nproc_launches_ranks_that_each_run_once(tmp_path, monkeypatch, how):
    """--nproc from a config file, or abbreviated, reached every rank too, and each rank launched
    ranks of its own (or torchrun refused the abbreviation) in place of training."""
    import subprocess

    from torch.distributed.run import get_args_parser

    from damo_hybrid.cli import _parse, main
    from damo_hybrid.cli.distributed import launch_local_ranks

    cfg = tmp_path / "run.toml"
    cfg.write_text("[train]\nnproc = 2\nsteps = 2\nbatch-size = 64\nquiet = true\n")
    argv = ["train", "--config", str(cfg)] if how == "config" else ["train", "--npr", "2", "--config", str(cfg)]
    args = _parse(argv)
    args.argv = argv
    assert args.nproc == 2
    launched = []

    class Proc:
        def __init__(self, cmd, env):
            launched.append((cmd, env))

        def wait(self):
            return 0

    monkeypatch.setattr(subprocess, "Popen", Proc)
    assert launch_local_ranks(args) == 0
    (cmd, env), = launched
    ours = get_args_parser().parse_args(cmd[3:])  # torchrun takes the command (it refused --nproc anywhere)
    assert ours.nproc_per_node == "2" and ours.training_script == "damo_hybrid.cli"
    rank_argv = ours.training_script_args
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert main(rank_argv) == 0 and len(launched) == 1  # a rank trains: it launches nothing


def test_a_store_of_the_other_kind_is_refused_without_resume(tmp_path, capsys):
    from damo_hybrid.cli import main
    from damo_hybrid.cli.distributed import Ranks, check_store_root

    sharded = tmp_path / "s"
    (sharded / "rank-00000-of-00002").mkdir(parents=True)
    rc = main(["train", "--store", str(sharded), "--steps", "1", "--batch-size", "64", "--quiet"])
    assert rc == 2 and "holds a sharded run's stores" in capsys.readouterr().err
    assert [p.name for p in sharded.iterdir()] == ["rank-00000-of-00002"]  # nothing written there
    one = tmp_path / "one"
    EmbeddingStore(one, []).close()
    with pytest.raises(ValueError, match="holds a one-process store, and this run is on 2 ranks"):
        check_store_root(one / "rank-00000-of-00002", Ranks(0, 2))
    check_store_root(tmp_path / "new" / "rank-00000-of-00002", Ranks(0, 2))  # a new run's root: fine


def _files_main(rank: int, port: int, root: str) -> None:
    from damo_hybrid.data.schema import FORMATS
    from damo_hybrid.data.source import EndOfData, StreamSource
    from damo_hybrid.data.stream import DelimitedStream
    from damo_hybrid.dist.data import RankStream

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=120))
    try:
        group = dist.new_group(backend="gloo")

        def source() -> RankStream:
            return RankStream(StreamSource(DelimitedStream(root, FORMATS["criteo"], 50, part=(rank, 2)), epochs=1), group)

        rs, got = source(), []
        try:
            while True:
                got.append(rs(len(got)).sparse["C1"])
        except EndOfData:
            pass
        again = source()
        again(0), again(1)
        state = again.state(2)  # every rank's position
        resumed = source()
        resumed.load_state(state)
        after = resumed(2).sparse["C1"]
        elsewhere = source()  # positions of another number of ranks: the epoch restarts at the top
        elsewhere.load_state({"world": 3, "ranks": state["ranks"] + state["ranks"][:1]})
        top = elsewhere(2).sparse["C1"]
        json.dump({"n": len(got), "own": [p.name for p in rs.source.stream.paths],
                   "state_world": state["world"], "resumed_equal": bool(np.array_equal(after, got[2])),
                   "restart_equal": bool(np.array_equal(top, got[0]))}, open(Path(root).parent / f"files{rank}.json", "w"))
    finally:
        dist.destroy_process_group()


def test_ranks_reading_their_own_files_end_together_and_resume_where_they_stopped(tmp_path):
    from damo_hybrid.bench.loader import write_criteo_file

    data = tmp_path / "data"
    data.mkdir()
    for i, rows in enumerate([120, 400, 130, 390]):  # rank 0 gets 250 rows (5 batches), rank 1 790 (16)
        write_criteo_file(data / f"part-{i}.tsv", rows, distinct=500, seed=i)
    mp.start_processes(_files_main, args=(_free_port(), str(data)), nprocs=2, start_method="spawn")
    out = [json.loads((tmp_path / f"files{r}.json").read_text()) for r in range(2)]
    assert [o["own"] for o in out] == [["part-0.tsv", "part-2.tsv"], ["part-1.tsv", "part-3.tsv"]]
    assert out[0]["n"] == out[1]["n"] == 5  # both stop where rank 0's files end
    assert all(o["state_world"] == 2 and o["resumed_equal"] and o["restart_equal"] for o in out), out


def test_train_under_torchrun_on_several_files_gives_each_rank_its_own(tmp_path):
    import subprocess
    import sys

    from damo_hybrid.bench.loader import write_criteo_file

    data = tmp_path / "data"
    data.mkdir()
    for i, rows in enumerate([700, 1000, 600, 900]):
        write_criteo_file(data / f"part-{i}.tsv", rows, distinct=2000, seed=i)
    store = tmp_path / "s"
    train = ["-m", "damo_hybrid.cli", "train", "--stream", "--data", str(data), "--format", "criteo", "--batch-size", "128",
             "--dim", "8", "--eval-fraction", "0.2", "--quiet", "--backend", "cpu", "--store", str(store),
             "--checkpoint-every", "5"]
    r = subprocess.run([sys.executable] + train + ["--epochs", "1", "--nproc", "2"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "eval AUC" in r.stdout and "fewer files than" not in r.stdout
    steps = set()
    for rank in range(2):  # 64 rows per rank and batch: rank 0's 1,040 training rows end the epoch for both
        with EmbeddingStore(store / f"rank-{rank:05d}-of-00002", read_only=True) as st:
            steps.add(st.step("emb"))
    assert len(steps) == 1 and 14 <= steps.pop() <= 18
    # a second epoch on 2 ranks resumes each rank at its own position of the newest checkpoint
    r = subprocess.run([sys.executable] + train + ["--epochs", "2", "--nproc", "2", "--resume"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from" in r.stdout and "restarts" not in r.stderr


def test_train_on_ranks_cuts_a_single_file_by_byte_range(tmp_path):
    """One plain file on 2 ranks: each reads its half of the bytes in batches of half the global
    batch, so the epoch ends after about the steps of one process."""
    import subprocess
    import sys

    from damo_hybrid.bench.loader import write_criteo_file

    data = tmp_path / "one.tsv"
    write_criteo_file(data, 2000, distinct=2000, seed=3)
    store = tmp_path / "s"
    train = ["-m", "damo_hybrid.cli", "train", "--stream", "--data", str(data), "--format", "criteo", "--batch-size", "128",
             "--dim", "8", "--quiet", "--backend", "cpu", "--store", str(store), "--epochs", "1", "--nproc", "2"]
    r = subprocess.run([sys.executable] + train, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "every rank reads all of it" not in r.stdout
    from argparse import Namespace

    from damo_hybrid.cli.data import own_part

    assert own_part(Namespace(format="criteo", rank_input="own"), data, 2)  # the CLI cut it by byte range
    assert not own_part(Namespace(format="criteo", rank_input="all"), data, 2)
    gz = tmp_path / "one.tsv.gz"
    gz.write_bytes(b"")
    assert not own_part(Namespace(format="criteo", rank_input="own"), gz, 2)  # read whole by every rank
    assert own_part(Namespace(format="criteo", rank_input="own"), [gz, gz], 2)  # one file each
    for rank in range(2):  # ~1000 rows per rank in batches of 64: 15 full steps, the shorter part ends both
        with EmbeddingStore(store / f"rank-{rank:05d}-of-00002", read_only=True) as st:
            assert 14 <= st.step("emb") <= 16


def _bag_tables():  # type: ignore[no-untyped-def]
    from damo_hybrid import TableConfig

    init = InitializerConfig.normal(std=0.1, seed=7)
    return [TableConfig("a", 4, optimizer=OPTS["adagrad"], initializer=init),
            TableConfig("b", 3, optimizer=OPTS["adam"], initializer=init)]


def _bag_batches(steps: int, batch: int):  # type: ignore[no-untyped-def]
    """Per step: single keys, two bag features (some bags empty) and per-feature output weights."""
    rng = np.random.default_rng(11)
    for _ in range(steps):
        u = rng.integers(0, 200, batch).astype(np.uint64)
        bags = {}
        for f in ("tags", "cats"):
            n = rng.integers(0, 4, batch)
            bags[f] = (rng.integers(0, 300, int(n.sum())).astype(np.uint64), np.concatenate([[0], np.cumsum(n)]))
        yield u, bags


def _bag_slice(u, bags, lo: int, hi: int):  # type: ignore[no-untyped-def]
    out = {"u": u[lo:hi]}
    for f, (v, o) in bags.items():
        out[f] = (v[o[lo]:o[hi]], o[lo:hi + 1] - o[lo])
    return out


def _bag_loss(out: dict, scale: float) -> torch.Tensor:  # type: ignore[type-arg]
    w = {f: torch.linspace(-1.0, 1.0, x.shape[1]) for f, x in out.items()}
    return sum(((x * w[f]).sum(1) ** 2).sum() for f, x in out.items()) * scale  # type: ignore[return-value]


_BAG_FEATURES = (("u", "a", None), ("tags", "a", "mean"), ("cats", "b", "sum"))


def _bag_main(rank: int, port: int, root: str) -> None:
    from damo_hybrid.dist import ShardedEmbeddingCollection
    from damo_hybrid.nn import Feature

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    try:
        with EmbeddingStore(Path(root) / f"bag{rank}", _bag_tables()) as store:
            coll = ShardedEmbeddingCollection(store, [Feature(*f) for f in _BAG_FEATURES], backend="cpu",
                                              cache_mb=1e-9, min_cache_rows=80)  # ~250 keys a shard: evictions
            first = coll.prepare(_bag_slice(*next(_bag_batches(1, 8)), 0, 4))
            with pytest.raises(ValueError, match="have bag features: use forward"):
                coll.forward_tables(first)
            coll.release(first)
            for u, bags in _bag_batches(8, 40):
                lo, hi = (0, 15) if rank == 0 else (15, 40)  # uneven slices
                _bag_loss(coll(coll.prepare(_bag_slice(u, bags, lo, hi))), 2 / 40).backward()
                coll.apply_gradients()
            coll.flush()
            assert all(c.stats.evictions > 0 for c in coll.caches.values())
            np.savez(Path(root) / f"bag{rank}.npz",
                     **{t: np.concatenate([r.weights for _, r in store.scan(t)]) for t in ("a", "b")},
                     **{f"{t}_keys": np.concatenate([k for k, _ in store.scan(t)]) for t in ("a", "b")})
    finally:
        dist.destroy_process_group()


def test_bag_features_on_two_ranks_equal_one_process(tmp_path):
    from damo_hybrid.nn import EmbeddingCollection, Feature

    mp.start_processes(_bag_main, args=(_free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    with EmbeddingStore(tmp_path / "one", _bag_tables()) as store:
        coll = EmbeddingCollection(store, [Feature(*f) for f in _BAG_FEATURES], backend="cpu", cache_mb=1e-9,
                                   min_cache_rows=160)
        for u, bags in _bag_batches(8, 40):
            _bag_loss(coll(coll.prepare(_bag_slice(u, bags, 0, 40))), 1 / 40).backward()
            coll.apply_gradients()
        coll.flush()
        for t in ("a", "b"):
            keys = np.concatenate([k for k, _ in store.scan(t)])
            want = dict(zip(keys.tolist(), np.concatenate([r.weights for _, r in store.scan(t)])))
            got = {}
            for r in range(2):
                z = np.load(tmp_path / f"bag{r}.npz")
                assert (shard_of(z[f"{t}_keys"], 2) == r).all()
                got.update(zip(z[f"{t}_keys"].tolist(), z[t]))
            assert got.keys() == want.keys()
            np.testing.assert_allclose(np.stack([got[k] for k in want]), np.stack(list(want.values())), atol=1e-5)


@pytest.mark.parametrize("backend", ["gloo", pytest.param("nccl", marks=pytest.mark.requires_cuda)])
def test_a_sharded_collection_on_one_rank_equals_the_local_one(tmp_path, backend):
    """Every exchange of a sharded step runs (to itself) on a one-rank group: gloo with the rows on
    the host, NCCL with them on the GPU (the keys are host arrays: the exchange moves them to the
    group's device and back). Rows and outputs equal the local collection's after steps that evict."""
    from damo_hybrid.dist.collection import ShardedEmbeddingCollection
    from damo_hybrid.dist.exchange import exchange_device
    from damo_hybrid.nn.collection import EmbeddingCollection, Feature

    device = "cuda" if backend == "nccl" else "cpu"
    assert exchange_device(backend).type == device
    tables = model_tables("deepfm", 8, OPTS["adagrad"], InitializerConfig.normal(std=0.1, seed=3))[:1]
    feats = [Feature("a", "emb"), Feature("b", "emb")]
    rng = np.random.default_rng(0)
    batches = [{f.name: rng.integers(0, 3000, 64).astype(np.uint64) for f in feats} for _ in range(6)]
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    try:
        outs = {}
        for kind in ("local", "sharded"):
            with EmbeddingStore(tmp_path / kind, tables) as store:
                cls = ShardedEmbeddingCollection if kind == "sharded" else EmbeddingCollection
                coll = cls(store, feats, cache_mb=1e-9, min_cache_rows=150, backend=device)
                got = []
                for b in batches:
                    x = coll(coll.prepare(b))
                    (x["a"] * x["b"]).sum().backward()
                    coll.apply_gradients()
                    got.append(x["a"].detach().cpu().numpy())
                assert sum(c.stats.evictions for c in coll.caches.values()) > 0
                coll.flush()
                keys = np.concatenate([k for k, _ in store.scan("emb")])
                outs[kind] = (np.stack(got), keys, store.read_rows("emb", keys)[0].weights)
        for a, b in zip(outs["local"], outs["sharded"]):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    finally:
        dist.destroy_process_group()


def test_the_exchange_error_test_reads_only_what_gloo_and_nccl_say():
    from damo_hybrid.dist.exchange import as_exchange_error
    from damo_hybrid.errors import ExchangeError

    lost = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [::1]:5")
    assert isinstance(as_exchange_error(lost, "row exchange"), ExchangeError)
    own = RuntimeError("my layer's socket count timeout must be positive")  # the model's own error
    assert as_exchange_error(own, "dense gradients' all-reduce") is own


def _one_process_checkpoint(root: Path, data: SyntheticCriteo, steps: int) -> Path:
    """``steps`` steps of one process on the global batches, with a checkpoint at the end."""
    from damo_hybrid.pipeline.checkpoint import latest_checkpoint
    from damo_hybrid.trainer import Trainer

    tables = model_tables("deepfm", 8, OPTS["adagrad"], InitializerConfig.normal(std=0.1, seed=3))
    with EmbeddingStore(root / "one", tables) as store:
        torch.manual_seed(0)  # a one-process pipeline holds two global batches' rows pinned: 1,200 rows
        model = DeepFM(store, data.sparse_fields, 3, hidden=(16,), cache_mb=1e-9, min_cache_rows=1200, backend="cpu")
        trainer = Trainer(model, torch.optim.Adam(model.parameters(), lr=1e-2), data.batch)
        trainer.fit(steps, checkpoint_every=steps, checkpoint_dir=root / "ck1")
    return latest_checkpoint(root / "ck1")


def _continue(ck: Path, dest: Path, rank: int, world: int, steps: int) -> dict[str, np.ndarray]:
    """Restore rank ``rank`` of ``world`` from ``ck`` and train ``steps`` more steps on its slice."""
    from damo_hybrid.dist.checkpoint import restore_shard
    from damo_hybrid.pipeline.checkpoint import load_trainer_state
    from damo_hybrid.trainer import Trainer

    torch.set_num_threads(1)
    data = SyntheticCriteo(BATCH, seed=1, vocab_min=200, vocab_max=3000, n_sparse=6, n_dense=3)
    with restore_shard(ck, dest, rank, world) as store:
        model = DeepFM(store, data.sparse_fields, 3, hidden=(16,), cache_mb=1e-9, min_cache_rows=1200 // world,
                       backend="cpu")
        trainer = Trainer(model, torch.optim.Adam(model.parameters(), lr=1e-2),
                          _Slice(data, rank, world) if world > 1 else data.batch)
        trainer.load_state(load_trainer_state(ck))
        trainer.fit(steps)
        model.sparse.flush()
        keys = np.concatenate([k for k, _ in store.scan("emb")])
        out = {"keys": keys, "weights": store.read_rows("emb", keys)[0].weights, "step": np.array(store.step("emb"))}
        out.update({f"dense.{n}": p.detach().numpy() for n, p in model.state_dict().items()})
        return out


def _continue_main(rank: int, port: int, root: str, ck: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    try:
        np.savez(Path(root) / f"cont{rank}.npz", **_continue(Path(ck), Path(root) / f"two{rank}", rank, 2, 3))
    finally:
        dist.destroy_process_group()


def test_a_one_process_checkpoint_restores_onto_two_ranks_and_training_goes_on_exactly(tmp_path):
    """1 -> 2: the restored shards hold the saved rows, split by the sharding rule, and 3 more
    steps on 2 ranks end where 3 more steps of the one process end."""
    from damo_hybrid.dist.checkpoint import restore_shard

    data = SyntheticCriteo(BATCH, seed=1, vocab_min=200, vocab_max=3000, n_sparse=6, n_dense=3)
    ck = _one_process_checkpoint(tmp_path, data, 6)
    with EmbeddingStore(ck / "store", read_only=True) as saved:
        want_keys = np.concatenate([k for k, _ in saved.scan("emb")])
        want = saved.read_rows("emb", want_keys)[0]
    got_keys, got_w, got_st = [], [], []
    for r in range(2):
        with restore_shard(ck, tmp_path / f"check{r}", r, 2) as s:
            k = np.concatenate([k for k, _ in s.scan("emb")])
            assert (shard_of(k, 2) == r).all() and s.step("emb") == 6
            rows = s.read_rows("emb", k)[0]
            got_keys.append(k), got_w.append(rows.weights), got_st.append(rows.state)
    order = np.argsort(np.concatenate(got_keys))
    np.testing.assert_array_equal(np.concatenate(got_keys)[order], want_keys)
    np.testing.assert_array_equal(np.concatenate(got_w)[order], want.weights)
    np.testing.assert_array_equal(np.concatenate(got_st)[order], want.state)

    ref = _continue(ck, tmp_path / "ref", 0, 1, 3)
    mp.start_processes(_continue_main, args=(_free_port(), str(tmp_path), str(ck)), nprocs=2, start_method="spawn")
    outs = [dict(np.load(tmp_path / f"cont{r}.npz")) for r in range(2)]
    assert all(int(o["step"]) == int(ref["step"]) == 9 for o in outs)
    keys = np.concatenate([o["keys"] for o in outs])
    order = np.argsort(keys)
    np.testing.assert_array_equal(keys[order], ref["keys"])
    np.testing.assert_allclose(np.concatenate([o["weights"] for o in outs])[order], ref["weights"], rtol=1e-5, atol=1e-5)
    for name in (n for n in ref if n.startswith("dense.")):
        for o in outs:
            np.testing.assert_allclose(o[name], ref[name], rtol=1e-5, atol=1e-5, err_msg=name)


def _stale_main(rank: int, port: int, root: str) -> None:
    """A checkpoint at step 2 over what an interrupted attempt left at that step (rank 1's shard, a
    shard of a 3-rank run, no marker), then a checkpoint at step 4 beside a damaged one set aside."""
    from damo_hybrid.dist.checkpoint import save_sharded_checkpoint

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    try:
        tables = [model_tables("deepfm", 4, OPTS["adagrad"], InitializerConfig.normal(std=0.1))[0]]
        with EmbeddingStore(Path(root) / f"rank{rank}", tables) as store:
            store.apply_gradients("emb", np.arange(rank * 10, rank * 10 + 5, dtype=np.uint64), np.ones((5, 5), np.float32))
            save_sharded_checkpoint(Path(root) / "ck", 2, store, {"step": 2} if rank == 0 else None)
    finally:
        dist.destroy_process_group()


def test_a_checkpoint_a_stopped_run_left_half_written_is_written_anew_and_damaged_ones_stay_aside(tmp_path):
    from damo_hybrid.dist.checkpoint import (
        latest_sharded_checkpoint,
        newest_checkpoint,
        prune_sharded_checkpoints,
    )

    ck = tmp_path / "ck" / "step-000000002"
    for stale in ("shard-00001-of-00002", "shard-00002-of-00003"):  # a rank's part, written before the stop
        (ck / stale / "junk").mkdir(parents=True)
    mp.start_processes(_stale_main, args=(_free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    found, marker = latest_sharded_checkpoint(tmp_path / "ck")
    assert found == ck and marker["world"] == 2
    assert sorted(p.name for p in ck.glob("shard-*")) == ["shard-00000-of-00002", "shard-00001-of-00002"]
    with EmbeddingStore(ck / "shard-00001-of-00002", read_only=True) as s:
        assert s.stats().table_rows["emb"] == 5
    # a newer checkpoint whose trainer state is damaged is set aside, and stays aside: never picked
    # again, never deleted by pruning
    bad = tmp_path / "ck" / "step-000000004"
    shutil.copytree(ck, bad)
    (bad / "COMPLETE.json").write_text(json.dumps({"world": 2, "sharding_version": marker["sharding_version"],
                                                   "step": 4}))
    (bad / "trainer.pt").write_bytes(b"truncated")
    got, state = newest_checkpoint(tmp_path / "ck")
    assert got == ck and state == {"step": 2}
    aside = [p.name for p in (tmp_path / "ck").iterdir() if ".damaged-" in p.name]
    assert len(aside) == 1
    assert latest_sharded_checkpoint(tmp_path / "ck")[0] == ck
    assert newest_checkpoint(tmp_path / "ck")[0] == ck
    prune_sharded_checkpoints(tmp_path / "ck", keep=1, rank=0)
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == sorted(["step-000000002", *aside])


def test_one_process_refuses_to_train_a_shard_of_a_run_on_ranks(tmp_path):
    """A rank's store holds only the keys it owns: a model built over it in one process would add
    rows of keys other ranks own. It is refused; restored onto one process it trains."""
    from damo_hybrid.dist.sharding import claim_shard
    from damo_hybrid.errors import ConfigConflictError

    tables = model_tables("deepfm", 4, OPTS["adagrad"], InitializerConfig.normal(std=0.1))
    data = SyntheticCriteo(16, seed=1, n_sparse=3, n_dense=1)
    with EmbeddingStore(tmp_path / "rank-00001-of-00002", tables) as store:
        claim_shard(store.root, 2, 1)
        with pytest.raises(ConfigConflictError, match="shard 1 of a run on 2 ranks"):
            DeepFM(store, data.sparse_fields, 1, hidden=(4,), backend="cpu")
    with EmbeddingStore(tmp_path / "single", tables) as store:
        claim_shard(store.root, 1, 0)  # a run restored onto one process records world 1
        DeepFM(store, data.sparse_fields, 1, hidden=(4,), backend="cpu")


def test_train_on_two_ranks_with_an_odd_batch_equals_one_process(tmp_path):
    """--batch-size 9 on 2 ranks: slices of 4 and 5 rows. Each rank's loss counts by its rows, so
    the run equals one process (before, ranks averaged their means: rows differed by 3e-3)."""
    import subprocess
    import sys

    train = [sys.executable, "-m", "damo_hybrid.cli", "train", "--batch-size", "9", "--steps", "6", "--dim", "4",
             "--vocab-min", "50", "--vocab-max", "400", "--eval-batches", "0", "--quiet", "--backend", "cpu",
             "--threads", "1"]
    r = subprocess.run(train + ["--store", str(tmp_path / "one")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run(train + ["--store", str(tmp_path / "two"), "--nproc", "2"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]

    def rows(*paths: Path) -> dict[int, np.ndarray]:
        out: dict[int, np.ndarray] = {}
        for p in paths:
            with EmbeddingStore(p, read_only=True) as st:
                for k, rw in st.scan("emb"):
                    out.update(zip(k.tolist(), rw.weights.copy()))
        return out

    one = rows(tmp_path / "one")
    two = rows(*(tmp_path / "two" / f"rank-{r:05d}-of-00002" for r in range(2)))
    assert one.keys() == two.keys()
    keys = sorted(one)
    np.testing.assert_allclose(np.stack([two[k] for k in keys]), np.stack([one[k] for k in keys]), rtol=0, atol=1e-5)


def test_the_exchange_error_names_the_cause_without_build_paths_or_a_cut_word():
    from damo_hybrid.dist.exchange import as_exchange_error

    text = ("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:28719 "
            + "while waiting for the remote side of the pair to answer the request " * 3)
    err = str(as_exchange_error(RuntimeError(text), "row exchange", sure=True))
    assert "pair.cc" not in err and "/pytorch/" not in err
    assert "Connection closed by peer" in err and "--resume" in err
    cause = err[err.index("(") + 1:err.index("): a rank")]
    assert cause.endswith(" ...") and cause[:-4].split(" ")[-1] in text.split(" ")  # cut between words
    assert len(err) < 300


def test_the_launcher_blames_the_rank_a_signal_stopped_not_the_ones_torchrun_stopped():
    from types import SimpleNamespace as F

    from damo_hybrid.cli.torchrun import first_failure

    assert first_failure({0: F(exitcode=-15), 1: F(exitcode=-9)}) == (1, -9)
    assert first_failure({0: F(exitcode=75), 1: F(exitcode=2)}) == (1, 2)  # rank 0 only lost rank 1
    assert first_failure({0: F(exitcode=143), 1: F(exitcode=75)}) == (0, 143)


def _rank_pid(tmp: Path, rank: int) -> int | None:
    import os

    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
            cmd = open(f"/proc/{pid}/cmdline", "rb").read()
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"damo_hybrid.cli\0train" in cmd and str(tmp).encode() in cmd:
            return int(pid)
    return None


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the rank through /proc")
def test_a_rank_killed_under_nproc_gives_one_line_naming_it_and_resume(tmp_path):
    """Before: torchrun's 46-59 lines of traceback, and (by a race) a false 'terminated (SIGTERM)'."""
    import os
    import signal
    import subprocess
    import sys
    import time

    cmd = [sys.executable, "-m", "damo_hybrid.cli", "train", "--nproc", "2", "--steps", "100000", "--batch-size", "256",
           "--dim", "4", "--vocab-min", "100", "--vocab-max", "1000", "--eval-batches", "0", "--quiet", "--backend",
           "cpu", "--store", str(tmp_path / "s"), "--checkpoint-every", "3"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline, victim = time.time() + 120, None
        while victim is None:
            assert p.poll() is None and time.time() < deadline, "the run ended before a rank could be killed"
            if any((c / "COMPLETE.json").exists() for c in (tmp_path / "s.ckpt").glob("step-*")):
                victim = _rank_pid(tmp_path, 1)
            time.sleep(0.1)
        os.kill(victim, signal.SIGKILL)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert p.returncode == 3, err
    assert len(lines) == 1, err
    assert "rank 1 of 2" in lines[0] and "SIGKILL" in lines[0] and "--resume" in lines[0] and len(lines[0]) < 300


def test_a_lost_rank_is_the_systems_refusal_at_the_cli_boundary():
    from damo_hybrid.cli import failure
    from damo_hybrid.errors import ExchangeError, PipelineError

    lost = ExchangeError("rank 0 of 2: the row exchange with the other ranks failed (x): a rank stopped")
    for e in (lost, _wrapped(PipelineError("the prepare stage failed"), lost)):
        f = failure.explain(e, "train")
        assert f.status == failure.SYSTEM and "rank 0 of 2" in f.line and not f.bug


def _wrapped(outer: BaseException, cause: BaseException) -> BaseException:
    outer.__cause__ = cause
    return outer


def test_a_complete_checkpoint_the_resume_passed_over_is_set_aside_and_written_anew(tmp_path):
    """On ranks a resume does not move a damaged newest checkpoint; before, the resumed run then
    failed at that step on every resume ("already exists and is complete")."""
    from damo_hybrid.dist.checkpoint import COMPLETE, save_sharded_checkpoint

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        tables = model_tables("deepfm", 4, OPTS["adagrad"], InitializerConfig.normal(std=0.1, seed=3))
        with EmbeddingStore(tmp_path / "s", tables) as store:
            first = save_sharded_checkpoint(tmp_path / "ck", 5, store, {"step": 5})
            (first / "trainer.pt").write_bytes(b"damaged")  # what the resume passed over
            again = save_sharded_checkpoint(tmp_path / "ck", 5, store, {"step": 5})
        assert again == first and (again / COMPLETE).is_file() and (again / "trainer.pt").read_bytes() != b"damaged"
        assert [p.name.split(".")[1][:7] for p in (tmp_path / "ck").iterdir() if ".damaged-" in p.name] == ["damaged"]
    finally:
        dist.destroy_process_group()
