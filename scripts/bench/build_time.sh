#!/bin/bash
# Clean configure + build of a commit in a fresh worktree (/tmp/bt-REV), timed: wall, user and sys
# seconds, and the number of build steps; the per-step seconds are in /tmp/bt-REV/build/.ninja_log.
set -e
rev=${1:?usage: build_time.sh REV}; dir=/tmp/bt-$rev
cd "$(dirname "$0")/../.."; root=$(pwd)
rm -rf "$dir"; git worktree prune; git worktree add -q --detach $dir $rev
cd $dir
VENV=$root/.venv
/usr/bin/time -f "configure wall %e user %U sys %S" make configure VENV=$VENV > /tmp/bt-$rev.conf.log 2>&1
/usr/bin/time -f "build wall %e user %U sys %S" cmake --build build -j2 > /tmp/bt-$rev.log 2>&1
tail -1 /tmp/bt-$rev.conf.log; tail -1 /tmp/bt-$rev.log
echo "steps: $(grep -c 'Building\|Linking' /tmp/bt-$rev.log)"
