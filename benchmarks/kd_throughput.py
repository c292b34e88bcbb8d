"""Distillation throughput: student alone, online KD (teacher pass per batch), cached KD (HDF5 logits), cache build,
and one row per distillation method (kd, dkd, each with logit standardization, from the cache; FitNets online).

    python benchmarks/kd_throughput.py --data ../shared/data/cifar10-jpeg.tar.gz

For each pair (ResNet-18 -> ResNet-8, ViT-Tiny -> 6-block ViT) it times training steps of the student
alone, with an online teacher, and with teacher logits served from a real cache built by
`kdfast.cache.build`, in one run. Cached KD can at best match the student alone; the most it can gain
over online KD is 1 + t(teacher inference) / t(student step) per image, printed beside the ratio reached.
Weights are random (speed does not depend on them). Saves the table as JSON in benchmarks/results/.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import datetime, timezone

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from kdfast.augment import AugmentSpec  # noqa: E402
from kdfast.cache import BuildConfig, build  # noqa: E402
from kdfast.checkpoint import load_teacher, save_checkpoint  # noqa: E402
from kdfast.config import DistillConfig  # noqa: E402
from kdfast.data import TrainLoader, load_dataset  # noqa: E402
from kdfast.distill import cached_teacher, online_teacher  # noqa: E402
from kdfast.engine import make_runtime  # noqa: E402
from kdfast.hints import FeatureHook, HintedStudent, feature_shape, hint_layers, make_regressor  # noqa: E402
from kdfast.losses import cross_entropy, kd_loss  # noqa: E402
from kdfast.methods import method_entry  # noqa: E402
from kdfast.machine import describe  # noqa: E402
from kdfast.models import create_model, model_entry  # noqa: E402

PAIRS = (("resnet18", "resnet8"), ("vit_tiny", "vit_student"))


def seconds_per_image(step, batches, warmup: int, device) -> float:
    for batch in batches[:warmup]:
        step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for batch in batches[warmup:]:
        step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / sum(len(b.labels) for b in batches[warmup:])


def bench_pair(teacher_name, student_name, data, args, runtime, workdir) -> dict:
    acc, device = runtime.accelerator, runtime.device
    channels_last = model_entry(student_name).family == "cnn"
    teacher = create_model(teacher_name, num_classes=len(data.classes))
    meta = {"model": teacher_name, "classes": data.classes, "family": model_entry(teacher_name).family,
            "data": data.describe()}
    save_checkpoint(workdir, f"{teacher_name}_random", teacher, meta)
    ckpt = os.path.join(workdir, f"{teacher_name}_random.pth")

    t0 = time.perf_counter()
    cache_path = build(BuildConfig(teacher=ckpt, out=os.path.join(workdir, f"{teacher_name}.h5"), slots=1,
                                   data=args.data, cache_dir=args.cache_dir, train_per_class=args.train_per_class,
                                   test_per_class=args.test_per_class, batch_size=args.build_batch_size,
                                   precision=args.precision, progress=False), runtime)
    build_img_s = (len(data.train) + len(data.test)) / (time.perf_counter() - t0)

    cfg = DistillConfig(model=student_name, teacher=ckpt, teacher_cache=cache_path, data=args.data, epochs=1,
                        cache_dir=args.cache_dir, train_per_class=args.train_per_class,
                        test_per_class=args.test_per_class, precision=args.precision).resolved()
    online, _, _ = online_teacher(cfg, data, runtime)
    cached, aug_seed_for_epoch, _ = cached_teacher(cfg, data, runtime)
    loader = TrainLoader(data.train, args.batch_size, 0, AugmentSpec(), device, channels_last=channels_last)
    batches = list(loader.epoch(0, aug_seed_for_epoch(0)))[: args.steps + args.warmup]
    student = create_model(student_name, num_classes=len(data.classes)).to(device)
    if channels_last:
        student = student.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)

    def train_step(target_fn):
        def step(batch):
            target = target_fn(batch) if target_fn else None
            with acc.autocast():
                logits = student(batch.images)
            loss = kd_loss(logits, target, batch.labels, 0.5, 4.0) if target_fn else cross_entropy(logits, batch.labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step

    student.train()
    modes = {"cached": train_step(cached), "student": train_step(None), "online": train_step(online),
             "teacher": online}  # the last one is teacher inference alone
    modes.update(method_steps(cfg, cached, ckpt, student_name, data, runtime))
    best = {name: float("inf") for name in modes}
    for _ in range(args.rounds):  # rounds interleave the modes; the best round of each counts
        for name, step in modes.items():
            best[name] = min(best[name], seconds_per_image(step, batches, args.warmup, device))
    t_student, t_online, t_cached, t_teacher = (best[n] for n in ("student", "online", "cached", "teacher"))
    limit = 1 + t_teacher / t_student
    methods = {name: {"img_s": 1 / best[name], "over_student": t_student / best[name]}
               for name in modes if name.startswith("method ")}
    return {"pair": f"{teacher_name} -> {student_name}", "student_only_img_s": 1 / t_student,
            "online_kd_img_s": 1 / t_online, "cached_kd_img_s": 1 / t_cached, "teacher_inference_img_s": 1 / t_teacher,
            "cache_build_img_s": build_img_s, "cached_over_student": t_student / t_cached,
            "cached_over_online": t_online / t_cached, "limit_cached_over_online": limit,
            "reached_of_limit": (t_online / t_cached) / limit, "methods": methods}


def method_steps(cfg: DistillConfig, cached, ckpt: str, student_name: str, data, runtime) -> dict:
    """A full training step (forward, the method's loss, backward, SGD) for each method, as `kdfast distill` runs it."""
    acc, device = runtime.accelerator, runtime.device
    channels_last = model_entry(student_name).family == "cnn"

    def fresh(model):
        model = model.to(device)
        return model.to(memory_format=torch.channels_last) if channels_last else model

    steps = {}
    for name, std in (("kd", False), ("kd", True), ("dkd", False), ("dkd", True)):
        loss_fn = method_entry(name).build(DistillConfig(**{**cfg.__dict__, "method": name, "logit_std": std}), 0.0)
        model = fresh(create_model(student_name, num_classes=len(data.classes)))
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step(batch, loss_fn=loss_fn, model=model, opt=opt):
            target = cached(batch)
            with acc.autocast():
                logits = model(batch.images)
            loss = loss_fn(logits, target, batch.labels, 0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        steps[f"method {name}{' + logit std' if std else ''} (cached)"] = step

    teacher, meta = load_teacher(ckpt, data.classes, device)
    layers = hint_layers(None, meta["model"], student_name)
    student = create_model(student_name, num_classes=len(data.classes))
    shape = tuple(data.train.images.shape[1:])
    reg = make_regressor(feature_shape(student, layers[1], "student", shape, "cpu"),
                         feature_shape(teacher, layers[0], "teacher", shape, device), layers)
    hinted = fresh(HintedStudent(student, layers[1], reg))
    hook = FeatureHook(teacher, layers[0], "teacher")
    loss_fn = method_entry("fitnets").build(cfg, 0.0)
    opt = torch.optim.SGD(hinted.parameters(), lr=0.01, momentum=0.9)

    def fitnets_step(batch):
        with torch.no_grad(), acc.autocast():
            target, feature = hook.capture(lambda: teacher(batch.images))
        with acc.autocast():
            logits, hint = hinted(batch.images)
        loss = loss_fn(logits, target, batch.labels, 0, (hint, feature))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    steps["method fitnets (online teacher)"] = fitnets_step
    return steps


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="dataset source (default: $KDFAST_DATA or ./data)")
    p.add_argument("--cache-dir", default="cache")
    p.add_argument("--train-per-class", type=int, default=300, help="training subset per class (cache build size)")
    p.add_argument("--test-per-class", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--build-batch-size", type=int, default=500)
    p.add_argument("--steps", type=int, default=8, help="timed steps per mode")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the fastest of each mode counts")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--pairs", nargs="+", default=["cnn", "vit"], choices=["cnn", "vit"])
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = p.parse_args(argv)
    runtime = make_runtime(args.precision)
    machine = describe()
    print(f"machine: {json.dumps(machine)}")
    print(f"config: {json.dumps(vars(args))}; precision used: {runtime.precision} ({runtime.precision_reason})")
    data = load_dataset(args.data, args.cache_dir, False, args.train_per_class, args.test_per_class)
    if len(data.train) < args.batch_size * (args.steps + args.warmup):
        raise SystemExit("the training subset is smaller than the timed steps need: raise --train-per-class")
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for pair in args.pairs:
            teacher_name, student_name = PAIRS[0] if pair == "cnn" else PAIRS[1]
            rows.append(bench_pair(teacher_name, student_name, data, args, runtime, workdir))
    head = (f"{'pair':<26} {'student':>9} {'online KD':>10} {'cached KD':>10} {'teacher inf':>12} {'cache build':>12}"
            f" {'cached/student':>15} {'cached/online':>14} {'limit':>7} {'reached':>8}")
    print("\nimg/s (training steps: student alone, with an online teacher, with cached logits)\n" + head)
    for r in rows:
        print(f"{r['pair']:<26} {r['student_only_img_s']:>9,.0f} {r['online_kd_img_s']:>10,.0f} "
              f"{r['cached_kd_img_s']:>10,.0f} {r['teacher_inference_img_s']:>12,.0f} {r['cache_build_img_s']:>12,.0f} "
              f"{r['cached_over_student']:>15.2f} {r['cached_over_online']:>14.2f} {r['limit_cached_over_online']:>7.2f} "
              f"{r['reached_of_limit']:>8.0%}")
    print("\nimg/s per distillation method (full training steps), and the ratio to the student alone")
    for r in rows:
        for name, m in r["methods"].items():
            print(f"{r['pair']:<26} {name[len('method '):]:<32} {m['img_s']:>10,.0f} {m['over_student']:>7.2f}")
    os.makedirs(args.out, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = os.path.join(args.out, f"kd-throughput-{runtime.device.type}-{stamp}.json")
    with open(path, "w") as f:
        json.dump({"machine": machine, "config": vars(args), "precision": runtime.precision, "rows": rows}, f, indent=2)
    print(f"\nsaved {path}")


if __name__ == "__main__":
    main()
