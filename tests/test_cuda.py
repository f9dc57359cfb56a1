"""The CUDA path on a real GPU: skipped, cleanly, on a machine without one (CI here).

Run where a GPU is lent: ``pytest tests/test_cuda.py``; the benchmark is
``benchmarks/bench_training.py --device cuda``.
"""

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _tiny(device, transfer=None):
    from test_distillation import tiny

    sc = tiny(**(transfer or {}))
    from fedsim.scenario import validate

    doc = sc.model_dump(mode="json")
    doc["executor"] = {"name": "inline", "device": device}
    if transfer is None:
        doc["transfer"] = {"name": "projection"}
    return validate(doc)


@pytest.mark.parametrize("transfer", [None, {"mutual": True}], ids=["projection", "distillation"])
def test_a_run_on_the_gpu_has_the_cpu_timeline_and_its_metrics_to_float_precision(transfer):
    from fedsim.engine import Simulation

    cpu = Simulation(_tiny("cpu", transfer)).run()
    gpu_sim = Simulation(_tiny("cuda", transfer))
    assert gpu_sim.workload.families["tiny-bert"].trainer.device.type == "cuda"
    gpu = gpu_sim.run()
    # The timeline comes from modelled FLOPs; the bytes from the payloads' lengths.
    assert gpu.summary["sim_time_s"] == pytest.approx(cpu.summary["sim_time_s"], rel=1e-9)
    assert gpu.summary["comm"]["bytes_up"] == cpu.summary["comm"]["bytes_up"]
    q_cpu, q_gpu = cpu.summary["quality"], gpu.summary["quality"]
    assert q_gpu["server_by_round"] == pytest.approx(q_cpu["server_by_round"], abs=0.051)


@pytest.mark.parametrize("task", ["classification", "generation"])
def test_a_batched_pass_on_the_gpu_trains_each_client_as_alone(task):
    """fedsim.batching on the device: each client's own dropout stream is the CUDA generator's
    state its solo job would have."""
    from test_batching import assert_same, requests, trainer

    from fedsim.batching import train_together

    if task == "classification":
        t = trainer("tiny-bert", task, 5, "bbc-news", device="cuda")
        dataset = "bbc-news"
    else:
        t = trainer("tiny-llama", task, None, "freedict-en-de", device="cuda",
                    target_roles=("q", "k", "v", "o"))
        dataset = "freedict-en-de"
    reqs = requests(t, dataset, task, validation=3)
    solo = [t.train(r.adapter, r.examples, r.plan, r.seed) for r in reqs]
    assert_same(train_together(t, reqs), solo)
