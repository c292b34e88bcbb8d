"""kdfast.collectives with two gloo processes: kdfast's own waits end at --dist-timeout even when the process group
would wait longer (as NCCL's does, whose watchdog kills the process instead of raising), and the main process's long
work (a first decode) is waited for past that timeout, its failure reaching the others as its message."""
import json
import os
import socket
import time
from datetime import timedelta

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, scenario: str, out: str):
    import torch
    import torch.distributed as dist

    from kdfast import cluster, collectives
    from kdfast.errors import KdfastError

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=120))  # the group would wait 2 minutes
    collectives.configure(2.0)  # kdfast waits 2 s
    result = {}
    t0 = time.monotonic()
    try:
        if scenario == "stuck":
            if rank == 1:
                time.sleep(8)  # a stuck peer
            else:
                collectives.all_reduce(torch.ones(1), "max")
        elif scenario == "slow main":
            result["value"] = collectives.main_first(rank == 0, lambda: time.sleep(4 if rank == 0 else 0) or rank)
            result["sum"] = collectives.all_reduce(torch.ones(1)).item()
        elif scenario == "main fails":
            def decode():
                if rank == 0:
                    raise KdfastError("data/x.jpg: not an image")
                return "read"

            collectives.main_first(rank == 0, decode)
    except Exception as e:
        result["error"] = str(e).splitlines()[0][:200]
        result["collective_failure"] = cluster.is_collective_failure(e)
    result["seconds"] = time.monotonic() - t0
    with open(f"{out}.{rank}", "w") as f:
        json.dump(result, f)
    os._exit(0)  # a stuck peer leaves the group unusable: no orderly shutdown


def run(scenario: str, tmp_path) -> list[dict]:
    out = str(tmp_path / "result")
    os.environ["OMP_NUM_THREADS"] = "1"
    mp.start_processes(_worker, args=(free_port(), scenario, out), nprocs=2, start_method="spawn", join=True)
    return [json.load(open(f"{out}.{rank}")) for rank in range(2)]


def test_a_stuck_peer_ends_kdfasts_collective_at_its_own_timeout(tmp_path):
    main, _ = run("stuck", tmp_path)
    assert "error" in main and main["collective_failure"], main
    assert 1.5 < main["seconds"] < 7, main  # kdfast's 2 s, not the group's 120 s nor the peer's 8 s


def test_the_main_process_is_waited_for_past_the_timeout_and_its_failure_reaches_the_others(tmp_path):
    main, other = run("slow main", tmp_path)
    assert main == {**main, "value": 0, "sum": 2.0} and other["value"] == 1 and other["sum"] == 2.0, (main, other)
    assert other["seconds"] > 3.5  # 4 s of main-only work, beyond kdfast's 2 s timeout
    main, other = run("main fails", tmp_path)
    assert "not an image" in main["error"] and "not an image" in other["error"], (main, other)
