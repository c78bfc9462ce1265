#!/usr/bin/env bash
# Installs a built tree into a temporary prefix and uses it as a user would:
#   - the installed CLI runs from a clean environment (its RPATH finds LibTorch and the CUDA
#     libraries; ldd reports nothing missing) and reports this version;
#   - the headers, libraries and CMake package are in place;
#   - this directory's consumer project finds the package (find_package(difftrain CONFIG)),
#     builds against difftrain::core with the same compiler and LibTorch, and runs.
# Registered in ctest by tests/CMakeLists.txt (label e2e); by hand:
#   tests/install/check_install.sh BUILD_DIR VERSION CXX TORCH_PREFIX [CMAKE ARGS for the consumer...]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source_dir=$(cd "$here/../.." && pwd)
build=$1 version=$2 cxx=$3 torch_prefix=$4
shift 4
cmake=${CMAKE_COMMAND:-cmake}
clean_env=(env -i PATH=/usr/bin:/bin HOME="${HOME:-/tmp}")

work=$(mktemp -d "${TMPDIR:-/tmp}/difftrain-install.XXXXXX")
trap 'rm -rf "$work"' EXIT
prefix=$work/prefix
fail() { echo "check_install: FAILED: $*" >&2; exit 1; }

echo "== cmake --install $build --prefix $prefix"
"$cmake" --install "$build" --prefix "$prefix" >"$work/install.log" || { cat "$work/install.log"; fail "cmake --install"; }

libdir=$(sed -n 's/^CMAKE_INSTALL_LIBDIR:[A-Z]*=//p' "$build/CMakeCache.txt")
for f in bin/difftrain include/difftrain/version.h include/difftrain/config.h include/difftrain/unet.h \
         "$libdir"/libdifftrain_core.a "$libdir"/libdifftrain_log.a "$libdir"/libdifftrain_formats.a \
         "$libdir"/libdifftrain_metrics.a "$libdir"/cmake/difftrain/difftrainConfig.cmake \
         "$libdir"/cmake/difftrain/difftrainConfigVersion.cmake "$libdir"/cmake/difftrain/difftrainTargets.cmake; do
  [ -e "$prefix/$f" ] || fail "$f is not installed"
done
grep -q "$source_dir\|$build" "$prefix/$libdir/cmake/difftrain/difftrainTargets.cmake" &&
  fail "the exported targets name the source or build tree: $(grep -n "$source_dir\|$build" "$prefix/$libdir/cmake/difftrain/difftrainTargets.cmake" | head -3)"
torch_dir=${torch_prefix%/share/cmake}  # <site-packages>/torch for a wheel
grep -qF "$torch_dir" "$prefix/$libdir/cmake/difftrain/difftrainTargets.cmake" &&
  fail "the exported targets name this LibTorch's paths ($torch_dir): they come from the consumer's find_package(Torch)"
echo "installed: bin/difftrain, include/difftrain ($(ls "$prefix/include/difftrain" | wc -l) headers), $libdir/libdifftrain_*.a, $libdir/cmake/difftrain"

echo "== the installed CLI from a clean environment"
ldd_out=$("${clean_env[@]}" ldd "$prefix/bin/difftrain")
if grep -q "not found" <<<"$ldd_out"; then
  grep "not found" <<<"$ldd_out" >&2
  fail "ldd $prefix/bin/difftrain: libraries not found"
fi
grep -q "libtorch_cpu.so" <<<"$ldd_out" || fail "ldd does not list libtorch_cpu.so"
got=$("${clean_env[@]}" "$prefix/bin/difftrain" --version)
echo "$got"
grep -qF "$version" <<<"$got" || fail "difftrain --version says '$got', expected $version"

echo "== consumer project: find_package(difftrain CONFIG), difftrain::core"
generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
"$cmake" -S "$here" -B "$work/consumer" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_COMPILER="$cxx" \
  -DCMAKE_PREFIX_PATH="$prefix;$torch_prefix" "$@" >"$work/configure.log" 2>&1 ||
  { cat "$work/configure.log"; fail "configuring the consumer"; }
grep -E "difftrain|Torch|CUDA" "$work/configure.log" | grep -v "^--.*Looking" | head -5 || true
"$cmake" --build "$work/consumer" >"$work/build.log" 2>&1 || { cat "$work/build.log"; fail "building the consumer"; }
"${clean_env[@]}" "$work/consumer/consumer" "$source_dir/configs" || fail "the consumer"
echo "check_install: passed"
