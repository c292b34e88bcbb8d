#!/bin/bash
# Every GPU check of kdfast in one device call of at most 8 minutes (issue #26), in priority order, each step under its
# own timeout, at most 8 files under $OUT, each written as the step goes (a cut run still returns what it measured):
#   env.txt       the machine, versions, what is missing
#   sync.txt      syncs per training step (torch's sync debug mode), kernels per step and the GPU's busy time
#   speed.txt     bare step and full engine img/s: models x batch 512/2048 x fp32/bf16 x compiled or not
#   smoke.txt     every GPU-only path: the launch configs' precision, fp16 + accumulation + EMA + TTA + validation and
#                 evaluate in a new process, the streamed tier's GPU branch, rrc + deit, cache build / verify, DKD,
#                 the tables' zoo, kdfast table and a cache ensemble, one NCCL rank with --sync-bn --compile, a
#                 --deterministic resume bit for bit
#   tests.txt     the CUDA tests (views, policies, rrc on the GPU = the CPU's)
#   together.txt  K students in one pass, K = 1, 4, 16
#   policies.txt  the policies' cost on the GPU
# It needs no dataset (synthetic images made here). SHORT=1 (the default where there is no GPU) runs every step at toy
# size on a CPU: the plumbing, tested in CI (tests/test_benchmarks.py), so that the script cannot rot between loans.
# Whatever the GPU machine lacks (tyro, ...) travels as wheels in .whl/ (the device README) or is named in env.txt.
set -u
cd "$(dirname "$0")/.."  # the repository root
ROOT=$PWD; O=${OUT:-/tmp/gpu_checks_out}; mkdir -p "$O"
PY=${PY:-python3}
if [ -d .whl ] && ! $PY -c "import tyro" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl >/dev/null 2>&1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$ROOT:${PYTHONPATH:-}
GPU=$($PY -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
SHORT=${SHORT:-$([ "$GPU" = 1 ] && echo 0 || echo 1)}
W=$(mktemp -d); T0=$(date +%s)
el() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
# each step's time limit, sized for a device call; the toy run on a CPU (CI, beside other work) gets four times as long
SCALE=$([ "$SHORT" = 1 ] && echo 4 || echo 1)
limit() { echo $(( $1 * SCALE )); }
if [ "$SHORT" = 1 ]; then  # toy sizes: the plumbing in about a minute on 2 CPU cores
  B=16; STEPS=4; SPEED="--models resnet8 vit_student --batches 16 --precisions fp32 --compiled no --steps 2 --engine-images 96"
  COMPILED="--models resnet8 --batches 16 --precisions fp32 --compiled yes --steps 2 --engine-images 96"; KS="1 2"; N=24
  export KDFAST_TEST_COMPILE=aot_eager  # torch.compile without a C compiler, quick; SYNCBN: gloo has no SyncBatchNorm
  SYNCBN=""
else
  B=512; STEPS=12; SPEED="--batches 512 2048 --compiled no --budget-s 100"
  COMPILED="--batches 512 --precisions bf16 --compiled yes --engine-images 0 --budget-s 50"; KS="1 4 16"; N=700
  SYNCBN="--sync-bn"
fi
RUN="$PY -m tests.stop_at -1"  # kdfast's entry points (KDFAST_TEST_COMPILE picks a compile backend in SHORT mode)
COMMON="--data $W/tiny --cache-dir $W/cache --no-progress --batch-size $B --eval-batch-size $B"

# 1) the machine, the versions, what is missing
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | head -3
  $PY -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda,
  torch.cuda.is_available() and torch.cuda.get_device_name())"
  for m in accelerate timm tyro h5py safetensors tqdm PIL; do $PY -c "import $m; print('$m', getattr($m, '__version__', ''))" 2>/dev/null || echo "MISSING $m"; done
  $PY -c "from kdfast.machine import describe; print(describe())"; nproc; echo "SHORT=$SHORT"
  $PY -c "from tests.conftest import write_image_folder as w; w('$W/tiny', n_train=$N)" && el "data: $((3 * N)) images made"
} > "$O/env.txt" 2>&1
if grep -q MISSING "$O/env.txt"; then el "stopped: a package is missing (see above); carry its wheels in .whl/" >> "$O/env.txt"; exit 1; fi

# 2) does the step wait for the GPU? syncs per step, kernels per step, busy time
timeout $(limit 90) $PY benchmarks/gpu_sync.py --batch-size $B --steps $STEPS > "$O/sync.txt" 2>&1; el "sync: exit $?" >> "$O/sync.txt"

# 3) speed: bare step against the full engine (uncompiled, then compiled)
{ timeout $(limit 110) $PY benchmarks/gpu_speed.py $SPEED; el "speed: exit $?"
  timeout $(limit 60) $PY benchmarks/gpu_speed.py $COMPILED; el "compiled: exit $?"; } > "$O/speed.txt" 2>&1

# 4) every GPU-only path once, each line "OK name" or "FAILED name" with its output's tail
smoke() {  # smoke NAME SECONDS COMMAND...: runs COMMAND, says how it ended
  local name=$1 limit=$2; shift 2
  if timeout "$(limit "$limit")" "$@" > "$W/smoke.log" 2>&1; then el "OK $name"; else el "FAILED $name (exit $?)"; tail -5 "$W/smoke.log"; fi
}
{
  launcher=($PY -m accelerate.commands.launch --config_file launch/single_gpu.yaml); [ "$GPU" = 1 ] || launcher+=(--cpu)
  smoke "launch/single_gpu.yaml: kdfast's precision" 60 bash -c "${launcher[*]} -m kdfast.train --model resnet8 --epochs 1 \
    $COMMON --out-dir $W/launch | grep -E 'bf16|fp32 \(auto'"
  grep -hE " on (cuda|cpu)" "$W/smoke.log" | head -1
  smoke "fp16 + grad-accum 2 + EMA + TTA + validation" 60 $RUN kdfast.train --model resnet8 --epochs 2 $COMMON \
    --precision fp16 --grad-accum 2 --ema 0.9 --tta flip --val-per-class 8 --out-dir $W/t --name teacher
  smoke "evaluate in a new process = the run's accuracy" 40 $PY -c "
import json, subprocess, sys
meta = json.load(open('$W/t/teacher.json'))
out = subprocess.run([sys.executable, '-m', 'kdfast.evaluate', '--checkpoint', '$W/t/teacher.pth', '--no-progress'], capture_output=True, text=True)
print(out.stdout[-300:], out.stderr[-300:])
assert f\"{meta['test_accuracy']:.4f}\" in out.stdout, meta['test_accuracy']"
  smoke "streamed tier (views on the GPU)" 60 $RUN kdfast.train --model resnet8 --epochs 1 $COMMON --data-tier stream \
    --aug-recipe cct --out-dir $W/stream
  smoke "rrc + deit recipe, ViT student" 60 $RUN kdfast.train --model vit_student --epochs 1 $COMMON --aug-recipe deit \
    --augment.crop-size 32 --out-dir $W/deit
  smoke "cache build + verify" 60 bash -c "$PY -m kdfast.cache build --teacher $W/t/teacher.pth --out $W/t.h5 --slots 2 \
    --cache-dir $W/cache --no-progress && $PY -m kdfast.cache verify $W/t.h5 --teacher $W/t/teacher.pth --no-progress"
  smoke "DKD from the cache" 60 $RUN kdfast.distill --teacher-cache $W/t.h5 --model resnet8 --method dkd --epochs 2 \
    $COMMON --out-dir $W/dkd
  smoke "the tables' zoo: a bf16 channels-last step of each model" 90 $PY -c "
import torch
from kdfast.published import CIFAR100
from kdfast.models import create_model
dev = 'cuda' if torch.cuda.is_available() else 'cpu'
for name in sorted({m for pair in CIFAR100 for m in pair}):
    model = create_model(name, num_classes=100).to(dev, memory_format=torch.channels_last)
    x = torch.randn(8, 3, 32, 32, device=dev).to(memory_format=torch.channels_last)
    with torch.autocast(dev, torch.bfloat16):
        loss = model(x).float().logsumexp(1).mean()
    loss.backward(); assert torch.isfinite(loss), name
print('zoo ok on', dev)"
  smoke "kdfast table (kd, dkd) and an ensemble of two caches" 120 bash -c "$RUN kdfast.table --pairs resnet20:resnet8 \
    --methods kd dkd --seeds 1 --epochs 1 $COMMON --out-dir $W/table && $RUN kdfast.distill --model resnet8 --epochs 1 \
    --teacher-cache $W/table/caches/resnet20.h5 $W/table/caches/resnet20.h5 --cache-weights 2 1 $COMMON --out-dir $W/ens"
  smoke "one NCCL rank (gloo on a CPU): --sync-bn --compile" 120 $PY -m torch.distributed.run --nproc_per_node 1 \
    -m tests.stop_at -1 kdfast.train --model resnet8 --epochs 1 $COMMON $SYNCBN --compile --out-dir $W/nccl
  smoke "--deterministic: a run stopped and resumed = the run whole, bit for bit" 120 bash -c "
    $RUN kdfast.train --model resnet8 --epochs 2 $COMMON --deterministic --out-dir $W/whole > /dev/null &&
    { $PY -m tests.stop_at 3 kdfast.train --model resnet8 --epochs 2 $COMMON --deterministic --out-dir $W/cut; true; } &&
    $RUN kdfast.train --model resnet8 --epochs 2 $COMMON --deterministic --out-dir $W/cut --resume > /dev/null &&
    $PY -c \"import torch; a, b = (torch.load(f'$W/{d}/resnet8.pth', weights_only=True) for d in ('whole', 'cut'));
assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]\""
} > "$O/smoke.txt" 2>&1

# 5) the CUDA tests (they skip on a CPU)
timeout $(limit 60) $PY -m pytest -q -p no:cacheprovider -k "cuda or gpu" tests/test_augment.py tests/test_views.py \
  tests/test_policies.py > "$O/tests.txt" 2>&1; el "tests: exit $?" >> "$O/tests.txt"

# 6) K students in one pass, 7) the policies' cost
timeout $(limit 40) $PY benchmarks/together.py --ks $KS --vit-ks $KS --steps $([ "$SHORT" = 1 ] && echo 1 || echo 8) --out "$W/results" \
  > "$O/together.txt" 2>&1; el "together: exit $?" >> "$O/together.txt"
if [ "$SHORT" = 1 ]; then P="--steps 1 --images 200 --model-steps 1 --warmup 1 --batch-size 32"; else P="--steps 10"; fi
timeout $(limit 40) $PY benchmarks/policies.py $P --out "$W/results" > "$O/policies.txt" 2>&1; el "policies: exit $?" >> "$O/policies.txt"
el "all done" >> "$O/env.txt"
rm -rf "$W"
