#!/usr/bin/env python3
# @generated data/ of docker/examples/Dockerfile.custom-dataset: a small image folder (one
# subfolder per class, PNG files), the layout data.dataset = "image_folder" reads, made from the
# first Fashion-MNIST training images of two classes (Debian's dataset-fashion-mnist; MIT licence).
#   python docker/examples/custom-dataset/make_dataset.py   (needs Pillow, e.g. the project venv)
import gzip
import pathlib
import struct

from PIL import Image

SOURCE = pathlib.Path("/usr/share/datasets/fashion-mnist")
OUT = pathlib.Path(__file__).resolve().parent / "data"
CLASSES = {7: "sneaker", 9: "ankle_boot"}
PER_CLASS = 48

with gzip.open(SOURCE / "train-images-idx3-ubyte.gz") as f:
    _, count, rows, cols = struct.unpack(">IIII", f.read(16))
    pixels = f.read()
with gzip.open(SOURCE / "train-labels-idx1-ubyte.gz") as f:
    f.read(8)
    labels = f.read()
written = {c: 0 for c in CLASSES}
for i, label in enumerate(labels):
    if label in CLASSES and written[label] < PER_CLASS:
        folder = OUT / CLASSES[label]
        folder.mkdir(parents=True, exist_ok=True)
        image = Image.frombytes("L", (cols, rows), pixels[i * rows * cols:(i + 1) * rows * cols])
        image.save(folder / f"{i:05d}.png", optimize=True)
        written[label] += 1
print(f"{sum(written.values())} images in {OUT}")
