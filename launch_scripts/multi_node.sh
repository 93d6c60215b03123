#!/usr/bin/env bash
# Several nodes with the `deepspeed` launcher, in either of its two forms.
#
# (a) ssh: run once, on the first node; it starts every node's ranks over passwordless ssh (pdsh).
#       HOSTFILE=hostfile MASTER_ADDR=node0 RECIPE=recipe.yaml bash launch_scripts/multi_node.sh
# (b) no ssh: run on every node, each with its own NODE_RANK (0 on the MASTER_ADDR node). Use it where
#     nodes cannot ssh to each other (containers, cloud jobs that start one launcher per node).
#       NODE_RANK=0 HOSTFILE=hostfile MASTER_ADDR=node0 RECIPE=recipe.yaml bash launch_scripts/multi_node.sh
#       NODE_RANK=1 HOSTFILE=hostfile MASTER_ADDR=node0 RECIPE=recipe.yaml bash launch_scripts/multi_node.sh
#
# HOSTFILE has one line per node, "<hostname> slots=<GPUs>", the same file on every node.
# Environment:
#   RECIPE            YAML/JSON recipe with teacher, data, out and the run's options            (required)
#   HOSTFILE          the nodes and their GPU counts                                            (required)
#   MASTER_ADDR       address of the first node, reachable from all nodes                       (required)
#   MASTER_PORT       rendezvous port on MASTER_ADDR                                            (default: 29500)
#   NODE_RANK         this node's index in HOSTFILE; set it to use the no-ssh form (b)
#   NUM_NODES         nodes to use, the first ones of HOSTFILE                     (default: all of HOSTFILE)
#   GPUS_PER_NODE     ranks per node                                               (default: the slots)
#   MINIDISC_COMMAND  compress, distill or maxidisc                                             (default: compress)
#   RESUME            1 = continue the run in out/ from its last checkpoint                     (default: 0)
#   NCCL_SOCKET_IFNAME  the network interface NCCL should use when a node has several (e.g. ib0, eth0)
# The recipe's teacher, data and out must be at the same path on every node (a shared file system).
set -euo pipefail

die() { echo "multi_node.sh: $*" >&2; exit 2; }
for name in RECIPE HOSTFILE MASTER_ADDR; do
  [ -n "${!name:-}" ] || die "set $name (see the header of $0 for what it means)"
done
[ -f "$RECIPE" ] || die "RECIPE=$RECIPE does not exist"
[ -f "$HOSTFILE" ] || die "HOSTFILE=$HOSTFILE does not exist"
MINIDISC=$(command -v minidisc) || die "minidisc is not on PATH: activate the environment you ran 'pip install -e .' in"
NUM_NODES=${NUM_NODES:-$(grep -cE '^[^#[:space:]]' "$HOSTFILE")}

launcher=(deepspeed --hostfile "$HOSTFILE" --num_nodes "$NUM_NODES" --master_addr "$MASTER_ADDR"
          --master_port "${MASTER_PORT:-29500}")
[ -n "${GPUS_PER_NODE:-}" ] && launcher+=(--num_gpus "$GPUS_PER_NODE")
if [ -n "${NODE_RANK:-}" ]; then
  [ "$NODE_RANK" -lt "$NUM_NODES" ] 2>/dev/null || die "NODE_RANK=$NODE_RANK must be 0..$((NUM_NODES - 1))"
  launcher+=(--no_ssh --node_rank "$NODE_RANK")
fi
args=("${MINIDISC_COMMAND:-compress}" --config "$RECIPE")
[ "${RESUME:-0}" = 1 ] && args+=(--resume)
exec "${launcher[@]}" "$MINIDISC" "${args[@]}" "$@"
