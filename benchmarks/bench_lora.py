"""PEFT LoRA against full fine-tuning: trainable share, peak extra memory and step time.

For each model size (`tiny`, and `mid`: hidden 256, 4 layers per tower, 224 px view, 112 px crops)
and each variant (full fine-tuning; LoRA r=8 on both towers' attention projections with the
projections saved, as `regionmed-finetune` defaults; the same with gradient checkpointing,
reentrant and not), a fresh interpreter builds the model, runs one warm-up step, resets the
process's peak-RSS mark, then runs `--steps` AdamW steps on a fixed random batch (B images with 4
ROIs each, B report captions; the training objective's terms that these inputs allow) and reports the trainable parameters; `state_mib`, the RSS after the
warm-up above the interpreter's before the model was built (weights, gradients, optimizer state);
`peak_extra_mib`, the peak RSS of the measured steps above that (activations); `peak_total_mib`,
their sum; and the median step time. Memory is /proc VmRSS / VmHWM (Linux).

    OMP_NUM_THREADS=2 python benchmarks/bench_lora.py --output benchmarks/results/bench_lora.json
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmark_report import cpu_model, proc_status_bytes, release_free_heap, reset_peak_rss, write_report  # noqa: E402

from regionmed_clip.modeling_regionmed_clip import RegionMedCLIPConfig, RegionMedCLIPModel  # noqa: E402
from regionmed_clip.training_scripts.finetune_lora import lora_config  # noqa: E402
from regionmed_clip.training_scripts.losses import training_loss  # noqa: E402

SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"preset": "tiny", "overrides": {}, "batch": 16},
    "mid": {"preset": "tiny", "batch": 16, "overrides": {
        "projection_dim": 256, "roi_image_size": 112, "roi_fusion_heads": 4,
        "vision_config": {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4,
                          "num_attention_heads": 4, "image_size": 224, "patch_size": 16},
        "text_config": {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4,
                        "num_attention_heads": 4}}},
}
VARIANTS = ("full", "lora", "lora+checkpointing(reentrant)", "lora+checkpointing(non-reentrant)")
ROIS = 4


def _batch(config: RegionMedCLIPConfig, batch: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    view, crop = config.vision_config.image_size, config.roi_image_size
    ids = torch.randint(5, config.text_config.vocab_size, (batch, 32), generator=generator)
    ids[:, 0] = config.text_config.cls_token_id
    corners = torch.rand(batch, ROIS, 2, generator=generator) * 0.6
    return {"pixel_values": torch.randn(batch, 3, view, view, generator=generator), "input_ids": ids,
            "attention_mask": torch.ones_like(ids), "roi_pixel_values": torch.randn(batch, ROIS, 3, crop, crop, generator=generator),
            "roi_boxes": torch.cat([corners, corners + 0.3], dim=-1), "roi_mask": torch.ones(batch, ROIS, dtype=torch.bool)}


def worker(size: str, variant: str, steps: int) -> dict[str, Any]:
    from peft import get_peft_model

    spec = SIZES[size]
    baseline = proc_status_bytes("VmRSS")  # the interpreter and libraries, before any model
    config = RegionMedCLIPConfig.from_preset(spec["preset"], **spec["overrides"])
    torch.manual_seed(0)
    model = RegionMedCLIPModel(config).train()
    if "checkpointing" in variant:
        reentrant = "(reentrant)" in variant
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        if reentrant:
            model.enable_input_require_grads()
    if variant != "full":
        model = get_peft_model(model, lora_config(["vision", "text"]))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    batch = _batch(config, spec["batch"])

    def step() -> float:
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        outputs = model(**batch)
        training_loss(outputs, batch, outputs.logit_scale, config.text_config.pad_token_id)[0].backward()
        optimizer.step()
        return time.perf_counter() - start

    step()  # warm-up: optimizer state allocated, kernels chosen
    release_free_heap()
    hwm_reset = reset_peak_rss()
    rss_before = proc_status_bytes("VmRSS")  # weights, gradients, optimizer state, the batch
    times = [step() for _ in range(steps)]
    peak = proc_status_bytes("VmHWM")
    total = sum(p.numel() for p in model.parameters())
    return {"size": size, "variant": variant, "trainable_parameters": sum(p.numel() for p in trainable),
            "all_parameters": total, "trainable_share": sum(p.numel() for p in trainable) / total,
            "state_mib": round((rss_before - baseline) / 2**20, 1),
            "peak_extra_mib": round((peak - rss_before) / 2**20, 1),
            "peak_total_mib": round((peak - baseline) / 2**20, 1), "median_step_s": round(statistics.median(times), 3),
            "batch": spec["batch"], "hwm_reset": hwm_reset}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # "size:variant" in a fresh process
    args = parser.parse_args(argv)
    if args.worker:
        size, variant = args.worker.split(":", 1)
        print(json.dumps(worker(size, variant, args.steps)))
        return 0
    results = []
    for size in args.sizes:
        for variant in VARIANTS:
            # A fresh interpreter per measurement: VmHWM is the whole process's high-water mark.
            out = subprocess.run([sys.executable, __file__, "--worker", f"{size}:{variant}", "--steps", str(args.steps)],
                                 capture_output=True, text=True, check=True)
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(results[-1], flush=True)
    for size in args.sizes:
        full = next(r for r in results if r["size"] == size and r["variant"] == "full")
        for result in results:
            if result["size"] == size:
                result["peak_total_vs_full"] = round(result["peak_total_mib"] / full["peak_total_mib"], 3)
                result["time_vs_full"] = round(result["median_step_s"] / full["median_step_s"], 3)
    write_report({"cpu": {"model": cpu_model(), "threads": torch.get_num_threads()},
                  "versions": {"torch": torch.__version__}, "steps": args.steps, "rois_per_image": ROIS,
                  "results": results}, args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
