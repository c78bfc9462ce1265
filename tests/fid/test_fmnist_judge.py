#!/usr/bin/env python3
"""ctest `fid_fmnist_judge` (label e2e): the Fashion-MNIST judge discriminates.

    python test_fmnist_judge.py --difftrain BUILD/difftrain --work DIR [--data DIR] [--epochs N]

Builds the judge with make_fmnist_judge.py (--epochs 1 by default here, to keep the test short),
writes the 10,000 test images as PNGs, as they are and degraded three ways, and scores each folder
with `difftrain eval --feature-net judge.pt` against the 60,000 training images (statistics computed
once, then read from --stats-cache). It checks that
- the judge classifies (test accuracy >= 85%) and gives 128 features;
- FID and KID of the real test images are small next to those of each degraded set: every
  degraded FID is at least FID_RATIO x the clean FID, and every degraded KID at least
  KID_RATIO x the clean KID plus 3 of its standard deviations (margins relative to the measured
  clean value, so a judge that cannot tell the sets apart fails).

Exit 77 (skip) when the dataset is missing. DIFFTRAIN_TEST_BIN overrides --difftrain, DIFFTRAIN_FMNIST
the dataset directory.

@generated: everything under --work (judge, PNGs, statistics) is made at test time.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.dirname(os.path.dirname(HERE))
FID_RATIO = 10.0   # each degraded FID >= 10 x the clean FID
KID_RATIO = 10.0   # each degraded KID >= 10 x the clean KID (the clean KID may be ~0 or slightly negative)

sys.path.insert(0, HERE)
from make_fmnist_judge import load_split  # noqa: E402


def write_pngs(images: torch.Tensor, folder: str) -> None:
    """(N, 28, 28) uint8 -> folder/000000.png ..."""
    os.makedirs(folder, exist_ok=True)
    for i, img in enumerate(images.numpy()):
        Image.fromarray(img, mode="L").save(os.path.join(folder, f"{i:06d}.png"))


def degraded(test: torch.Tensor) -> dict:
    """Three clearly worse versions of the (N, 28, 28) uint8 test images."""
    g = torch.Generator().manual_seed(1)
    x = test.to(torch.float32).unsqueeze(1)                                              # (N, 1, 28, 28)
    k = torch.exp(-0.5 * (torch.arange(-3, 4, dtype=torch.float32) / 1.5) ** 2)
    k = k / k.sum()
    blur = F.conv2d(F.pad(x, (3, 3, 3, 3), mode="replicate"), (k[:, None] * k[None, :])[None, None])  # Gaussian, sigma 1.5 px
    noisy = x + 64.0 * torch.randn(x.shape, generator=g)                                 # additive noise, sigma 64 grey levels
    perm = torch.randperm(28 * 28, generator=g)
    shuffled = x.flatten(1)[:, perm].reshape(x.shape)                                    # one fixed pixel permutation
    to_u8 = lambda t: t.round().clamp(0, 255).to(torch.uint8).squeeze(1)                 # noqa: E731
    return {"blur": to_u8(blur), "noise": to_u8(noisy), "pixel_shuffle": to_u8(shuffled)}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--difftrain", required=True, help="the binary (the environment's DIFFTRAIN_TEST_BIN wins, as in the C++ tests)")
    p.add_argument("--work", required=True)
    p.add_argument("--data", default=os.environ.get("DIFFTRAIN_FMNIST", "/usr/share/datasets/fashion-mnist"))
    p.add_argument("--epochs", type=int, default=1)
    a = p.parse_args()
    a.difftrain = os.environ.get("DIFFTRAIN_TEST_BIN") or a.difftrain
    torch.set_num_threads(1)
    start = time.perf_counter()
    try:
        test_x, _ = load_split(a.data, "t10k")
    except FileNotFoundError as e:
        print(f"SKIP: Fashion-MNIST not found ({e})")
        return 77
    os.makedirs(a.work, exist_ok=True)

    judge = os.path.join(a.work, "judge.pt")
    subprocess.run([sys.executable, os.path.join(HERE, "make_fmnist_judge.py"), judge, "--epochs", str(a.epochs),
                    "--data", a.data], check=True)
    with open(os.path.join(a.work, "judge.json")) as f:
        report = json.load(f)
    assert report["test_accuracy"] >= 0.85, f"judge test accuracy {report['test_accuracy']:.4f} < 0.85"

    sets = {"clean": test_x, **degraded(test_x)}
    results = {}
    stats = os.path.join(a.work, "train_stats.safetensors")
    if os.path.exists(stats):
        os.remove(stats)  # made by this run's judge only
    for name, images in sets.items():
        folder = os.path.join(a.work, name)
        write_pngs(images, folder)
        cmd = [a.difftrain, "eval", "--feature-net", judge, "--samples", folder,
               "--config", os.path.join(SOURCE, "configs", "quickstart.json"),
               "--set", f"data.path={a.data}", "--set", "data.split=train", "--stats-cache", stats,
               "--threads", "1", "--feature-batch-size", "500", "--kid-subsets", "20", "--out", folder + ".json"]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        with open(folder + ".json") as f:
            results[name] = json.load(f)
        r = results[name]
        assert r["feature_dim"] == 128 and r["num_generated"] == 10000 and r["num_reference"] == 60000, r
        print(f"{name:14s} FID {r['fid']:10.4f}   KID {r['kid']:.6f} ± {r['kid_std']:.6f}", flush=True)

    clean = results["clean"]
    worst_ok = True
    for name in ("blur", "noise", "pixel_shuffle"):
        r = results[name]
        if not r["fid"] >= FID_RATIO * clean["fid"]:
            print(f"FAIL: {name} FID {r['fid']:.4f} < {FID_RATIO} x clean FID {clean['fid']:.4f}")
            worst_ok = False
        if not r["kid"] >= KID_RATIO * max(clean["kid"], 0.0) + 3 * r["kid_std"]:
            print(f"FAIL: {name} KID {r['kid']:.6f} not >= {KID_RATIO} x clean KID {clean['kid']:.6f} + 3 std")
            worst_ok = False
    print(f"{'PASS' if worst_ok else 'FAIL'}: judge test accuracy {100 * report['test_accuracy']:.2f}%, "
          f"{time.perf_counter() - start:.0f} s in all")
    return 0 if worst_ok else 1


if __name__ == "__main__":
    sys.exit(main())
