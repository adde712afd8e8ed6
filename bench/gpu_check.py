"""A prepared GPU check (run it when a CUDA device is lent): bf16 correctness first, then speed.

    python -m bench.gpu_check [--seconds 20] [--batch 64] [--compile]

1. Correctness in bf16: the generator's output under bf16 autocast (channels_last) against fp32,
   and a few CUT training steps in bf16 against fp32 from the same weights and patch ids.
2. Inference throughput at 256x256 (resnet_9blocks): fp32, bf16, bf16 + channels_last, and with
   torch.compile when asked; images/s each. The jobs.infer goal on an H200 is 3000 images/s.
3. Training step time, CUT and FastCUT at crop 256, batch 1: the official key path (re-encoding)
   against ours, bf16 + channels_last, with the ratio.
Prints one JSON line per measurement as well as a table, so the output can be kept as a record.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from cut import CUTConfig, CUTModel, ResnetGenerator
from cut.networks import init_weights


def _timed(fn, seconds: float) -> float:
    """Calls per second of ``fn`` over about ``seconds`` after a warm-up, synchronising the device."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        calls += 1
    torch.cuda.synchronize()
    return calls / (time.perf_counter() - start)


def record(**fields) -> None:
    print(json.dumps(fields), flush=True)


def check_correctness() -> None:
    torch.manual_seed(0)
    g = init_weights(ResnetGenerator(), gain=0.5).cuda().eval()
    x = torch.rand(8, 3, 256, 256, device="cuda") * 2 - 1
    with torch.inference_mode():
        ref = g(x)
        g_cl = g.to(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = g_cl(x.contiguous(memory_format=torch.channels_last)).float()
    diff = (low - ref).abs()
    record(check="generator bf16 vs fp32", max_abs=diff.max().item(), mean_abs=diff.mean().item())
    a, b = torch.rand(1, 3, 256, 256) * 2 - 1, torch.rand(1, 3, 256, 256) * 2 - 1
    runs = {}
    for name, extra in (("fp32", {}), ("bf16", {"bf16": True, "channels_last": True})):
        model = CUTModel(CUTConfig.from_preset("CUT", **extra), device="cuda", seed=0)
        runs[name] = [model.train_step(a, b) for _ in range(3)]
    for step, (f, h) in enumerate(zip(runs["fp32"], runs["bf16"], strict=True)):
        record(check="CUT step bf16 vs fp32", step=step, **{k: [round(f[k], 4), round(h[k], 4)] for k in f})


def inference_speed(seconds: float, batch: int, compile_too: bool) -> None:
    torch.manual_seed(0)
    x = torch.rand(batch, 3, 256, 256, device="cuda") * 2 - 1
    variants = [("fp32", False, False, False), ("bf16", True, False, False), ("bf16+cl", True, True, False)]
    if compile_too:
        variants.append(("bf16+cl+compile", True, True, True))
    for name, bf16, cl, comp in variants:
        g = ResnetGenerator().cuda().eval()
        xi = x
        if cl:
            g, xi = g.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
        fn = torch.compile(g, mode="max-autotune-no-cudagraphs") if comp else g

        def run(fn=fn, xi=xi, bf16=bf16):
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
                fn(xi)

        record(
            bench="inference 256x256",
            variant=name,
            batch=batch,
            images_per_s=round(_timed(run, seconds) * batch, 1),
        )


def training_speed(seconds: float) -> None:
    a, b = torch.rand(1, 3, 256, 256) * 2 - 1, torch.rand(1, 3, 256, 256) * 2 - 1
    for preset in ("CUT", "FastCUT"):
        rates = {}
        for name, reuse in (("official keys", False), ("ours", True)):
            model = CUTModel(
                CUTConfig.from_preset(preset, reuse_keys=reuse, bf16=True, channels_last=True), device="cuda"
            )
            a_, b_ = a.cuda(), b.cuda()
            rates[name] = _timed(lambda m=model, a_=a_, b_=b_: m.train_step(a_, b_, sync=False), seconds)
            torch.cuda.reset_peak_memory_stats()
            model.train_step(a_, b_)
            record(
                bench="train step 256",
                preset=preset,
                variant=name,
                s_per_step=round(1 / rates[name], 4),
                peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
            )
        record(
            bench="train step 256", preset=preset, speedup=round(rates["ours"] / rates["official keys"], 3)
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--compile", action="store_true")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this check is for a lent GPU")
    torch.backends.cudnn.benchmark = True
    record(device=torch.cuda.get_device_name(), torch=torch.__version__)
    check_correctness()
    inference_speed(args.seconds, args.batch, args.compile)
    training_speed(args.seconds)


if __name__ == "__main__":
    main()
