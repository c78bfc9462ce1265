#!/usr/bin/env python3
"""Photo-like JPEGs for scripts/bench/decode.sh: N files of WxH, quality 90, 4:2:0 (PIL's default
for that quality), smooth colour fields with texture (Gaussian noise, sigma 8), seeded.

    make_bench_jpegs.py OUT_DIR N W H
"""
import sys
from pathlib import Path

import numpy as np
from PIL import Image

out, n, w, h = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
out.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(0)
y, x = np.mgrid[0:h, 0:w].astype(np.float32)
for i in range(n):
    f = rng.uniform(5, 60, 6)
    rgb = np.stack([127 + 100 * np.sin(x / f[0] + i) * np.cos(y / f[1]),
                    127 + 100 * np.cos((x + y) / f[2] + i),
                    127 + 90 * np.sin(np.hypot(x - w * f[3] / 60, y - h * f[4] / 60) / f[5])], -1)
    rgb += rng.normal(0, 8, rgb.shape)
    Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8)).save(out / f"{i:04d}.jpg", quality=90)
