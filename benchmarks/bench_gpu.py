"""GPU training benchmark: the `base` preset in bf16 autocast, one full-objective step (4 ROIs, every
caption level) per attention backend (eager, sdpa, flex_attention, flash_attention_2, xformers) at
224 and 448 px.

Per backend and image size: the median step time, the peak GPU memory, MFU (the step's FLOPs,
counted once by torch's FLOP counter, over its time, against the bf16 matrix peak measured in the
same run and against the datasheet's), and at the largest size the largest batch that fits
(doubling until out of memory) with its step time and MFU.
Per backend at 448 px, the attention's own memory: one vision-tower attention call, forward and
backward, peak memory over its inputs.

Per backend, the same for one text-tower attention call on padded captions (the joint stage's
region-negative pass: many short captions of ragged length), where the mask format matters.

`--compile` compiles every encoder layer of both towers (`nn.Module.compile`); `--profile` adds one
profiled step per run: GPU kernel time by kind (matrix products, attention, the rest) against the
step's wall time, which shows where the time that is not matrix products goes.

Targets (issue 12): >= 45% MFU with sdpa or flash_attention_2; xformers and sdpa at <= 1/2 of eager's
attention memory at 448 px. Without a GPU it runs its CPU parts (the FLOP count and one small step
per backend that runs on CPU) and lists what it skipped.

    python benchmarks/bench_gpu.py --output benchmarks/results/bench_gpu.json
"""

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers.masking_utils import create_bidirectional_mask

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmark_report import cpu_model, write_report  # noqa: E402
from training_step import step_flops, timed_steps, training_step  # noqa: E402

from regionmed_clip.modeling_regionmed_clip import (  # noqa: E402
    RegionMedCLIPConfig,
    RegionMedCLIPModel,
    attention_regionmed_clip,  # noqa: E402
)
from regionmed_clip.modeling_regionmed_clip.modeling_regionmed_clip import RegionMedCLIPAttention  # noqa: E402
from regionmed_clip.training_scripts.synthetic_batch import synthetic_batch  # noqa: E402

BACKENDS = ("eager", "sdpa", "flex_attention", "flash_attention_2", "xformers")
DATASHEET_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense, SXM


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype, side: int, repeats: int) -> float:
    """Measured matrix-product rate: `repeats` products of two random `side x side` matrices."""
    a, b = (torch.randn(side, side, device=device, dtype=dtype) for _ in range(2))
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = timed_steps(lambda: a @ b, steps=repeats, warmup=3, synchronize=synchronize)
    return 2 * side**3 / statistics.median(times) / 1e12


def build_model(preset: str, backend: str, image_size: int, device: torch.device, compile_layers: bool = False
                ) -> RegionMedCLIPModel:
    config = RegionMedCLIPConfig.from_preset(preset)
    config.vision_config.image_size = image_size
    torch.manual_seed(0)
    model = RegionMedCLIPModel._from_config(config, attn_implementation=backend).to(device)
    used = {model.vision_model.config._attn_implementation, model.text_model.config._attn_implementation}
    if used != {backend}:
        raise ValueError(f"asked for {backend!r} attention, the towers use {sorted(used)}")
    if compile_layers:  # the layers of a tower share one compiled graph; caption lengths vary: dynamic
        for layer in model.vision_model.encoder.layers:
            layer.compile()
        for layer in model.text_model.encoder.layers:
            layer.compile(dynamic=True)
    return model


# GPU kernels by kind, from their names (cuBLAS / CUTLASS / nvjet matrix products; flash, memory-efficient
# and flex attention kernels); everything else is normalisation, activations, copies, reductions.
_KERNEL_KINDS = (("attention", ("flash", "fmha", "attention", "efficient")),
                 ("matmul", ("gemm", "cutlass", "nvjet", "xmma", "matmul", "sm90_")))


def kernel_time_by_kind(step, device: torch.device) -> dict[str, Any]:
    """GPU time of one call of `step` by kernel kind, in seconds, and the call's wall time."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize(device)
    started = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA]) as profiler:
        step()
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - started
    kinds: dict[str, float] = {"matmul": 0.0, "attention": 0.0, "other": 0.0}
    kernels = []
    for event in profiler.key_averages():
        seconds = event.device_time_total / 1e6
        if seconds <= 0 or event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        name = event.key.lower()
        kind = next((kind for kind, marks in _KERNEL_KINDS if any(mark in name for mark in marks)), "other")
        kinds[kind] += seconds
        kernels.append((seconds, event.count, kind, event.key[:120]))
    busy = sum(kinds.values())
    top = [{"seconds": round(seconds, 5), "calls": count, "kind": kind, "kernel": name}
           for seconds, count, kind, name in sorted(kernels, reverse=True)[:20]]
    return {"profiled_wall_seconds": round(wall, 4), "kernel_seconds": {k: round(v, 4) for k, v in kinds.items()},
            "kernel_launches": sum(count for _, count, _, _ in kernels), "gpu_busy_fraction": round(busy / wall, 3),
            "top_kernels": top}


def why_unavailable(backend: str, device: torch.device) -> str | None:
    """Why `backend` cannot run on `device` here; None when it can. An xformers install without a
    kernel for this torch / CUDA would silently run SDPA (the backend's fallback): it is tried first."""
    if backend == "flash_attention_2" and device.type != "cuda":
        return "flash_attention_2 needs CUDA"
    if backend != "xformers":
        return None
    xops = attention_regionmed_clip.xops
    if device.type != "cuda" or xops is None:
        return "xformers needs CUDA and the xformers package" + ("" if xops is not None else " (not installed)")
    probe = torch.randn(1, 16, 2, 64, device=device, dtype=torch.bfloat16)
    try:
        xops.memory_efficient_attention(probe, probe, probe)
    except NotImplementedError as error:
        return f"the installed xformers has no kernel here: {str(error).splitlines()[0]} ..."
    return None


def run_step(model: RegionMedCLIPModel, batch: int, args: argparse.Namespace, image_size: int,
             device: torch.device) -> dict[str, Any]:
    """Median step time and peak memory of `model` at `batch`."""
    inputs = {key: value.to(device) for key, value in
              synthetic_batch(model.config, batch, args.rois, image_size=image_size).items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times = timed_steps(lambda: training_step(model, optimizer, inputs, torch.bfloat16), steps=args.steps,
                        warmup=args.warmup, synchronize=torch.cuda.synchronize if cuda else (lambda: None))
    result = {"batch": batch, "step_seconds": round(statistics.median(times), 5)}
    if cuda:
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        if args.profile:
            try:
                result |= kernel_time_by_kind(lambda: training_step(model, optimizer, inputs, torch.bfloat16), device)
            except Exception as error:  # a profiler problem must not cost the timings
                result["profile_error"] = f"{type(error).__name__}: {error}"
    return result


def largest_batch(model: RegionMedCLIPModel, start: int, limit: int, args: argparse.Namespace, image_size: int,
                  device: torch.device) -> dict[str, Any]:
    """Double the batch from `start` until a step runs out of memory (or `limit`): the last that fit."""
    fitted, batch = None, start
    quick = argparse.Namespace(**{**vars(args), "steps": 1, "warmup": 1, "profile": False})
    while batch <= limit:
        try:
            fitted = run_step(model, batch, quick, image_size, device)["batch"]
        except torch.OutOfMemoryError:
            break
        finally:
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
        batch *= 2
    return {"largest_batch": fitted, "searched_up_to": min(batch, limit), "limit_reached": batch > limit}


def attention_memory(backend: str, preset: str, image_size: int, batch: int, device: torch.device) -> dict[str, Any]:
    """Peak memory over the inputs of one vision attention call (forward + backward) at `image_size`."""
    config = RegionMedCLIPConfig.from_preset(preset).vision_config
    config._attn_implementation = backend
    attention = RegionMedCLIPAttention(config, config.hidden_size, config.num_attention_heads, 0.0).to(device)
    tokens = (image_size // config.patch_size) ** 2 + 1
    hidden = torch.randn(batch, tokens, config.hidden_size, device=device, requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        output, _ = attention(hidden)
    output.float().sum().backward()
    torch.cuda.synchronize()
    return {"batch": batch, "tokens": tokens,
            "attention_memory_gib": round((torch.cuda.max_memory_allocated(device) - before) / 2**30, 3)}


def text_attention_memory(backend: str, preset: str, captions: int, device: torch.device) -> dict[str, Any]:
    """Peak memory over the inputs of one text attention call (forward + backward) on `captions`
    padded captions of 7-24 tokens (the region negatives' lengths), the mask made for the backend."""
    config = RegionMedCLIPConfig.from_preset(preset).text_config
    config._attn_implementation = backend
    attention = RegionMedCLIPAttention(config, config.hidden_size, config.num_attention_heads, 0.0).to(device)
    lengths = torch.randint(7, 25, (captions,), generator=torch.Generator().manual_seed(0)).to(device)
    padding = (torch.arange(24, device=device) < lengths[:, None]).long()
    hidden = torch.randn(captions, 24, config.hidden_size, device=device, requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        mask = create_bidirectional_mask(config, hidden, padding)
        output, _ = attention(hidden, mask)
    output.float().sum().backward()
    torch.cuda.synchronize()
    return {"captions": captions, "tokens": 24,
            "attention_memory_gib": round((torch.cuda.max_memory_allocated(device) - before) / 2**30, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="base")
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--image-sizes", nargs="+", type=int, default=[224, 448])
    parser.add_argument("--batch", type=int, default=32, help="images per step (GPU)")
    parser.add_argument("--cpu-batch", type=int, default=2, help="images per step on CPU")
    parser.add_argument("--rois", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--max-batch", type=int, default=1024, help="largest batch tried by the search")
    parser.add_argument("--attention-batch", type=int, default=64)
    parser.add_argument("--text-attention-captions", type=int, default=16384,
                        help="padded captions in the text attention memory measure")
    parser.add_argument("--compile", action="store_true", help="compile every encoder layer")
    parser.add_argument("--profile", action="store_true", help="GPU kernel time by kind, one step per run")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    name = torch.cuda.get_device_name(device) if cuda else cpu_model()
    datasheet = next((tflops for key, tflops in DATASHEET_BF16_TFLOPS.items() if key in name), None) if cuda else None
    skipped: list[str] = []
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        peak = matmul_peak_tflops(device, torch.bfloat16, side=8192, repeats=10)
    else:
        args.steps, args.warmup, args.batch = 1, 1, args.cpu_batch
        args.image_sizes = args.image_sizes[:1]
        peak = matmul_peak_tflops(device, torch.float32, side=1024, repeats=5)
        skipped.append(f"no GPU: one step of {args.cpu_batch} images per backend at {args.image_sizes[0]} px, "
                       "no memory figures, no batch search, no attention memory")

    runs: dict[str, dict[str, Any]] = {}
    for image_size in args.image_sizes:
        flops = None
        for backend in args.backends:
            key = f"{backend}@{image_size}"
            if reason := why_unavailable(backend, device):
                runs[key] = {"skipped": reason}
                skipped.append(f"{key}: {reason}")
                continue
            started = time.perf_counter()
            try:
                model = build_model(args.preset, backend, image_size, device, args.compile)
            except (ValueError, ImportError) as error:  # transformers refuses a backend the model or install lacks
                runs[key] = {"skipped": f"{type(error).__name__}: {error}"}
                skipped.append(f"{key}: {type(error).__name__}: {str(error)[:200]}")
                continue
            if flops is None:  # the same arithmetic for every backend; counted once per image size
                counted = {k: v.to(device) for k, v in
                           synthetic_batch(model.config, args.batch, args.rois, image_size=image_size).items()}
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    flops = step_flops(model, counted)
                del counted
            result = run_step(model, args.batch, args, image_size, device)
            achieved = flops / result["step_seconds"] / 1e12
            result |= {"step_gflop": round(flops / 1e9, 1), "achieved_tflops": float(f"{achieved:.3g}"),
                       "mfu_of_measured_peak": round(achieved / peak, 3)}
            if datasheet:
                result["mfu_of_datasheet_peak"] = round(achieved / datasheet, 3)
            if cuda and image_size == max(args.image_sizes):
                result |= largest_batch(model, args.batch, args.max_batch, args, image_size, device)
                if result["largest_batch"] and result["largest_batch"] > args.batch:
                    largest = run_step(model, result["largest_batch"], args, image_size, device)
                    scale = result["largest_batch"] / args.batch  # FLOPs grow with the batch
                    result["largest_batch_step_seconds"] = largest["step_seconds"]
                    result["largest_batch_mfu_of_measured_peak"] = round(
                        flops * scale / largest["step_seconds"] / 1e12 / peak, 3)
            result["wall_seconds"] = round(time.perf_counter() - started, 1)
            runs[key] = result
            print(key, result, flush=True)
            if args.output:  # a run cut short by a time limit still leaves what it measured
                write_report({"partial": True, "runs": runs, "skipped": skipped}, args.output)
            del model
            if cuda:
                torch.cuda.empty_cache()

    attention: dict[str, Any] = {}
    text_attention: dict[str, Any] = {}
    if cuda:
        size = max(args.image_sizes)
        for backend in args.backends:
            if why_unavailable(backend, device) or "skipped" in runs.get(f"{backend}@{size}", {}):
                continue
            attention[backend] = attention_memory(backend, args.preset, size, args.attention_batch, device)
            try:
                text_attention[backend] = text_attention_memory(backend, args.preset, args.text_attention_captions,
                                                                device)
            except Exception as error:  # reported, and the rest of the figures are kept
                text_attention[backend] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
        for measured in (attention, text_attention):
            if "attention_memory_gib" in measured.get("eager", {}):
                eager_memory = measured["eager"]["attention_memory_gib"]
                for figures in measured.values():
                    if "attention_memory_gib" in figures:
                        figures["ratio_to_eager"] = round(figures["attention_memory_gib"] / eager_memory, 3)

    figures = {
        "device": name,
        "torch": torch.__version__,
        "preset": args.preset,
        "autocast": "bfloat16",
        "rois": args.rois,
        "caption_levels": "all (report, summary, region, negatives, region negatives)",
        "measured_matmul_peak_tflops": float(f"{peak:.3g}"),
        "datasheet_bf16_tflops": datasheet,
        "runs": runs,
        "compiled_layers": args.compile,
        "attention_memory_at_largest_size": attention,
        "text_attention_memory_padded": text_attention,
        "skipped": skipped,
    }
    print(figures)
    write_report(figures, args.output)


if __name__ == "__main__":
    main()
