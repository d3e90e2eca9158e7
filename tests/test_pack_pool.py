"""The native engine's pack pool: leases, holds for waiting requests, and evictions only for
a load that then fits; loads never block the pool."""

from __future__ import annotations

import time

import pytest
import torch

from modserve.checkpoint import Checkpoint
from modserve.demo.builtin import DEMO_PLAN
from modserve.engine.native import pool as pool_module
from modserve.engine.native.config import model_args
from modserve.engine.native.pool import PackLease, PackPool, Pending
from modserve.packs.build import BuildJob, build_packs
from modserve.packs.format import ResidentHashes
from modserve.packs.plan import Plan


@pytest.fixture(scope="module")
def packs(demo, tmp_path_factory) -> dict:
    """sw and bn as the demo cuts them (7 of 12 layers); te bigger (10 layers)."""
    jobs = [
        BuildJob("sw", demo.expert("sw"), DEMO_PLAN),
        BuildJob("bn", demo.expert("bn"), DEMO_PLAN),
        BuildJob("te", demo.expert("te"), Plan(bottom=5, top=3, transition=1)),
    ]
    built = build_packs(demo.resident, jobs, tmp_path_factory.mktemp("pool-packs"), progress=False)
    return {path.name.removesuffix(".pack"): path for path in built}


def make_pool(demo, packs, budget_in_small_packs: float) -> PackPool:
    resident = Checkpoint(demo.resident)
    args = model_args(resident.config)
    probe = PackPool(packs, None, args, torch.device("cpu"), torch.float32, 1 << 40, 0)
    budget = int(probe.sizes["sw"] * budget_in_small_packs)
    return PackPool(packs, ResidentHashes(resident), args, torch.device("cpu"), torch.float32, budget, 0)


def leased(pool: PackPool, language: str, timeout: float = 10.0) -> PackLease:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lease = pool.acquire(language)
        if isinstance(lease, PackLease):
            return lease
        assert lease is Pending.LOADING, f"{language}: {lease}"
        time.sleep(0.01)
    raise AssertionError(f"{language} never reached the device")


def loaded(pool: PackPool, language: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while pool.tier(language) != "device":
        assert time.monotonic() < deadline, f"{language} never reached the device"
        time.sleep(0.01)


def test_a_load_that_cannot_fit_evicts_nothing(demo, packs):
    pool = make_pool(demo, packs, 2.2)  # sw + bn fit; te (1.4 x) fits beside one of them only
    try:
        sw = leased(pool, "sw")
        leased(pool, "bn").release()  # on the device, free to go
        assert pool.sizes["te"] > pool.device_budget - pool.sizes["sw"] - pool.sizes["bn"]
        assert pool.acquire("te") is Pending.NO_ROOM  # evicting bn would not make room: bn stays
        assert pool.stats()[0] == {"device": 2, "host": 0, "disk": 1}
        sw.release()
        assert pool.acquire("te") is Pending.LOADING  # now evicting both makes room
        loaded(pool, "te")
        assert pool.stats()[0]["device"] == 1
    finally:
        pool.close()


def test_a_pack_brought_for_waiting_requests_is_held_until_they_lease_it(demo, packs):
    pool = make_pool(demo, packs, 1.5)  # one pack at a time
    try:
        assert pool.acquire("sw") is Pending.LOADING
        loaded(pool, "sw")
        assert pool.held("sw")
        assert pool.acquire("bn") is Pending.NO_ROOM  # sw waits for its requests: not evicted
        lease = pool.acquire("sw")
        assert isinstance(lease, PackLease) and not pool.held("sw")
        lease.release()
        lease.release()  # idempotent
        assert pool.acquire("bn") is Pending.LOADING
        loaded(pool, "bn")
        pool.retain({"sw"})  # bn's requests went away: its hold goes too
        assert not pool.held("bn")
        assert pool.acquire("sw") is Pending.LOADING
        loaded(pool, "sw")
    finally:
        pool.close()


def test_a_load_in_progress_never_blocks_the_pool(demo, packs, monkeypatch):
    slow_load = pool_module.load_verified_pack

    def slowly(*args, **kwargs):
        time.sleep(1.0)  # a cold disk
        return slow_load(*args, **kwargs)

    pool = make_pool(demo, packs, 3.0)
    try:
        leased(pool, "sw").release()
        monkeypatch.setattr(pool_module, "load_verified_pack", slowly)
        assert pool.acquire("te") is Pending.LOADING
        start = time.perf_counter()
        lease = pool.acquire("sw")
        assert isinstance(lease, PackLease) and time.perf_counter() - start < 0.1
        assert pool.stats()[0]["device"] == 1  # te is not visible until it is whole
        lease.release()
        loaded(pool, "te")
    finally:
        pool.close()
