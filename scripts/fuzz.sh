#!/usr/bin/env bash
# Fuzzes the dataset readers (IDX, gzip, CIFAR-10, PNG through stb_image, JPEG through libjpeg-turbo, tar) with libFuzzer,
# AddressSanitizer and UBSan for a bounded time. Not part of `make test`.
#   scripts/fuzz.sh [SECONDS]     (default 120)
# Needs clang and libclang-rt-dev (libFuzzer); installs them on Debian when missing.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
seconds=${1:-120}
out=$root/build-fuzz
rm -rf "$out/findings"
mkdir -p "$out/corpus" "$out/findings"
if ! command -v clang++ >/dev/null || ! ls /usr/lib/llvm-*/lib/clang/*/lib/linux/libclang_rt.fuzzer-x86_64.a >/dev/null 2>&1; then
  sudo_cmd=(); [ "$(id -u)" -ne 0 ] && sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends clang libclang-rt-dev
fi
clang++ -std=c++20 -O1 -g -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
  -I"$root/include" "$root/fuzz/fuzz_formats.cpp" "$root/src/data_formats.cpp" "$root/src/jpeg.cpp" "$root/src/tar.cpp" -lz -lstb -lturbojpeg -o "$out/fuzz_formats"
# Seeds: one valid file of each kind, made with the venv's Python if it is there.
python=${PYTHON:-$root/.venv/bin/python}
if [ -x "$python" ]; then
  "$python" - "$out/corpus" <<'PY'
import gzip, io, struct, sys
out = sys.argv[1]
idx = struct.pack(">BBBBIII", 0, 0, 8, 3, 2, 3, 3) + bytes(range(18))
open(f"{out}/idx", "wb").write(b"\x00" + idx)
open(f"{out}/labels", "wb").write(b"\x01" + struct.pack(">BBBBI", 0, 0, 8, 1, 3) + bytes([1, 2, 3]))
open(f"{out}/cifar", "wb").write(b"\x02" + bytes([3]) + bytes(3072))
open(f"{out}/gz", "wb").write(b"\x04" + gzip.compress(idx))
import tarfile
for fmt, name in [(tarfile.PAX_FORMAT, "pax"), (tarfile.GNU_FORMAT, "gnu")]:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as t:
        for member, data in [("k/000001.png", b"\x89PNG"), ("k/000001.cls", b"3"), ("x" * 120 + ".json", b"{}")]:
            info = tarfile.TarInfo(member); info.size = len(data); t.addfile(info, io.BytesIO(data))
    open(f"{out}/tar_{name}", "wb").write(b"\x05" + buf.getvalue())
try:
    from PIL import Image
    for fmt in ["PNG", "JPEG"]:
        buf = io.BytesIO()
        Image.new("RGB", (5, 4), (10, 20, 30)).save(buf, format=fmt)
        open(f"{out}/img_{fmt}", "wb").write(b"\x03" + buf.getvalue())
    # JPEGs for the DCT-scaled decode: 4:2:0, gray, progressive, CMYK, restart markers.
    for name, mode, opts in [("420", "RGB", {}), ("gray", "L", {}), ("prog", "RGB", {"progressive": True}),
                             ("cmyk", "CMYK", {}), ("rst", "RGB", {"restart_marker_blocks": 2})]:
        buf = io.BytesIO()
        Image.linear_gradient("L").resize((64, 48)).convert(mode).save(buf, format="JPEG", quality=75, **opts)
        open(f"{out}/jpeg_{name}", "wb").write(b"\x06" + buf.getvalue())
except ImportError:
    pass
PY
fi
cd "$out/findings"
"$out/fuzz_formats" -max_total_time="$seconds" -max_len=65536 -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
  "$out/corpus" 2>&1 | tee "$out/fuzz.log" | grep -E "^#[0-9]+ +(DONE|INITED)|stat::|ERROR|SUMMARY" || true
if compgen -G "$out/findings/crash-*" >/dev/null || compgen -G "$out/findings/timeout-*" >/dev/null ||
   compgen -G "$out/findings/leak-*" >/dev/null || compgen -G "$out/findings/oom-*" >/dev/null; then
  echo "fuzz: FINDINGS in $out/findings"; exit 1
fi
echo "fuzz: no findings in ${seconds} s ($out/fuzz.log)"
