"""Concurrency and lifetime (hardening issue):

* every op called from several Python threads at once, on the same and on
  different K, gives bit-identical results to serial calls, including the
  first use of a K (the schedule table built while other threads wait for it or
  build another) and the curriculum ops' scratch buffers; the ops release the
  GIL, so the calls really overlap;
* 10^4 small calls of every op (forward and backward) leave the process's
  resident memory where it was.
"""

from __future__ import annotations

import gc
import os
import random
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import duo_fast

F64 = torch.float64


def _inputs(K, seed, B=3, L=5, d=6):
    g = torch.Generator().manual_seed(seed)
    return dict(
        K=K,
        x0=torch.randint(0, K, (B, L), generator=g),
        z=torch.randint(0, K, (B, L), generator=g),
        logits=torch.randn(B, L, K, generator=g) * 3,
        teacher=torch.randn(B, L, K, generator=g),
        gamma=-4 + 5 * torch.rand(B, generator=g, dtype=F64),
        alpha=0.05 + 0.9 * torch.rand(B, generator=g, dtype=F64),
        dalpha=-torch.rand(B, generator=g, dtype=F64),
        a_t=0.4 * torch.rand(B, generator=g, dtype=F64),
        E=torch.randn(K, d, generator=g),
        hidden=torch.randn(B, L, d, generator=g),
    )


def _every_op(t, seed):
    """Every public op once on t (forward and backward); returns every output."""
    K = t["K"]
    out = list(duo_fast.gamma_to_alpha(t["gamma"], K))
    out += list(duo_fast.sample_zt(t["x0"], t["gamma"], K, gamma_s=t["gamma"] - 1, seed=seed))
    lg = t["logits"].clone().requires_grad_()
    loss = duo_fast.usdm_loss(lg, t["z"], t["x0"], t["alpha"], t["dalpha"], inplace_grad=bool(seed % 2))
    loss.sum().backward()
    out += [loss.detach(), lg.grad]
    s = t["logits"].clone().requires_grad_()
    kl = duo_fast.distill_kl(s, t["teacher"])
    kl.sum().backward()
    out += [kl.detach(), s.grad]
    h, w = t["hidden"].clone().requires_grad_(), t["E"].clone().requires_grad_()
    lin = duo_fast.linear_usdm_loss(h, w, None, t["z"], t["x0"], t["alpha"], t["dalpha"], chunk_size=4)
    lin.sum().backward()
    out += [lin.detach(), h.grad, w.grad]
    a_s = t["a_t"] + 0.5
    out.append(duo_fast.sample_step(t["logits"], t["z"], t["a_t"], a_s, top_p=0.9, seed=seed))
    out.append(duo_fast.posterior(t["logits"], t["z"], t["a_t"], a_s, kappa=0.5, top_p=0.8))
    out += list(duo_fast.curriculum_topk(t["x0"], t["gamma"], 2.0, min(3, K - 1), K, seed=seed))
    e = t["E"].clone().requires_grad_()
    hk, zk = duo_fast.curriculum_topk_embed(t["x0"], t["gamma"], 2.0, min(3, K - 1), e, seed=seed)
    hk.sum().backward()
    out += [hk.detach(), zk, e.grad]
    e2 = t["E"].clone().requires_grad_()
    he, ze = duo_fast.curriculum_embed(t["x0"], t["gamma"], 2.0, e2, seed=seed)
    (he * he).sum().backward()
    out += [he.detach(), ze, e2.grad]
    return out


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)


def test_threads_give_serial_results_same_and_different_K():
    # Fresh vocabulary sizes (no other test uses them): the first call of each builds its
    # schedule table while other threads call with the same K (they must wait for it) or
    # another fresh K (built concurrently).
    fresh = [30011, 30013, 30029]
    used = [2, 50, 1000]
    first = [(K, seed) for K in fresh for seed in (1, 2)] + [(50, 1), (1000, 2)]  # start together
    rest = [(K, seed) for K in fresh + used for seed in (1, 2, 3)] * 2
    random.Random(0).shuffle(rest)
    jobs = first + rest
    inputs = {K: _inputs(K, K) for K in fresh + used}
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # the intra-op pools stay out of it: the overlap is between Python threads
    try:
        start = threading.Barrier(len(first))

        def run(item):
            i, (K, seed) = item
            if i < len(first):
                start.wait(timeout=120)
            return _every_op(inputs[K], seed)

        with ThreadPoolExecutor(max_workers=len(first)) as pool:
            concurrent = list(pool.map(run, enumerate(jobs)))
        for job, got in zip(jobs, concurrent):
            _same(got, _every_op(inputs[job[0]], job[1]))
    finally:
        torch.set_num_threads(old)


def test_ops_release_the_gil():
    # A pure-Python counter thread advances while another thread is inside an op only
    # if the op released the GIL (so test_threads_give_serial_results really runs calls
    # at once). Not a timing test: with a 0.1 ms switch interval an op that held the
    # GIL would leave the counter at most ~0.1 ms of counting at its edges, against
    # the call's whole duration (tens of ms) when it releases it. The fraction is
    # counts during the call / (the counter's own rate x the call's duration): ~0
    # when held, ~1 on an idle second core, and still well above 0.05 on a loaded one.
    K = 1 << 16
    logits = torch.randn(64, K)
    z = torch.zeros(64, dtype=torch.int64)
    a = torch.full((64,), 0.3, dtype=F64)
    calls = {
        "posterior": lambda: duo_fast.posterior(logits, z, a, a + 0.2),
        "usdm_loss": lambda: duo_fast.usdm_loss(logits, z, z, a, -a),
    }
    count = [0]
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            count[0] += 1

    old_threads, old_switch = torch.get_num_threads(), sys.getswitchinterval()
    torch.set_num_threads(1)
    sys.setswitchinterval(1e-4)
    spinner = threading.Thread(target=spin, daemon=True)
    fractions = {}
    try:
        for call in calls.values():
            call()  # first use (schedule tables) outside the measurement
        spinner.start()
        c0, t0 = count[0], time.perf_counter()
        time.sleep(0.2)  # the counter alone: its rate on this machine now
        rate = (count[0] - c0) / (time.perf_counter() - t0)
        for name, call in calls.items():
            best = 0.0
            for _ in range(3):
                c0, t0 = count[0], time.perf_counter()
                call()
                dt, c1 = time.perf_counter() - t0, count[0]
                best = max(best, (c1 - c0) / (rate * dt))
            fractions[name] = best
    finally:
        stop.set()
        spinner.join(timeout=10)
        sys.setswitchinterval(old_switch)
        torch.set_num_threads(old_threads)
    assert rate > 0
    assert all(f > 0.05 for f in fractions.values()), fractions


def test_separate_generators_per_thread():
    # Threads that each own a generator get the same draws as serial calls with it.
    t = _inputs(100, 3)
    a_s = t["a_t"] + 0.5

    def draws(seed):
        g = torch.Generator().manual_seed(seed)
        return [duo_fast.sample_step(t["logits"], t["z"], t["a_t"], a_s, generator=g) for _ in range(20)] + \
               [duo_fast.sample_zt(t["x0"], t["gamma"], 100, generator=g) for _ in range(20)]

    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(draws, range(8)))
    for seed, g in enumerate(got):
        _same(g, draws(seed))


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_no_memory_growth_over_many_calls():
    # 10^4 small calls of every op (forward and backward, CPU). Resident memory may move
    # by allocator noise, not by the bytes of 10^4 leaked outputs, graphs or scratch
    # buffers (each call allocates ~10-50 KiB: a leak would be 100+ MiB).
    t = _inputs(37, 1, B=2, L=3, d=4)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for i in range(300):  # warm up: allocator pools, schedule table, autograd
            _every_op(t, i)
        gc.collect()
        before = _rss_bytes()
        for i in range(10_000):
            _every_op(t, i)
        gc.collect()
        after = _rss_bytes()
    finally:
        torch.set_num_threads(old)
    assert after - before < 8 << 20, f"resident memory grew by {(after - before) / 2**20:.1f} MiB over 10^4 calls"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device; the CPU tests above cover the host side, "
                    "test_cuda_no_sync.py the device checks in the emulated kernels")
def test_gpu_threads_and_memory():
    # The same on a GPU: threads at once (device-check state and schedule-table copies are
    # per device under locks) give serial results; 10^3 calls leave torch's allocator where it was.
    inputs = {K: {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in _inputs(K, K).items()}
              for K in (30011, 50, 1000)}
    jobs = [(K, seed) for K in inputs for seed in (1, 2)] * 2
    with ThreadPoolExecutor(max_workers=6) as pool:
        concurrent = list(pool.map(lambda job: _every_op(inputs[job[0]], job[1]), jobs))
    torch.cuda.synchronize()
    for job, got in zip(jobs, concurrent):
        _same(got, _every_op(inputs[job[0]], job[1]))
    t = inputs[50]
    for i in range(100):
        _every_op(t, i)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for i in range(1000):
        _every_op(t, i)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() - before < 1 << 20
    duo_fast.check_device_errors()
