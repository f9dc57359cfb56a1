"""The pfl side of benchmarks/bench_peers.py: fedsim's scenario as an Apple pfl simulation.

pfl (``pip install 'pfl[pytorch]'``, in the ``bench`` extra) runs a simulation as
``--workers`` processes of this module, each a pfl worker (``PFL_WORKER_ADDRESSES`` /
``PFL_WORKER_RANK``: torch.distributed over gloo, 1 torch thread each) that trains its share of
each round's cohort; the workers sum their statistics and each applies the central update.
pfl's ``FederatedAveraging`` with:

- the cohort of each round = the clients fedsim selected (a user sampler that plays them back;
  pfl hands worker r every W-th of them);
- ``train_one_user``: the client's fedsim job (its partition, batch plan, seed, AdamW) from the
  central adapter, through fedsim's own trainer; the statistics = the model difference times
  the client's data set size, weighted by it (FedAvg, as fedsim's and Flower's);
- the central update: pfl's, SGD at learning rate 1 on the averaged difference;
- after each round, worker 0 scores the adapter on the scenario's evaluation examples (as
  Flower's ``evaluate_fn`` and fedsim's evaluation do) while the others go on.

``play_pfl`` (in the ``--one pfl`` process of bench_peers.py) starts the workers (fewer where a
round has fewer clients than workers: a pfl worker needs a user every round) and waits;
worker 0 writes the marks (before round 1, after each round's evaluation) and the metrics.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def play_pfl(doc: dict[str, Any], workers: int,
             selected: list[tuple[int, list[int]]]) -> dict[str, Any]:
    """pfl's simulation of the scenario on ``workers`` worker processes; their results."""
    doc_json = json.dumps(doc, sort_keys=True)
    # pfl's workers each need a user in every round (an idle worker breaks its all-reduce)
    workers = max(1, min(workers, *(len(c) for _, c in selected)))
    addresses = ",".join(f"localhost:{_free_port()}" for _ in range(workers))
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        (tmp / "doc.json").write_text(doc_json)
        (tmp / "selected.json").write_text(json.dumps(selected))
        env = dict(os.environ, OMP_NUM_THREADS="1",
                   **({"PFL_WORKER_ADDRESSES": addresses} if workers > 1 else {}),
                   PYTHONPATH=os.pathsep.join(p for p in (str(HERE),
                                                          os.environ.get("PYTHONPATH")) if p))
        procs = [subprocess.Popen([sys.executable, __file__, "--doc", str(tmp / "doc.json"),
                                   "--selected", str(tmp / "selected.json"),
                                   "--result", str(tmp / "result.json")],
                                  env=dict(env, PFL_WORKER_RANK=str(rank)))
                 for rank in range(workers)]
        codes = [p.wait() for p in procs]
        if any(codes):
            raise RuntimeError(f"pfl workers exited with {codes}")
        return json.loads((tmp / "result.json").read_text())


def worker(doc_json: str, selected: list[tuple[int, list[int]]], result: Path) -> None:
    """One pfl worker process (its rank in ``PFL_WORKER_RANK``)."""
    import numpy as np
    import torch
    torch.set_num_threads(1)
    from peer_workload import train_client, workload
    from pfl.aggregate.simulate import SimulatedBackend
    from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
    from pfl.callback.base import TrainingProcessCallback
    from pfl.data.dataset import Dataset
    from pfl.data.federated_dataset import FederatedDataset
    from pfl.hyperparam import NNTrainHyperParams
    from pfl.internal.ops.selector import get_framework_module as get_ops
    from pfl.metrics import Metrics
    from pfl.model.pytorch import PyTorchModel
    from pfl.stats import MappedVectorStatistics

    wl = workload(doc_json)
    family = next(iter(wl.families.values()))
    trainer = family.trainer
    trainer.apply(family.adapter)  # the central model starts as fedsim's global adapter
    module = trainer.model
    module.loss = module.metrics = None  # pfl asks for them; FedAvg below never calls them
    trainable = [p for p in module.parameters() if p.requires_grad]
    model = PyTorchModel(model=module, local_optimizer_create=torch.optim.SGD,
                         central_optimizer=torch.optim.SGD(trainable, lr=1.0))
    rank = get_ops().distributed.global_rank
    marks: list[float] = []
    history: list[dict[str, float]] = []

    class Replay:
        """pfl's user sampler: this round's selected clients, in order (past the end, the
        first again: a draw pfl makes for another worker's share and never trains)."""

        def __init__(self) -> None:
            self.round, self.i = 0, 0

        def __call__(self) -> int:
            clients = selected[self.round][1]
            c = clients[self.i] if self.i < len(clients) else clients[0]
            self.i += 1
            return c

    replay = Replay()

    def user(c: int) -> Any:
        return Dataset(raw_data=[np.arange(len(wl.parts[c]))], user_id=c)

    class FedsimRounds(FederatedAveraging):
        def get_next_central_contexts(self, model: Any, iteration: int, *args: Any,
                                      **kwargs: Any) -> Any:
            contexts, model, metrics = super().get_next_central_contexts(
                model, iteration, *args, **kwargs)
            if contexts is None:
                return contexts, model, metrics
            replay.round, replay.i = iteration, 0
            if iteration == 0:
                marks.append(time.time())  # round 1 is dispatched
            return tuple(replace(c, cohort_size=len(selected[iteration][1]),
                                 do_evaluation=False) for c in contexts), model, metrics

        def train_one_user(self, initial_model_state: Any, model: Any, user_dataset: Any,
                           central_context: Any) -> tuple[Any, Any]:
            c = int(user_dataset.user_id)
            round_ = selected[central_context.current_central_iteration][0]
            # pfl's central step leaves its gradient (the averaged update) on the parameters:
            # cleared, or the job's first backward would add to it
            module.zero_grad(set_to_none=True)
            _, size = train_client(doc_json, c, round_, trainer.current_adapter())
            diff = model.get_model_difference(initial_model_state, clone=True)
            return MappedVectorStatistics({k: v * size for k, v in diff.items()},
                                          weight=size), Metrics()

    class Evaluate(TrainingProcessCallback):
        def after_central_iteration(self, aggregate_metrics: Any, model: Any, *,
                                    central_iteration: int) -> tuple[bool, Any]:
            if rank == 0:
                history.append(trainer.evaluate(trainer.current_adapter(), wl.eval_examples))
                marks.append(time.time())
            return False, Metrics()

    backend = SimulatedBackend(training_data=FederatedDataset(user, replay), val_data=None)
    params = NNAlgorithmParams(central_num_iterations=len(selected), evaluation_frequency=1,
                               train_cohort_size=len(selected[0][1]), val_cohort_size=0)
    FedsimRounds().run(algorithm_params=params, backend=backend, model=model,
                       model_train_params=NNTrainHyperParams(  # fedsim's plan rules instead
                           local_num_epochs=1, local_learning_rate=0.0, local_batch_size=None),
                       callbacks=[Evaluate()], send_metrics_to_platform=False)
    if torch.distributed.is_initialized():  # a clean exit for every worker
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if rank == 0:
        result.write_text(json.dumps({
            "marks": marks, "selected": selected, "loss": [m.get("loss") for m in history],
            "accuracy": [m.get("accuracy") for m in history]}))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--doc", required=True)
    ap.add_argument("--selected", required=True)
    ap.add_argument("--result", required=True)
    a = ap.parse_args()
    worker(Path(a.doc).read_text(),
           [(r, list(c)) for r, c in json.loads(Path(a.selected).read_text())], Path(a.result))
