"""Speed and memory of dinokit's weighted k-NN against the reference's per-k loop.

    python benchmarks/knn_speed.py [--train 50000] [--test 10000] [--dim 384] [--classes 100]
                                   [--ks 10,20,100,200] [--device cpu] [--threads N]

Both methods run on the same clustered random features (each in a fresh process, so that each
one's peak resident memory above its inputs can be read from ru_maxrss):

* ``knn_classify``: the top-k once for the largest k, prefixes reused, votes accumulated from one
  k to the next, queries in chunks sized by a memory budget;
* ``per-k loop``: the reference's way: for every k, the test set in 100 chunks, a full similarity
  pass, a top-k for that k and one-hot weighted votes.

It prints seconds, peak memory and accuracies of both, and the speed ratio (goal: at least 3.5x),
and fails when the accuracies differ.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def make_data(n_train: int, n_test: int, dim: int, classes: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=g)
    train_labels = torch.randint(0, classes, (n_train,), generator=g)
    test_labels = torch.randint(0, classes, (n_test,), generator=g)
    train = torch.randn(n_train, dim, generator=g).mul_(4.0).add_(centers[train_labels])
    test = torch.randn(n_test, dim, generator=g).mul_(4.0).add_(centers[test_labels])
    return train, train_labels, test, test_labels


@torch.no_grad()
def per_k_loop(train, train_labels, test, test_labels, ks, T=0.07, num_classes=1000, num_chunks=100):
    """The reference's formulation: one pass over the features per k, 100 chunks, one-hot votes."""
    train = torch.nn.functional.normalize(train, dim=1)
    test = torch.nn.functional.normalize(test, dim=1)
    train_t = train.T
    n_test = test.shape[0]
    step = max(1, n_test // num_chunks)
    out = {}
    for k in ks:
        top1 = top5 = 0
        one_hot = torch.zeros(step * k, num_classes, device=train.device)
        for s in range(0, n_test, step):
            q = test[s : s + step]
            y = test_labels[s : s + step]
            b = q.shape[0]
            sim = q @ train_t
            dist, idx = sim.topk(k, largest=True, sorted=True)
            cand = train_labels.view(1, -1).expand(b, -1).gather(1, idx)
            one_hot.resize_(b * k, num_classes).zero_()
            one_hot.scatter_(1, cand.reshape(-1, 1), 1)
            w = dist.div_(T).exp_()
            probs = (one_hot.view(b, -1, num_classes) * w.view(b, -1, 1)).sum(1)
            _, pred = probs.sort(1, True)
            hit = pred.eq(y.view(-1, 1))
            top1 += int(hit[:, :1].sum())
            top5 += int(hit[:, : min(5, k)].sum())
        out[k] = (top1 * 100.0 / n_test, top5 * 100.0 / n_test)
    return out


def run_one(args) -> dict:
    from dinokit.eval.knn import knn_classify

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    train, train_labels, test, test_labels = make_data(args.train, args.test, args.dim, args.classes)
    train, train_labels, test, test_labels = (t.to(device) for t in (train, train_labels, test, test_labels))
    ks = tuple(int(k) for k in args.ks.split(","))
    # warm-up (BLAS and allocator set-up) on a small slice, outside the measurement
    knn_classify(
        train[:1000], train_labels[:1000], test[:10], test_labels[:10], ks=(10,), num_classes=args.classes
    )
    per_k_loop(
        train[:1000],
        train_labels[:1000],
        test[:10],
        test_labels[:10],
        (10,),
        num_classes=args.classes,
        num_chunks=1,
    )
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_gpu = torch.cuda.memory_allocated()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if args.method == "knn_classify":
        acc = knn_classify(train, train_labels, test, test_labels, ks=ks, num_classes=args.classes)
    else:
        acc = per_k_loop(train, train_labels, test, test_labels, ks, num_classes=args.classes)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = (after - before) * 1024 if sys.platform == "linux" else (after - before)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base_gpu
    return {"seconds": seconds, "peak_bytes": peak, "acc": {str(k): v for k, v in acc.items()}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", type=int, default=50_000)
    p.add_argument("--test", type=int, default=10_000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--ks", default="10,20,100,200")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--method", choices=["knn_classify", "per_k_loop"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.method:
        print(json.dumps(run_one(args)))
        return 0
    results = {}
    for method in ("per_k_loop", "knn_classify"):
        cmd = [sys.executable, __file__, "--method", method] + [
            f"--{k}={v}" for k, v in vars(args).items() if k != "method"
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results[method] = json.loads(out.stdout.strip().splitlines()[-1])
    a, b = results["per_k_loop"], results["knn_classify"]
    where = "GPU memory" if args.device.startswith("cuda") else "resident memory"
    print(
        f"{args.train} x {args.dim} train, {args.test} queries, {args.classes} classes, k = {args.ks}, "
        f"device {args.device}, threads {args.threads or torch.get_num_threads()}"
    )
    print(f"{'method':<14} {'seconds':>9} {'peak ' + where + ' above inputs':>36}   top-1 / top-5 per k")
    for name, r in (("per-k loop", a), ("knn_classify", b)):
        accs = "  ".join(f"{k}: {t1:.2f}/{t5:.2f}" for k, (t1, t5) in r["acc"].items())
        print(f"{name:<14} {r['seconds']:9.2f} {r['peak_bytes'] / 2**20:33.0f} MiB   {accs}")
    ratio = a["seconds"] / b["seconds"]
    same = a["acc"] == b["acc"]
    print(
        f"speed-up: {ratio:.2f}x (goal >= 3.5x: {'met' if ratio >= 3.5 else 'NOT met'}); "
        f"accuracies identical: {same}"
    )
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
