#!/usr/bin/env python
"""Image-loader throughput: flax-resnet's grain pipeline next to torchvision's ImageFolder + DataLoader.

    python benchmarks/loader.py --torchvision-python /tmp/tvvenv/bin/python
    python benchmarks/loader.py --memory 20000    # peak RSS while training on 20,000 small JPEGs

Throughput: the pipeline alone (no model), JPEG decode + RandomResizedCrop
+ horizontal flip + normalize + batching, in images/s, at 1 and 2 worker
processes (and 0: in the main process), on the same folder of JPEGs. The
workers' start-up and the first batch are left out. torchvision cannot be
imported beside the project's torch, so its side runs in another
interpreter (``--torchvision-python``, a venv with torch + torchvision +
Pillow); without one, only the grain rows are measured.

Memory (``--memory N``): ``flax-resnet train --data`` on N small JPEGs
(resnet18 at 32 px), sampling the resident memory of the command and its
worker processes every second; prints the samples against the step, which
stay flat if nothing grows with the number of images read.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TORCHVISION_SIDE = r"""
import json, sys, time, torch
from torchvision import datasets, transforms
root, size, batch, workers, images = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(1)
tf = transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                         transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
ds = datasets.ImageFolder(root, tf)
dl = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True, prefetch_factor=2 if workers else None)
it = iter(dl); next(it)
t0 = time.perf_counter(); n = 0
while n < images:
    x, y = next(it); n += len(y)
print(json.dumps({"images_per_sec": n / (time.perf_counter() - t0), "shape": list(x.shape)}))
"""


def grain_rate(root: str, size: int, batch: int, workers: int, images: int) -> dict:
    from flax_resnet import preprocess as pp
    from flax_resnet.imagedata import pipeline, sources

    splits = sources.open_splits(root, val_fraction=0.01)
    recipe = pipeline.Recipe(size, "standard", pp.IMAGENET_MEAN, pp.IMAGENET_STD, pipeline.eval_preprocess(pp.Preprocess(), size))
    stream = pipeline.TrainStream(splits.train.records, recipe, batch, seed=0, workers=workers)
    it = stream.batches()
    next(it)
    t0, n = time.perf_counter(), 0
    while n < images:
        x, y = next(it)
        n += len(y)
    return {"images_per_sec": n / (time.perf_counter() - t0), "shape": list(x.shape)}


def throughput(args) -> None:
    from flax_resnet.imagedata import synthetic

    root = args.folder or os.path.join(tempfile.mkdtemp(prefix="loaderbench-"), "jpegs")
    if not args.folder:
        synthetic.jpeg_folder(root, args.count, size=(240, 320))
    print(f"folder {root}: {args.count if not args.folder else '?'} JPEGs; crop {args.size}, batch {args.batch}, {args.images} images per row; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"{'loader':<44} {'workers':>7} {'img/s':>8}")
    rows = []
    for w in args.workers:
        r = grain_rate(root, args.size, args.batch, w, args.images)
        rows.append({"loader": "flax-resnet grain TrainStream", "workers": w, **r})
        print(f"{rows[-1]['loader']:<44} {w:>7} {r['images_per_sec']:>8.1f}", flush=True)
        if args.torchvision_python:
            out = subprocess.run([args.torchvision_python, "-c", TORCHVISION_SIDE, root, str(args.size), str(args.batch), str(w), str(args.images)],
                                 capture_output=True, text=True, check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            rows.append({"loader": "torchvision ImageFolder + DataLoader", "workers": w, **r})
            print(f"{rows[-1]['loader']:<44} {w:>7} {r['images_per_sec']:>8.1f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


def memory(args) -> None:
    import psutil

    from flax_resnet.imagedata import synthetic

    root = args.folder or os.path.join(tempfile.mkdtemp(prefix="loadermem-"), "jpegs")
    if not args.folder:
        synthetic.jpeg_folder(root, args.memory, size=(40, 48))
    work = tempfile.mkdtemp(prefix="loadermem-run-")
    cmd = [sys.executable, "-m", "flax_resnet", "train", "--data", root, "--arch", "resnet18", "--size", "32", "--batch-size", "64",
           "--epochs", "1", "--workers", str(args.workers[-1]), "--workdir", work, "--progress", "off", "--stop-after-steps", str(args.steps),
           "--checkpoint-every", "0", "--normalize", "imagenet"]
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    proc = psutil.Process(p.pid)
    samples, t0 = [], time.time()
    while p.poll() is None:
        try:
            rss = proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))
            samples.append((round(time.time() - t0), rss / 2**20))
        except psutil.Error:
            pass
        time.sleep(1.0)
    err = p.stderr.read()
    print(err.strip().splitlines()[0] if err.strip() else "")
    print(f"{args.memory} JPEGs, {args.steps} steps of batch 64 ({args.steps * 64} images read), workers {args.workers[-1]}: RSS (MiB) over time")
    for k in range(0, len(samples), max(1, len(samples) // 12)):
        print(f"  t={samples[k][0]:>4}s  {samples[k][1]:8.0f}")
    print(f"  peak {max(s for _, s in samples):.0f} MiB; exit {p.returncode}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--folder", default=None, help="an image folder to read (default: generate --count JPEGs of 240x320 in a temp dir)")
    p.add_argument("--count", type=int, default=1500)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--images", type=int, default=640, help="images timed per row")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--torchvision-python", default=None, help="an interpreter with torch and torchvision (e.g. /tmp/tvvenv/bin/python)")
    p.add_argument("--json", default=None)
    p.add_argument("--memory", type=int, default=0, metavar="N", help="instead: peak RSS of training on N small JPEGs")
    p.add_argument("--steps", type=int, default=150, help="with --memory: steps to train")
    args = p.parse_args()
    memory(args) if args.memory else throughput(args)


if __name__ == "__main__":
    main()
