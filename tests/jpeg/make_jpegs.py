"""JPEG files and PIL's decoding of them, the reference of tests/test_jpeg.cpp.

Usage: make_jpegs.py OUT_DIR. Writes OUT_DIR/NAME.jpg for each case below, and for each scale
s in 1, 2, 4, 8 the pixels PIL decodes (Image.draft to 1/s, libjpeg's DCT-domain scaling, as
difftrain's decode_jpeg does with min_side = ceil(shorter side / s)) as NAME.s.raw (HWC uint8),
and manifest.json with every file's size, mode and subsampling.

The images are smooth gradients with texture, not noise, so the chroma upsampling and the
scaled IDCT are exercised on content that JPEG keeps. Pillow bundles its own libjpeg-turbo, an
independent build (and version) from the system library difftrain links.
"""

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, features


def picture(w, h, seed):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 127 + 100 * np.sin(x / 23.0 + seed) * np.cos(y / 17.0)
    g = 127 + 100 * np.cos((x + y) / 31.0)
    b = 127 + 60 * np.sin(np.hypot(x - w / 3, y - h / 2) / 9.0)
    rgb = np.stack([r, g, b], axis=-1) + rng.normal(0, 6, (h, w, 3))
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def main():
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    # name: (width, height, mode, save options)
    cases = {
        "rgb420": (333, 250, "RGB", dict(quality=90, subsampling=2)),
        "rgb422": (256, 200, "RGB", dict(quality=85, subsampling=1)),
        "rgb444": (200, 264, "RGB", dict(quality=95, subsampling=0)),
        "gray": (301, 219, "L", dict(quality=90)),
        "progressive": (320, 240, "RGB", dict(quality=80, subsampling=2, progressive=True)),
        "restart": (240, 320, "RGB", dict(quality=88, subsampling=2, restart_marker_blocks=4)),
        "cmyk": (160, 128, "CMYK", dict(quality=90)),
    }
    manifest = {"libjpeg_turbo": features.version("libjpeg_turbo"), "pillow": Image.__version__, "files": {}}
    for seed, (name, (w, h, mode, opts)) in enumerate(cases.items()):
        img = Image.fromarray(picture(w, h, seed), "RGB").convert(mode)
        img.save(out / f"{name}.jpg", "JPEG", **opts)
        entry = {"width": w, "height": h, "mode": mode, "scales": {}}
        for s in (1, 2, 4, 8):
            with Image.open(out / f"{name}.jpg") as im:
                if s > 1:
                    im.draft(im.mode, (w // s, h // s))
                im.load()
                if im.mode == "CMYK":
                    im = im.convert("RGB")
                (out / f"{name}.{s}.raw").write_bytes(np.asarray(im).tobytes())
                entry["scales"][str(s)] = {"width": im.size[0], "height": im.size[1], "channels": len(im.getbands())}
        manifest["files"][name] = entry
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))


if __name__ == "__main__":
    main()
