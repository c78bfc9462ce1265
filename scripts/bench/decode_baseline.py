#!/usr/bin/env python3
"""Python JPEG decode baselines for bench_decode, on the same files, one thread, images/s:
PIL (the decoder of diffusers' train_unconditional.py and most PyTorch datasets), PIL with
draft() (its DCT-domain scaling), torchvision.io.decode_jpeg, and PIL / torchvision followed by
the resize to R and center crop that train_unconditional.py applies.

    decode_baseline.py DIR R
"""
import io, json, sys, time
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torchvision.io import decode_jpeg
from torchvision.transforms import v2

root, R = Path(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(1)
files = [p.read_bytes() for p in sorted(root.glob("*.jpg"))]
tensors = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in files]
pil_resize = v2.Compose([v2.Resize(R, interpolation=v2.InterpolationMode.BILINEAR), v2.CenterCrop(R)])
tensor_resize = v2.Compose([v2.Resize(R, interpolation=v2.InterpolationMode.BILINEAR, antialias=True), v2.CenterCrop(R)])


def pil(b):
    return np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))


def pil_draft(b):
    im = Image.open(io.BytesIO(b))
    im.draft("RGB", (R, R))
    return np.asarray(im.convert("RGB"))


methods = {
    "PIL": lambda i: pil(files[i]),
    "PIL draft": lambda i: pil_draft(files[i]),
    "torchvision decode_jpeg": lambda i: decode_jpeg(tensors[i]),
    "PIL + Resize + CenterCrop": lambda i: np.asarray(pil_resize(Image.open(io.BytesIO(files[i])).convert("RGB"))),
    "torchvision decode_jpeg + Resize + CenterCrop": lambda i: tensor_resize(decode_jpeg(tensors[i])),
}
for name, fn in methods.items():
    done, start = 0, time.perf_counter()
    while (s := time.perf_counter() - start) < 2.0 or done < len(files):
        fn(done % len(files))
        done += 1
    print(json.dumps({"impl": f"python (torch {torch.__version__}, torchvision {torchvision.__version__}, "
                              f"Pillow {Image.__version__})", "method": name, "files": len(files),
                      "images_per_s": round(done / s, 1)}), flush=True)
