#!/usr/bin/env bash
# Training speed on 1 process, 2 processes on one node, and 2 "nodes" of 1 process (two torchrun agents on
# 127.0.0.1): the same run each time (the global batch is split across the processes).
#   bash benchmarks/processes.sh DATA [MODEL] [TRAIN_PER_CLASS]
set -euo pipefail
data=${1:?usage: processes.sh DATA [MODEL] [TRAIN_PER_CLASS]}
model=${2:-resnet8}
per_class=${3:-500}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
grep -m1 "model name" /proc/cpuinfo || true
grep -m1 -o -w -E "avx512_bf16|amx_bf16|avx512f|avx2" /proc/cpuinfo | sort -u | tr '\n' ' '; echo
cores=$(nproc)
flags=(--model "$model" --data "$data" --cache-dir "$out/cache" --train-per-class "$per_class" --test-per-class 100
       --epochs 2 --batch-size 256 --eval-batch-size 500 --no-progress)
export ACCELERATE_USE_CPU=${ACCELERATE_USE_CPU:-1}
speed() { python - "$1" <<'EOF'
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1])]
print(f"epoch 2: {lines[-1]['img_per_s']:.0f} img/s, test accuracy {lines[-1]['test_accuracy']:.4f}")
EOF
}
python -m kdfast.train "${flags[@]}" --name warm --out-dir "$out/warm" > /dev/null  # decodes the data once
OMP_NUM_THREADS=$cores python -m kdfast.train "${flags[@]}" --name one --out-dir "$out/one" > /dev/null
echo "1 process x $cores threads:        $(speed "$out/one/one.metrics.jsonl")"
OMP_NUM_THREADS=$((cores / 2 > 0 ? cores / 2 : 1)) python -m torch.distributed.run --standalone --nproc_per_node 2 \
  -m kdfast.train "${flags[@]}" --name two --out-dir "$out/two" > /dev/null 2>&1
echo "2 processes on one node:     $(speed "$out/two/two.metrics.jsonl")"
port=$(python -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
for rank in 0 1; do
  OMP_NUM_THREADS=$((cores / 2 > 0 ? cores / 2 : 1)) python -m torch.distributed.run --nnodes 2 --node_rank $rank \
    --nproc_per_node 1 --master_addr 127.0.0.1 --master_port "$port" \
    -m kdfast.train "${flags[@]}" --name nodes --out-dir "$out/nodes" > /dev/null 2>&1 &
done
wait
echo "2 nodes x 1 process (local): $(speed "$out/nodes/nodes.metrics.jsonl")"
