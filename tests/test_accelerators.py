"""executor.device: auto picks what torch sees, an unavailable CUDA device is a user error."""

import pytest
import torch

from fedsim.accelerators import resolve, to_device
from fedsim.cli import main
from fedsim.errors import FedsimError


def test_auto_picks_cuda_only_where_torch_sees_it():
    want = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert str(resolve("auto")) == want
    assert str(resolve("cpu")) == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_an_unavailable_cuda_device_names_the_key_and_what_torch_sees():
    with pytest.raises(FedsimError, match=r"executor.device: cuda requested, but torch sees "
                                          r"no CUDA device .*is_available\(\) = False"):
        resolve("cuda")
    with pytest.raises(FedsimError, match="cuda:3 requested"):
        resolve("cuda:3")
    with pytest.raises(FedsimError, match="expected auto, cpu, cuda or cuda:N"):
        resolve("gpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_run_on_an_unavailable_device_exits_2_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["run", "scenarios/quickstart.yaml", "--set", "executor.device=cuda",
               "--set", "executor.name=inline", "--quiet", "--out", str(out)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "executor.device" in err and "torch sees no CUDA device" in err
    assert "Traceback" not in err and not out.exists()


def test_the_scenario_rejects_a_device_it_does_not_know(capsys):
    assert main(["validate", "scenarios/quickstart.yaml", "--set", "executor.device=gpu"]) == 2
    assert "executor.device" in capsys.readouterr().err


def test_to_device_moves_tensors_and_leaves_the_rest():
    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long), "logits_to_keep": 4}
    moved = to_device(batch, torch.device("cpu"))
    assert moved["logits_to_keep"] == 4 and moved["input_ids"] is batch["input_ids"]


def test_ray_actors_share_a_gpu_only_when_the_device_is_one(monkeypatch):
    from fedsim import accelerators
    from fedsim.executors import gpu_share
    from fedsim.plugins import EXECUTORS

    cfg = EXECUTORS.parse({"name": "ray", "workers": 4, "workers_per_gpu": 4, "device": "cpu"})
    assert gpu_share(cfg) == 0.0
    monkeypatch.setattr(accelerators, "resolve", lambda spec, key="": torch.device("cuda:0"))
    assert gpu_share(cfg) == 0.25
