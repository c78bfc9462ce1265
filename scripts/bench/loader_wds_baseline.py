#!/usr/bin/env python3
"""PyTorch DataLoader over WebDataset shards (the `webdataset` package), the baseline of
bench_loader's webdataset modes: the same shards, a shuffle buffer of 1000 with shard shuffling,
PNG decode to uint8 gray, the resize to R when the images are not R x R, random flip, [-1, 1],
batch 64. DataLoader workers split the shards (webdataset's split_by_worker).

    loader_wds_baseline.py SHARD_DIR R BATCHES
"""
import json, sys, time
from pathlib import Path

import torch
import torch.nn.functional as F
import webdataset as wds
from torch.utils.data import DataLoader

root, R, batches = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
urls = sorted(str(p) for p in root.glob("*.tar"))


def prepare(sample):
    image, label = sample
    x = torch.from_numpy(image.copy())[None].float()  # (1, H, W)
    if x.shape[-1] != R or x.shape[-2] != R:
        x = F.interpolate(x[None], size=(R, R), mode="bilinear", align_corners=False, antialias=True)[0].round().clamp(0, 255)
    if torch.rand(()) < 0.5:
        x = x.flip(-1)
    return x / 127.5 - 1.0, label


torch.set_num_threads(1)
for workers in [0, 1, 2]:
    ds = (wds.WebDataset(urls, shardshuffle=len(urls), nodesplitter=wds.single_node_only, empty_check=False)
          .shuffle(1000).decode("l8").to_tuple("png", "cls").map(prepare).repeat())
    loader = DataLoader(ds.batched(64), batch_size=None, num_workers=workers, persistent_workers=workers > 0)
    it = iter(loader)
    t0 = time.perf_counter()
    for _ in range(20):
        next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    s = time.perf_counter() - start
    print(json.dumps({"impl": f"pytorch DataLoader + webdataset {wds.__version__}", "data": "webdataset",
                      "mode": f"workers={workers}", "batch": 64, "batches_per_s": round(batches / s, 1),
                      "images_per_s": round(batches * 64 / s), "setup_s": round(start - t0, 2)}), flush=True)
    del it, loader
