"""Local training: fedsim's client job against a plain peft + torch loop; memory per client.

    python benchmarks/bench_training.py [--model minilm-l6] [--steps 10] [--clients 50]
    python benchmarks/bench_training.py --device cuda   # + steps per second there vs the CPU

1. Overhead: one client's ``plan`` + ``train`` through ``FamilyTrainer`` against a hand-written
   peft + torch loop on the same model, the same batches (same padded token ids) and the same
   number of AdamW steps, in this process, alternating, best of ``--repeats``. Target <= 1.10.
2. Memory: peak RSS of a fresh process that trains 1 client vs one that trains ``--clients``
   clients (each its own partition, 2 steps), both through one shared ``FamilyTrainer``.
   Target: at most 1 GiB more (adapters, not models, per client).
3. Device (``--device cuda``, ``cuda:N`` or ``auto``): LoRA steps per second of one client's job
   on that device against this CPU, same plan, best of ``--repeats`` (after one warm-up job).
4. Precision: the same job's steps per second in bf16 (``training.precision``) against fp32,
   on ``--device`` (default the CPU).
5. Batching (``--batch K``, default 8): client updates per second of K clients of one family
   trained one by one (``FamilyTrainer.train``) against in one batched pass over the shared
   base (``fedsim.batching.train_together``; ``executor.batch_clients``), on ``--device``
   (default the CPU), same plans and seeds, best of ``--repeats`` after a warm-up; and how far
   the batched deltas lie from the one-by-one ones (relative to their norm).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def plain_loop(model_name: str, batches: list[list[str]], labels: list[list[int]], lr: float,
               max_length: int, r: int, alpha: float) -> float:
    """Seconds for a plain peft + torch loop over ``batches`` (tokenizing each batch)."""
    from peft import LoraConfig, TaskType, get_peft_model

    from fedsim.models import load_model
    from fedsim.roles import target_modules

    loaded = load_model(model_name, "sequence-classification", num_labels=5, seed=0)
    cfg = LoraConfig(task_type=TaskType.SEQ_CLS, r=r, lora_alpha=alpha, lora_dropout=0.0,
                     target_modules=target_modules(loaded.spec.architecture, ("q", "v")))
    model = get_peft_model(loaded.model, cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    t0 = time.perf_counter()
    for texts, ys in zip(batches, labels, strict=True):
        enc = loaded.tokenizer(texts, padding=True, truncation=True, max_length=max_length,
                               return_tensors="pt")
        out = model(**enc, labels=torch.tensor(ys))
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def overhead(args: argparse.Namespace) -> None:
    from fedsim.data import load_dataset
    from fedsim.training import FamilyTrainer, LocalTrainingConfig

    task = load_dataset("bbc-news", "classification")
    examples = list(task.train[:200])
    cfg = LocalTrainingConfig(local_steps=args.steps, batch_size=16, max_length=64, lr=1e-3)
    trainer = FamilyTrainer(args.model, "classification", 5, cfg, seed=0)
    plan = trainer.plan(examples, seed=0)
    batches = [[examples[i].text for i in b] for b in plan.batches]
    labels = [[examples[i].label for i in b] for b in plan.batches]
    ours, plain = [], []
    for rep in range(args.repeats):
        trainer._cache.clear()  # tokenization is part of a job: count it every time
        t0 = time.perf_counter()
        p = trainer.plan(examples, seed=rep)
        trainer.train(trainer.initial_adapter(), examples, p, seed=rep)
        ours.append(time.perf_counter() - t0)
        plain.append(plain_loop(args.model, batches, labels, 1e-3, 64, cfg.lora_r,
                                cfg.lora_alpha))
    print(f"local training, {args.model}, {args.steps} steps of batch 16 x <=64 tokens "
          f"({plan.tokens} tokens, {plan.flops:.3g} FLOPs):")
    print(f"  fedsim plan+train  best {min(ours):6.2f} s   runs {[round(x, 2) for x in ours]}")
    print(f"  plain peft loop    best {min(plain):6.2f} s   runs {[round(x, 2) for x in plain]}")
    print(f"  overhead ratio     {min(ours) / min(plain):6.3f}  (target <= 1.10)")


def rss_child(model: str, clients: int) -> None:
    """Train ``clients`` clients through one trainer; print peak RSS (bytes) as JSON."""
    import resource

    from fedsim.data import load_dataset, partition
    from fedsim.training import FamilyTrainer, LocalTrainingConfig

    task = load_dataset("bbc-news", "classification")
    import numpy as np

    labels = np.array([ex.label for ex in task.train])
    parts = partition("iid", labels, len(task.train), max(clients, 2), np.random.default_rng(0))
    cfg = LocalTrainingConfig(local_steps=2, batch_size=16, max_length=64)
    trainer = FamilyTrainer(model, "classification", 5, cfg, seed=0)
    start = trainer.initial_adapter()
    deltas = []  # keep every client's result, as the simulator does until aggregation
    for c in range(clients):
        ex = [task.train[i] for i in parts[c]]
        deltas.append(trainer.train(start, ex, trainer.plan(ex, seed=c), seed=c).delta)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    print(json.dumps({"clients": clients, "peak_rss_bytes": peak}))


def memory(args: argparse.Namespace) -> None:
    out = {}
    for n in (1, args.clients):
        r = subprocess.run([sys.executable, __file__, "--rss-child", str(n), "--model",
                            args.model], capture_output=True, text=True, check=True)
        out[n] = json.loads(r.stdout.strip().splitlines()[-1])["peak_rss_bytes"]
    gib = 2**30
    print(f"peak RSS, {args.model}: 1 client {out[1] / gib:.2f} GiB, {args.clients} clients "
          f"{out[args.clients] / gib:.2f} GiB, difference "
          f"{(out[args.clients] - out[1]) / gib:.3f} GiB (target <= 1 GiB)")


def steps_per_s(model: str, steps: int, repeats: int, device: str,
                precision: str = "fp32") -> float:
    """Best LoRA steps per second of a ``steps``-step job on ``device`` (one warm-up first)."""
    from fedsim.data import load_dataset
    from fedsim.training import FamilyTrainer, LocalTrainingConfig

    examples = list(load_dataset("bbc-news", "classification").train[:200])
    cfg = LocalTrainingConfig(local_steps=steps, batch_size=16, max_length=64, lr=1e-3,
                              device=device, precision=precision)
    trainer = FamilyTrainer(model, "classification", 5, cfg, seed=0)
    plan = trainer.plan(examples, seed=0)
    best = float("inf")
    for rep in range(repeats + 1):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        trainer.train(trainer.initial_adapter(), examples, plan, seed=rep)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if rep:  # the first job warms the kernels up
            best = min(best, time.perf_counter() - t0)
    return steps / best


def device_speed(args: argparse.Namespace) -> None:
    from fedsim.accelerators import resolve

    device = str(resolve(args.device, "--device"))
    here = steps_per_s(args.model, args.steps, args.repeats, "cpu")
    there = steps_per_s(args.model, args.steps, args.repeats, device)
    print(f"LoRA steps/s, {args.model}, batch 16 x <=64 tokens: cpu {here:.2f}, {device} "
          f"{there:.2f}, ratio {there / here:.2f}")


def precision_speed(args: argparse.Namespace) -> None:
    from fedsim.accelerators import resolve

    device = str(resolve(args.device or "cpu", "--device"))
    fp32 = steps_per_s(args.model, args.steps, args.repeats, device)
    bf16 = steps_per_s(args.model, args.steps, args.repeats, device, "bf16")
    print(f"LoRA steps/s on {device}, {args.model}: fp32 {fp32:.2f}, bf16 {bf16:.2f}, "
          f"ratio {bf16 / fp32:.2f} (training.precision: bf16)")


def batched_speed(args: argparse.Namespace) -> None:
    from fedsim.accelerators import resolve
    from fedsim.batching import Request, train_together
    from fedsim.data import load_dataset
    from fedsim.training import FamilyTrainer, LocalTrainingConfig

    device = str(resolve(args.device or "cpu", "--device"))
    train = list(load_dataset("bbc-news", "classification").train)
    cfg = LocalTrainingConfig(local_steps=args.steps, batch_size=16, max_length=64, lr=1e-3,
                              device=device)
    trainer = FamilyTrainer(args.model, "classification", 5, cfg, seed=0)
    start = trainer.initial_adapter()
    requests = []
    for k in range(args.batch):  # each client its own 40 examples, plan and seed
        examples = train[40 * k: 40 * (k + 1)]
        requests.append(Request(start, examples, trainer.plan(examples, seed=k), seed=k))

    def timed(fn):  # best seconds of fn() after one warm-up, and its last results
        best, out = float("inf"), None
        for rep in range(args.repeats + 1):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = fn()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            if rep:
                best = min(best, time.perf_counter() - t0)
        return best, out

    one, solo = timed(lambda: [trainer.train(r.adapter, r.examples, r.plan, r.seed)
                               for r in requests])
    together, batched = timed(lambda: train_together(trainer, requests))
    gap = max(
        sum(float((b.delta[n] - s.delta[n]).double().pow(2).sum()) for n in s.delta) ** 0.5
        / s.metrics["delta_norm"] for b, s in zip(batched, solo, strict=True))
    k = args.batch
    print(f"client updates/s on {device}, {args.model}, {k} clients x {args.steps} steps of "
          f"batch 16 x <=64 tokens: one by one {k / one:.2f}, batched {k / together:.2f}, "
          f"ratio {one / together:.2f}; largest batched-vs-one-by-one delta gap "
          f"{gap:.1e} of its norm (executor.batch_clients)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="minilm-l6")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--rss-child", type=int, default=None)
    ap.add_argument("--only", choices=["overhead", "memory", "device", "precision", "batched"],
                    default=None)
    ap.add_argument("--batch", type=int, default=8, help="clients per batched pass")
    ap.add_argument("--device", default=None, help="auto, cuda or cuda:N: steps/s vs the CPU")
    args = ap.parse_args()
    if args.rss_child is not None:
        rss_child(args.model, args.rss_child)
        return
    if args.only in (None, "overhead"):
        overhead(args)
    if args.only in (None, "memory"):
        memory(args)
    if args.device is not None and args.only in (None, "device"):
        device_speed(args)
    if args.only in (None, "precision"):
        precision_speed(args)
    if args.only in (None, "batched"):
        batched_speed(args)


if __name__ == "__main__":
    main()
