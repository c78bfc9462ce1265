#!/usr/bin/env bash
# Starts difftrain data-parallel on this node, the way `torchrun --no-python` does, without Python:
#
#   scripts/launch.sh [--nproc-per-node N] [--nnodes M] [--node-rank R] [--master-addr HOST]
#                     [--master-port PORT] -- build/difftrain train --config X ...
#
# Each worker gets torchrun's variables: RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE,
# GROUP_RANK, MASTER_ADDR, MASTER_PORT. On several nodes, run it once per node with the same
# --nnodes, --master-addr and --master-port and that node's --node-rank.
# SIGTERM, SIGINT and SIGUSR1 are forwarded to every worker once (workers run in their own
# process groups, so Ctrl-C reaches them through the launcher only). When a worker fails, the
# others are stopped (SIGTERM, then SIGKILL after --kill-grace seconds) and the launcher exits
# with the failing worker's code; 75 (every worker stopped after a checkpoint) is passed through.
set -uo pipefail

nproc=1 nnodes=1 node_rank=0 master_addr=127.0.0.1 master_port=29500 grace=30
usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-1}"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --nproc-per-node|--nproc_per_node) nproc=$2; shift 2 ;;
    --nnodes) nnodes=$2; shift 2 ;;
    --node-rank|--node_rank) node_rank=$2; shift 2 ;;
    --master-addr|--master_addr) master_addr=$2; shift 2 ;;
    --master-port|--master_port) master_port=$2; shift 2 ;;
    --kill-grace) grace=$2; shift 2 ;;
    -h|--help) usage 0 ;;
    --) shift; break ;;
    *) echo "launch.sh: unknown option $1 (the command goes after --)" >&2; usage 1 ;;
  esac
done
[ $# -gt 0 ] || { echo "launch.sh: no command after --" >&2; usage 1; }
for v in nproc nnodes node_rank master_port grace; do
  [[ ${!v} =~ ^[0-9]+$ ]] || { echo "launch.sh: --${v//_/-} must be a non-negative integer, got '${!v}'" >&2; exit 1; }
done
[ "$nproc" -ge 1 ] && [ "$nnodes" -ge 1 ] || { echo "launch.sh: --nproc-per-node and --nnodes must be >= 1" >&2; exit 1; }
[ "$node_rank" -lt "$nnodes" ] || { echo "launch.sh: --node-rank $node_rank must be below --nnodes $nnodes" >&2; exit 1; }

world=$((nproc * nnodes))
set -m  # each worker in its own process group
declare -A rank_of=()
pids=()
for ((local = 0; local < nproc; local++)); do
  rank=$((node_rank * nproc + local))
  RANK=$rank LOCAL_RANK=$local WORLD_SIZE=$world LOCAL_WORLD_SIZE=$nproc GROUP_RANK=$node_rank \
    MASTER_ADDR=$master_addr MASTER_PORT=$master_port "$@" &
  pids+=($!)
  rank_of[$!]=$rank
done
set +m
echo "launch.sh: started ranks $((node_rank * nproc))..$((node_rank * nproc + nproc - 1)) of $world (pids ${pids[*]})" >&2

forwarded=0
forward() {
  [ "$forwarded" = 1 ] && return
  forwarded=1
  echo "launch.sh: forwarding SIG$1 to the workers" >&2
  for p in "${pids[@]}"; do kill -s "$1" "$p" 2>/dev/null; done
}
trap 'forward TERM' TERM
trap 'forward INT' INT
trap 'forward USR1' USR1

stop_others() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null; done
  local deadline=$((SECONDS + grace))
  while [ $SECONDS -lt $deadline ] && jobs -rp | grep -q .; do sleep 0.2; done
  for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null; done
}

status=0 left=$nproc
while [ "$left" -gt 0 ]; do
  pid=""
  wait -n -p pid
  code=$?
  [ -z "${pid:-}" ] && continue  # a trapped signal interrupted wait
  left=$((left - 1))
  if [ "$code" -ne 0 ] && [ "$status" -eq 0 ]; then
    status=$code
    if [ "$code" -ne 75 ]; then
      echo "launch.sh: rank ${rank_of[$pid]} (pid $pid) failed with exit code $code; stopping the other workers" >&2
      stop_others
    fi
  fi
done
[ "$status" -eq 0 ] || echo "launch.sh: exit code $status" >&2
exit "$status"
