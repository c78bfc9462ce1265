#!/usr/bin/env python3
"""PyTorch DataLoader baseline for bench_loader: the same Fashion-MNIST IDX files, the same
per-sample work (bilinear resize 28 -> R when R is not 28, random flip, [-1, 1]), batch 64,
drop_last. R is the config's data.resolution (the quickstart's: 28, no resize).

    loader_baseline.py DATA_DIR BATCHES [R]
"""
import gzip, json, sys, time

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

root, batches = sys.argv[1], int(sys.argv[2])
R = int(sys.argv[3]) if len(sys.argv) > 3 else 28
images = np.frombuffer(gzip.open(f"{root}/train-images-idx3-ubyte.gz").read()[16:], dtype=np.uint8).reshape(-1, 28, 28)
labels = np.frombuffer(gzip.open(f"{root}/train-labels-idx1-ubyte.gz").read()[8:], dtype=np.uint8)


class Fashion(Dataset):
    def __len__(self):
        return len(images)

    def __getitem__(self, i):
        x = torch.from_numpy(images[i].copy())[None].float()                 # (1, 28, 28)
        if R != 28:
            x = F.interpolate(x[None], size=(R, R), mode="bilinear", align_corners=False, antialias=R < 28)[0]
            x = x.round().clamp(0, 255)
        if torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x / 127.5 - 1.0, int(labels[i])


torch.set_num_threads(1)
for workers in [0, 2]:
    loader = DataLoader(Fashion(), batch_size=64, shuffle=True, num_workers=workers, drop_last=True,
                        persistent_workers=workers > 0)
    it = iter(loader)
    t0 = time.perf_counter()
    for _ in range(20):
        next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    s = time.perf_counter() - start
    print(json.dumps({"impl": "pytorch DataLoader", "mode": f"workers={workers}", "batch": 64,
                      "batches_per_s": round(batches / s, 1), "images_per_s": round(batches * 64 / s),
                      "setup_s": round(start - t0, 2)}), flush=True)
