"""Copy-detection speed: embedding throughput, and search time and peak memory for a large database.

    python benchmarks/search_speed.py                    # ViT-S/16 at 224, 100k x 1536 vs 1k queries
    python benchmarks/search_speed.py --faiss            # also the faiss HNSW backend
    python benchmarks/search_speed.py --database 20000   # a smaller database

Each measurement runs in its own process so that peak memory (max RSS) is its own. Numbers are
printed, not asserted: the machine they run on decides them.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time
from pathlib import Path


def _rss_mb() -> float:
    # ru_maxrss is in KiB on Linux, bytes on macOS
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024 * 1024) if sys.platform == "darwin" else r / 1024


def _current_rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return _rss_mb()


def _embed(args, q):
    import torch

    import dinokit
    from dinokit.eval.descriptors import copy_feature_fn
    from dinokit.eval.features import extract_features
    from dinokit.runtime import resolve_device, resolve_precision

    device = resolve_device(args.device)
    dtype = resolve_precision(args.precision, device, training=False)
    torch.manual_seed(0)
    model = dinokit.build_backbone(args.arch, args.patch_size).eval()
    images = torch.randn(args.images, 3, args.image_size, args.image_size)
    dataset = torch.utils.data.TensorDataset(images, torch.zeros(args.images), torch.arange(args.images))
    fn = copy_feature_fn()
    # warm-up, then timed
    extract_features(
        model, torch.utils.data.Subset(dataset, range(min(8, args.images))), 8, 0, device, dtype, fn
    )
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    feats, _ = extract_features(model, dataset, args.batch_size, 0, device, dtype, fn)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
    q.put({"images_per_s": args.images / dt, "dim": int(feats.shape[1]), "device": str(device)})


def _make_data(args, folder: Path):
    import numpy as np

    rng = np.random.default_rng(0)
    db = np.lib.format.open_memmap(
        folder / "db.npy", mode="w+", dtype=np.float32, shape=(args.database, args.dim)
    )
    for s in range(0, args.database, 10000):
        x = rng.standard_normal((min(10000, args.database - s), args.dim), dtype=np.float32)
        db[s : s + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
    db.flush()
    qs = rng.standard_normal((args.queries, args.dim), dtype=np.float32)
    qs /= np.linalg.norm(qs, axis=1, keepdims=True)
    # plant one copy per query so the searches have something to find
    idx = rng.choice(args.database, args.queries, replace=False)
    qs = 0.95 * np.asarray(db[idx]) + 0.05 * qs
    qs /= np.linalg.norm(qs, axis=1, keepdims=True)
    np.save(folder / "queries.npy", qs.astype(np.float32))
    np.save(folder / "truth.npy", idx)


def _search(args, folder: Path, kind: str, q):
    import numpy as np
    import torch

    from dinokit.eval.copy_detection import rank_database
    from dinokit.eval.duplicates import search_pairs_exact, search_pairs_faiss

    torch.set_num_threads(args.threads or torch.get_num_threads())
    base = _current_rss_mb()
    queries = np.load(folder / "queries.npy")
    truth = np.load(folder / "truth.npy")
    t = time.perf_counter()
    if kind == "topk-in-memory":
        db = torch.from_numpy(np.load(folder / "db.npy"))
        ids, _ = rank_database(torch.from_numpy(queries), db, top=20)
        found = (ids[:, 0].numpy() == truth).mean()
    elif kind == "pairs-memmap":
        db = np.load(folder / "db.npy", mmap_mode="r")
        a, b, s, _, _ = search_pairs_exact(queries, db, args.threshold, block=args.block)
        found = len(
            {(i, j) for i, j in zip(a.tolist(), b.tolist())} & set(zip(range(len(truth)), truth.tolist()))
        ) / len(truth)
    else:
        db = np.load(folder / "db.npy", mmap_mode="r")
        a, b, s, _, _ = search_pairs_faiss(queries, db, args.threshold, neighbours=10, block=args.block)
        found = len(
            {(i, j) for i, j in zip(a.tolist(), b.tolist())} & set(zip(range(len(truth)), truth.tolist()))
        ) / len(truth)
    dt = time.perf_counter() - t
    q.put({"seconds": dt, "peak_mb": _rss_mb() - base, "found": float(found)})


def _run(target, *a):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=target, args=(*a, q))
    p.start()
    p.join()
    if p.exitcode != 0:
        raise SystemExit(f"{target.__name__} failed with exit code {p.exitcode}")
    return q.get()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="vit_small")
    ap.add_argument("--patch-size", type=int, default=16)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--images", type=int, default=64, help="images embedded for the throughput figure")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--database", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--dim", type=int, default=1536)
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--block", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--faiss", action="store_true", help="also time the faiss HNSW backend")
    ap.add_argument("--skip-embedding", action="store_true")
    args = ap.parse_args()

    if not args.skip_embedding:
        e = _run(_embed, args)
        print(
            f"embedding: {args.arch}/{args.patch_size} at {args.image_size}px on {e['device']}: "
            f"{e['images_per_s']:.1f} images/s ({e['dim']}-d CLS+GeM descriptors)"
        )
    db_mb = args.database * args.dim * 4 / 2**20
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        _make_data(args, folder)
        print(
            f"search: {args.queries} queries against {args.database} x {args.dim} (database {db_mb:.0f} MB float32)"
        )
        # faiss-hnsw times include building the index
        kinds = ["topk-in-memory", "pairs-memmap"] + (["faiss-hnsw"] if args.faiss else [])
        for kind in kinds:
            r = _run(_search, args, folder, kind)
            print(
                f"  {kind:15s} {r['seconds']:8.2f} s  {args.queries / r['seconds']:9.1f} queries/s  "
                f"peak memory +{r['peak_mb']:.0f} MB ({r['peak_mb'] / db_mb:.2f} x database)  "
                f"planted copies found {100 * r['found']:.1f}%"
            )


if __name__ == "__main__":
    main()
