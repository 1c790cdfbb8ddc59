"""The replica check of data-parallel training compares every parameter and buffer exactly: fingerprints on
one process, then check_replicas across 2 gloo processes with replicas that differ in ways a single checksum
misses (two values swapped, changes that cancel, one ulp)."""

import json
import subprocess
import sys
import textwrap

import torch
from torch import nn

from cmvae_engine.engine.distributed import fingerprints


def small_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    net.register_buffer("mask", torch.ones(3, dtype=torch.bool))
    return net


def test_fingerprints_see_every_change_a_sum_misses():
    names, base = fingerprints(small_net())
    assert names == ["0.weight", "0.bias", "2.weight", "2.bias", "mask"] and base.dtype == torch.int64
    assert torch.equal(fingerprints(small_net())[1], base)  # the same tensors, the same fingerprints

    def changed(edit) -> list[str]:
        net = small_net()
        with torch.no_grad():
            edit(net)
        return [n for n, a, b in zip(names, fingerprints(net)[1], base, strict=True) if a != b]

    def swap(net):
        w = net[0].weight.view(-1)
        w[0], w[1] = w[1].clone(), w[0].clone()

    def cancel(net):
        net[2].bias[0] += 0.5
        net[2].bias[1] -= 0.5

    def ulp(net):
        net[0].bias[2] = torch.nextafter(net[0].bias[2], torch.tensor(10.0))

    def mask(net):
        net.mask[1] = False

    assert changed(swap) == ["0.weight"]
    assert changed(cancel) == ["2.bias"]
    assert changed(ulp) == ["0.bias"]
    assert changed(mask) == ["mask"]


WORKER = textwrap.dedent("""
    import json, sys
    import torch
    import torch.distributed as dist
    from torch import nn
    from cmvae_engine.engine.distributed import check_replicas

    rank, init, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    results = {}
    for case in ("same", "swap", "cancel"):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        with torch.no_grad():
            if rank == 1 and case == "swap":  # the plain sum of every parameter stays the same
                w = net[2].weight.view(-1)
                w[0], w[1] = w[1].clone(), w[0].clone()
            if rank == 1 and case == "cancel":  # changes in two tensors that cancel in the sum
                net[0].bias[0] += 0.25
                net[2].bias[0] -= 0.25
        try:
            check_replicas(net, step=7)
            results[case] = {"ok": True}
        except RuntimeError as e:
            results[case] = {"ok": False, "error": str(e)}
    dist.destroy_process_group()
    with open(f"{out}-{rank}.json", "w") as f:
        json.dump(results, f)
""")


def test_two_gloo_processes_name_the_first_differing_tensor(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    init, out = f"file://{tmp_path / 'init'}", tmp_path / "result"
    procs = [subprocess.Popen([sys.executable, str(script), str(r), init, str(out)]) for r in range(2)]
    for p in procs:
        assert p.wait(timeout=300) == 0
    results = [json.loads((tmp_path / f"result-{r}.json").read_text()) for r in range(2)]
    for r in results:  # every rank reaches the same verdict, with the same message
        assert r["same"] == {"ok": True}
        for case, first, more in (("swap", "2.weight", False), ("cancel", "0.bias", True)):
            assert not r[case]["ok"] and "at step 7" in r[case]["error"], (case, r)
            assert f"'{first}' differs between rank 0 and rank(s) [1]" in r[case]["error"], (case, r)
            assert ("1 more tensor(s) differ" in r[case]["error"]) == more
