#!/usr/bin/env bash
# Checks that C++ code follows .clang-format. The code base predates the file and is formatted by
# hand, so by default only the lines changed since a base are checked (git clang-format):
#   scripts/check-format.sh              lines changed since the merge base of HEAD and main
#                                        ($DIFFTRAIN_FORMAT_BASE overrides main), committed or not
#                                        (files git does not track yet are not seen: git add them)
#   scripts/check-format.sh BASE         the same against another branch or commit
#   scripts/check-format.sh --all        every tracked .cpp/.h file, whole (reports today's drift)
#   scripts/check-format.sh --fix [BASE] reformat the changed lines in place instead of failing
# Exit 0: formatted; 1: not (the diff that fixes it is printed); 77: cannot check here (no
# clang-format, not a git checkout, no such base), which ctest reports as skipped.
# Needs clang-format (Debian: clang-format, which also brings git-clang-format; install-deps.sh installs it).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
clang_format=${CLANG_FORMAT:-clang-format}

skip() { echo "check-format: skipped: $*"; exit 77; }
command -v "$clang_format" >/dev/null || skip "$clang_format not found (Debian: apt-get install clang-format)"
git rev-parse --is-inside-work-tree >/dev/null 2>&1 || skip "$root is not a git checkout"

mode=diff
case "${1:-}" in
  --all) mode=all; shift ;;
  --fix) mode=fix; shift ;;
  -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
esac

if [ "$mode" = all ]; then
  mapfile -t files < <(git ls-files -- '*.cpp' '*.h')
  if "$clang_format" --dry-run --Werror "${files[@]}" 2>/dev/null; then
    echo "check-format: all ${#files[@]} files are formatted"; exit 0
  fi
  bad=0
  for f in "${files[@]}"; do
    if ! "$clang_format" "$f" | diff -u --label "a/$f" --label "b/$f" "$f" -; then bad=$((bad + 1)); fi
  done
  echo "check-format: $bad of ${#files[@]} files differ from .clang-format"; exit 1
fi

command -v git-clang-format >/dev/null || skip "git-clang-format not found (it comes with Debian's clang-format)"
base=${1:-${DIFFTRAIN_FORMAT_BASE:-main}}
git rev-parse --verify --quiet "$base^{commit}" >/dev/null || skip "no branch or commit '$base' to compare with"
merge_base=$(git merge-base HEAD "$base") || skip "HEAD and $base have no common ancestor"

if [ "$mode" = fix ]; then
  git clang-format --force --binary "$clang_format" --extensions cpp,h "$merge_base" -- || true  # --force: uncommitted files too
  exit 0
fi
out=$(git clang-format --binary "$clang_format" --extensions cpp,h --diff "$merge_base" --)
if grep -q '^diff --git' <<<"$out"; then
  echo "$out"
  echo "check-format: lines changed since $base (merge base ${merge_base:0:12}) do not follow .clang-format;"
  echo "              apply the diff above, or run: scripts/check-format.sh --fix ${1:-}"
  exit 1
fi
echo "check-format: lines changed since $base (merge base ${merge_base:0:12}) follow .clang-format"
