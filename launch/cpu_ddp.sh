#!/usr/bin/env bash
# Several gloo processes on one CPU machine. `accelerate launch --cpu --num_processes N` starts only one
# process (accelerate issue 2741), so this uses torchrun; kdfast asks Accelerate for CPU DDP itself.
#   bash launch/cpu_ddp.sh 2 kdfast.train --model resnet8 --epochs 5
set -euo pipefail
nproc=${1:?usage: cpu_ddp.sh NUM_PROCESSES MODULE [FLAGS...]}
module=${2:?usage: cpu_ddp.sh NUM_PROCESSES MODULE [FLAGS...]}
shift 2
export ACCELERATE_USE_CPU=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / nproc > 0 ? $(nproc) / nproc : 1 ))}
exec torchrun --standalone --nproc_per_node "$nproc" -m "$module" "$@"
