#!/usr/bin/env bash
# The image-folder check at open against listing and decoding the same folder, in one run.
#   scripts/bench/image_check.sh [BUILD_DIR] [DIR] [COUNT]   (defaults: build, /tmp/difftrain_pngs, 50000)
# Makes DIR (COUNT 32x32 RGB PNGs and one text file named zzz_bad.png) unless it exists.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
build=${1:-$root/build}
dir=${2:-/tmp/difftrain_pngs}
count=${3:-50000}
if [ ! -d "$dir" ]; then
  python3 - "$dir" "$count" <<'PY'
import os, random, struct, sys, zlib
d, n = sys.argv[1], int(sys.argv[2])
os.makedirs(d)
def chunk(t, b): return struct.pack(">I", len(b)) + t + b + struct.pack(">I", zlib.crc32(t + b))
rng = random.Random(0)
for i in range(n):  # a smooth gradient plus noise, so the files compress like small photos
    a, b, c = rng.randrange(256), rng.randrange(256), rng.randrange(256)
    rows = b"".join(b"\0" + bytes(v for x in range(32) for v in
                                  ((a + 4 * x + rng.randrange(16)) & 255, (b + 4 * y) & 255, (c + 2 * (x + y)) & 255))
                    for y in range(32))
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 32, 32, 8, 2, 0, 0, 0)) + \
          chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    with open(os.path.join(d, "img%06d.png" % i), "wb") as f: f.write(png)
with open(os.path.join(d, "zzz_bad.png"), "w") as f: f.write("not an image\n")
PY
fi
echo "# $(date -u '+%F %T UTC') $(nproc) cores; $(du -sh "$dir" | cut -f1) in $(ls "$dir" | wc -l) files"
"$build/bench/bench_image_check" "$dir"
