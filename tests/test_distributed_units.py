"""Distributed execution pieces that need no worker processes: the auto
parallel plan on made-up device inventories, stage layer ranges, lazy
checkpoint slices, batch splitting for in-flight batches, and the
stage-overlap measure of the in-flight benchmark."""
import socket
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fake_runner import FakeRunner
from orca_serve.config import CacheConfig, EngineConfig, ParallelConfig, SchedulerConfig
from orca_serve.distributed.bench_inflight import stage_overlap
from orca_serve.distributed.parallel_state import pp_layer_range
from orca_serve.distributed.launch import listen_error, run_node
from orca_serve.distributed.plan import DeviceInfo, check_parallel, plan_parallelism
from orca_serve.layers.weight_slice import WeightSlice
from orca_serve.request import Request
from orca_serve.sampling_params import SamplingParams
from orca_serve.scheduler import Scheduler

GB = 10**9
GiB = 2**30


def gpus(n, mem_gb=80, nodes=1):
    return [DeviceInfo("H100", mem_gb * GiB, node) for node in range(nodes) for _ in range(n)]


def plan(model_gb, devices, kv_gb=10, heads=96, kv_heads=8, layers=96):
    per_token = 2 * layers * kv_heads * 128 * 2  # bf16, head_dim 128
    return plan_parallelism(int(model_gb * GB), per_token, int(kv_gb * GB) // per_token, devices,
                            num_heads=heads, num_kv_heads=kv_heads, num_layers=layers)


def test_plan_350gb_on_eight_80gb_gpus_is_tp8():
    t, p, reason = plan(350, gpus(8))
    assert (t, p) == (8, 1)
    assert "T=8 P=1" in reason and "\n" not in reason


def test_plan_small_model_uses_one_device():
    assert plan(10, gpus(8))[:2] == (1, 1)


def test_plan_prefers_tp_inside_a_node_and_pp_across_nodes():
    # 700 GB needs more than one node of 8 x 80 GB: TP 8 inside each node, a stage per node.
    assert plan(700, gpus(8, nodes=2))[:2] == (8, 2)
    # A two-node launch uses both nodes: a stage per node, TP within each (never across).
    assert plan(250, gpus(8, nodes=2))[:2] == (2, 2)


def test_plan_respects_head_divisibility():
    # 12 heads cannot split 8 ways: the fewest devices that fit are T=4 x P=2.
    t, p, _ = plan(100, gpus(8, mem_gb=16), kv_gb=1, heads=12, kv_heads=12, layers=24)
    assert (t, p) == (4, 2)


def test_plan_kv_budget_counts_and_kv_heads_replicate():
    # Weights fit on 2 devices, but with 2 KV heads TP cannot split the KV any
    # further, so a KV budget this large needs pipeline stages too.
    t, p, _ = plan(60, gpus(8), kv_gb=150, heads=32, kv_heads=2, layers=32)
    assert t * p > 2 and p > 1


def test_plan_that_does_not_fit_explains():
    with pytest.raises(ValueError, match="does not fit 8 device"):
        plan(2000, gpus(8))


def test_pp_layer_ranges_are_contiguous_and_cover_all_layers():
    for layers, stages in [(3, 2), (30, 4), (7, 3), (2, 2), (96, 8)]:
        ranges = [pp_layer_range(layers, r, stages) for r in range(stages)]
        assert ranges[0][0] == 0 and ranges[-1][1] == layers
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        sizes = [e - s for s, e in ranges]
        assert max(sizes) - min(sizes) <= 1 and sizes[-1] == min(sizes)
    with pytest.raises(ValueError):
        pp_layer_range(2, 0, 3)


def test_parallel_config_validation():
    assert ParallelConfig(pipeline_parallel_size=3).inflight_batches == 3
    assert ParallelConfig(pipeline_parallel_size=3, max_inflight_batches=1).inflight_batches == 1
    with pytest.raises(ValueError, match="master_port"):
        ParallelConfig(nnodes=2, tensor_parallel_size=2)
    with pytest.raises(ValueError, match="divisible by nnodes"):
        ParallelConfig(nnodes=2, tensor_parallel_size=3, master_port=1234)
    with pytest.raises(ValueError, match="parallel"):
        ParallelConfig(parallel="fast")
    # Each of these got past the config and failed later: a traceback from the
    # store (port), an OverflowError (an infinite timeout), a comparison of str and int.
    for kwargs, match in [(dict(master_port=70000), r"master_port must be an integer in \[1, 65535\], got 70000"),
                          (dict(master_port=0), "master_port"),
                          (dict(worker_timeout_s=float("inf")), "worker_timeout_s must be a finite number > 0"),
                          (dict(worker_timeout_s="5"), "worker_timeout_s"),
                          (dict(master_addr=""), "master_addr must be a host name or IP address"),
                          (dict(master_addr=None), "master_addr"),
                          (dict(node_rank="0"), "node_rank must be in"),
                          # The plan replaced T and P given with it, silently.
                          (dict(parallel="auto", tensor_parallel_size=2),
                           "parallel='auto' chooses tensor_parallel_size and pipeline_parallel_size itself; got 2 and 1")]:
        with pytest.raises(ValueError, match=match):
            ParallelConfig(**kwargs)


def _facts(heads=4, kv_heads=2, layers=2, intermediate=128):
    return SimpleNamespace(num_heads=heads, num_kv_heads=kv_heads, num_layers=layers, intermediate_size=intermediate)


@pytest.mark.parametrize("kwargs,facts,match", [
    # Each of these started the workers, which failed while building their part, with a traceback.
    (dict(tensor_parallel_size=3), _facts(), r"tensor_parallel_size 3 does not split the model's attention "
                                             r"heads \(4 heads, 2 KV heads\); it may be 1, 2, 4"),
    (dict(tensor_parallel_size=10**6), _facts(), "tensor_parallel_size 1000000 does not split"),
    (dict(tensor_parallel_size=2), _facts(intermediate=129), "does not divide the model's MLP width 129"),
    (dict(pipeline_parallel_size=3), _facts(), "pipeline_parallel_size 3 exceeds the model's 2 layers"),
])
def test_impossible_split_is_refused_before_workers_start(kwargs, facts, match):
    with pytest.raises(ValueError, match=match):
        check_parallel(EngineConfig.from_kwargs(**kwargs), facts)
    check_parallel(EngineConfig.from_kwargs(tensor_parallel_size=4, pipeline_parallel_size=2), _facts())


def test_more_ranks_on_a_node_than_gpus_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"puts 2 ranks on each node, one per GPU, but torch sees 1 GPU"):
        check_parallel(EngineConfig.from_kwargs(tensor_parallel_size=2), _facts())
    check_parallel(EngineConfig.from_kwargs(tensor_parallel_size=2, device="cpu"), _facts())  # CPU ranks


def test_driver_that_cannot_listen_says_so_before_starting_workers():
    # A master_addr not of this machine (or a port in use) left the driver's store
    # retrying to reach itself for the 900 s start-up timeout, silently.
    from orca_serve.distributed.executor import DistributedExecutor

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert "in use" in listen_error("127.0.0.1", port)
        with pytest.raises(ValueError, match=f"cannot serve master_addr '127.0.0.1', master_port {port}"):
            DistributedExecutor(EngineConfig.from_kwargs(tensor_parallel_size=2, master_port=port))
    assert listen_error("127.0.0.1", 0) is None and listen_error("localhost", 0) is None
    # The store listens on every interface, so master_addr need not be an address of
    # this machine, only reach it (a service name, a NAT'd address); one that does not:
    with pytest.raises(ValueError, match="this machine cannot reach itself at 10.255.255.1:"):
        DistributedExecutor(EngineConfig.from_kwargs(tensor_parallel_size=2, master_addr="10.255.255.1"))


def test_worker_node_refuses_a_driver_it_cannot_reach_at_once():
    # orca-serve worker: a port out of range was a TCPStore traceback, and a
    # master_addr that does not resolve was retried for the 600 s rendezvous timeout.
    with pytest.raises(ValueError, match=r"master_port must be an integer in \[1, 65535\], got 70000"):
        run_node("127.0.0.1", 70000, 2, 1)
    with pytest.raises(ValueError, match="master_addr '256.1.1.1' does not resolve"):
        run_node("256.1.1.1", 29555, 2, 1)


def test_weight_slice_reads_only_the_shard(tmp_path):
    path = str(tmp_path / "w.safetensors")
    full = torch.arange(48.0).reshape(6, 8)
    save_file({"w": full}, path)
    read = []
    with safe_open(path, framework="pt") as f:
        ws = WeightSlice(f.get_slice("w"), (6, 8), read.append)
        assert tuple(ws.shape) == (6, 8) and read == []
        assert torch.equal(ws.narrow(0, 2, 3).load(), full[2:5])
        assert torch.equal(ws.narrow(1, 4, 4).load(), full[:, 4:])
        assert torch.equal(ws[1:3].load(), full[1:3])
        # Conv1D-style: transpose, chunk into q/k/v, then a rank's rows.
        t = ws.t()
        assert tuple(t.shape) == (8, 6)
        q, k = t.chunk(2, dim=0)
        assert torch.equal(k.narrow(0, 1, 2).load(), full.t()[5:7])
    assert read == [3 * 8 * 4, 6 * 4 * 4, 2 * 8 * 4, 2 * 6 * 4]  # bytes of each region only


def _run_split(depth):
    s = Scheduler(SchedulerConfig(), CacheConfig(block_size=4), 200, max_model_len=512, max_inflight_batches=depth)
    runner = FakeRunner(4)
    for i in range(8):
        s.add_request(Request(str(i), [1 + i, 2, 3], SamplingParams(max_tokens=4, ignore_eos=True)))
    in_flight, sizes = [], []
    while s.has_unfinished_requests() or in_flight:
        so = s.schedule()
        if so.num_reqs:
            ids = set(so.num_scheduled_tokens)
            assert not any(ids & set(o.num_scheduled_tokens) for o in in_flight), "a request in two batches"
            in_flight.append(so)
            sizes.append(so.num_reqs)
        if in_flight and (len(in_flight) >= depth or not so.num_reqs):
            done = in_flight.pop(0)
            s.update(done, runner.execute_model(done))
    return sizes


def test_batches_in_flight_split_the_requests():
    assert set(_run_split(1)) == {8}
    sizes = _run_split(2)
    assert max(sizes) == 4 and sizes.count(4) >= 6  # two half batches alternate in the pipeline


def test_stage_overlap_measure():
    # Stage 0 (rank 0) runs batch 1 while stage 1 (rank 2) runs batch 0; T=2.
    trace = {0: [(0, 0, 0.0, 0.0, 1.0), (1, 0, 1.0, 1.0, 2.0)],
             2: [(0, 0, 0.5, 1.0, 2.0), (1, 0, 2.0, 2.0, 3.0)]}
    got = stage_overlap(trace, tp_size=2, pp_size=2)
    assert got["all_busy_s"] == pytest.approx(1.0) and got["span_s"] == pytest.approx(3.0)
    assert got["busy_s"] == [pytest.approx(2.0), pytest.approx(2.0)]


def test_qkv_shards_replicate_kv_heads_when_fewer_than_tp_ranks():
    from orca_serve.distributed.parallel_state import set_parallel_state
    from orca_serve.layers.linear import QKVParallelLinear

    hidden, head_dim, heads, kv_heads, tp = 8, 2, 4, 2, 4
    q = torch.randn(heads * head_dim, hidden)
    k = torch.randn(kv_heads * head_dim, hidden)
    v = torch.randn(kv_heads * head_dim, hidden)
    try:
        for rank in range(tp):
            set_parallel_state(tp_rank=rank, tp_size=tp, tp_group=object())  # no collective is called here
            layer = QKVParallelLinear(hidden, head_dim, heads, kv_heads)
            for shard, full in (("q", q), ("k", k), ("v", v)):
                layer.weight.weight_loader(layer.weight, full, shard)
            kv = rank // (tp // kv_heads)  # ranks 0, 1 share KV head 0; ranks 2, 3 KV head 1
            rows = lambda t, h: t[h * head_dim:(h + 1) * head_dim]  # noqa: E731
            assert torch.equal(layer.weight, torch.cat([rows(q, rank), rows(k, kv), rows(v, kv)]))
    finally:
        set_parallel_state()
