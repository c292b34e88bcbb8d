#!/bin/bash
# The GPU checks of issues #6, #7 (and #8's K-students benchmark, #14's loader, #15's policies) in one device call (prepared, not yet run: no GPU was lent).
# Carry the data and an old tree for the overhead comparison, e.g. in .gpu/ (git-ignored):
#   cp ../shared/data/cifar10-jpeg.tar.gz .gpu/; git archive 971d078 kdfast | tar -x -C .gpu/old
# and tyro's wheels in .whl/ (see the device README). TINY=1 runs it at toy size (a dry run on a CPU).
set -u
cd "$(dirname "$0")/.."  # the repository root
ROOT=$PWD; O=${OUT:-/tmp/out}; mkdir -p $O
if [ -d .whl ] && ! python3 -c "import tyro" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl >/dev/null 2>&1
  export PYTHONPATH=/tmp/site
fi
PY=${PY:-python3}
export KDFAST_DATA=$ROOT/.gpu/cifar10-jpeg.tar.gz
C=/tmp/kdcache; R=/tmp/kdruns; mkdir -p $C $R
T0=$(date +%s); el() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
if [ -n "${TINY:-}" ]; then SUB="--train-per-class 60 --test-per-class 20"; E=(1 2 1 2 2); BS=100; else SUB=""; E=(30 30 25 15 6); BS=512; fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; $PY -c "import torch,accelerate,timm,sys;print(sys.version.split()[0],torch.__version__,accelerate.__version__,timm.__version__,torch.cuda.is_available() and torch.cuda.get_device_name())"; nproc; } > $O/env.txt 2>&1
$PY -c "from kdfast.data import load_dataset; load_dataset(None, '$C')" >> $O/env.txt 2>&1; el "data decoded" >> $O/env.txt
# 1) the engine's per-step work (#6: NaN tracking, per-step RNG seed, stop checks): old vs new, ResNet-8 fp32 (launch-bound)
for round in 1 2; do for v in old new; do
  d=$ROOT; [ $v = old ] && d=$ROOT/.gpu/old
  (cd $d && PYTHONPATH=$d:${PYTHONPATH:-} $PY -m kdfast.train --model resnet8 --name r8 --epochs ${E[4]} --batch-size $BS --eval-every 0 --precision fp32 --no-progress --cache-dir $C --out-dir $R/bench-$v$round $SUB > $R/bench-$v$round.log 2>&1)
  $PY -c "import json,statistics as s;r=[json.loads(l)['img_per_s'] for l in open('$R/bench-$v$round/r8.metrics.jsonl')][1:];print('$v round $round resnet8 fp32 img/s, epochs 2..: median',round(s.median(r)),r)" >> $O/bench.txt 2>&1
done; done
el "bench done" >> $O/bench.txt
# 1b) #8: K students in one fused pass against one at a time, img/s per student (alone on the GPU, before the rest)
timeout 120 $PY benchmarks/together.py --ks 1 2 4 8 16 --steps 8 > $O/together.txt 2>&1; el "together done" >> $O/bench.txt
# 1c) #14: the loader at 224 px (streamed tier, device tier's batched resize on the GPU, nvjpeg) and the rrc views
# on the GPU against the CPU's Pillow (tests/test_views.py's CUDA test)
$PY benchmarks/make_images.py --data $KDFAST_DATA --out /tmp/photos --train-per-class 200 --test-per-class 10 > $O/loader.txt 2>&1
timeout 180 $PY benchmarks/loader.py --data /tmp/photos --size 224 --workers 8 --steps 20 --batch-size 256 >> $O/loader.txt 2>&1
timeout 120 $PY -m pytest -q -p no:cacheprovider tests/test_views.py tests/test_images.py >> $O/loader.txt 2>&1
el "loader done" >> $O/bench.txt
# 1d) #15: the policies' cost on the GPU against timm's CPU pipeline, and their views on CUDA = the CPU's
timeout 150 $PY benchmarks/policies.py --steps 10 > $O/policies.txt 2>&1
timeout 120 $PY -m pytest -q -p no:cacheprovider tests/test_policies.py >> $O/policies.txt 2>&1
el "policies done" >> $O/bench.txt
# 2) #6 and #7 tests on the GPU (beside the teachers)
( timeout 200 $PY -m pytest -q -p no:cacheprovider tests/test_runs.py -k "sigterm_mid_epoch or vit_resumes or nan_loss or payload_planted or refuses_another or disk_full" tests/test_augment.py > $O/tests.txt 2>&1
  timeout 150 $PY -m pytest -q -p no:cacheprovider tests/test_methods.py -k "resumes or no_hook or two_stage_trains or vit_tokens or from_the_cache" >> $O/tests.txt 2>&1 ) &
# 3) preemption of a real teacher run on the GPU (SIGTERM after 20 s), then the method tables resume it
TFLAGS="--model resnet18 --name teacher --epochs ${E[0]} --batch-size $BS --out-dir $R/cnn --resume --data $KDFAST_DATA --cache-dir $C --precision auto --no-progress $SUB"
timeout -s TERM 20 $PY -m kdfast.train $TFLAGS > $R/preempt.log 2>&1; echo "teacher run after SIGTERM: exit $?" >> $R/preempt.log
el "preempt done" >> $R/preempt.log
timeout 420 $PY benchmarks/methods_table.py --pair cnn --data $KDFAST_DATA --cache-dir $C --out $R/cnn --teacher-epochs ${E[0]} --student-epochs ${E[1]} --seeds 0 1 --batch-size $BS --parallel 6 -- $SUB > $O/cnn.log 2>&1 &
timeout 420 $PY benchmarks/methods_table.py --pair vit --data $KDFAST_DATA --cache-dir $C --out $R/vit --teacher-epochs ${E[2]} --student-epochs ${E[3]} --seeds 0 1 --batch-size $BS --parallel 5 --methods "no KD" KD DKD "KD + logit std" "FitNets joint" -- $SUB > $O/vit.log 2>&1 &
wait
el "all done" >> $O/env.txt
cat $R/preempt.log >> $O/env.txt
(cd $R && tar czf $O/runs.tar.gz $(find . -name "*.json" -o -name "*.jsonl" -o -name "*.md" -o -name "*.log" | grep -v "/bench-.*/"))
