"""Latency and memory of `regionmed-app`, measured as a user meets them: the installed console script serving an
exported model, driven in headless Chromium (regionmed_clip.apps.app_driver). Per preset (tiny, small) and film
side (256 px, the synthetic films; 2048 px, a radiograph's size), one film uploaded, four boxes drawn with the
mouse, then Analyse pressed `--repeats` times: seconds from the click to the result on the page (box-free scores
and heatmap, the four boxes' scores and nearest captions; medians after one warm-up click), the server's own
share of it (the page's "Analysed in" line), and the app process's resident memory (VmRSS after, VmHWM peak).
Weights are untrained (time and memory do not depend on them); the machine's cores are shared by the app and
the browser, as on a one-machine Space.

    python benchmarks/bench_app.py --output benchmarks/results/bench_app.json
"""

import argparse
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmark_report import cpu_model, proc_status_bytes, write_report  # noqa: E402

from regionmed_clip.apps.app_driver import (  # noqa: E402
    AppPage,
    browser_available,
    chromium,
    free_port,
    start_app,
    stop_app,
)
from regionmed_clip.apps.export import export_model  # noqa: E402
from regionmed_clip.data.synthetic import LESION_TYPES, render_phantom  # noqa: E402
from regionmed_clip.modeling_regionmed_clip import RegionMedCLIPConfig, RegionMedCLIPModel  # noqa: E402
from regionmed_clip.processing import RegionMedCLIPImageProcessor, RegionMedCLIPProcessor, build_tokenizer  # noqa: E402

# Four boxes over the lung zones, as fractions of the film side (xyxy).
BOXES = ((0.22, 0.25, 0.40, 0.43), (0.60, 0.25, 0.78, 0.43), (0.22, 0.55, 0.40, 0.73), (0.60, 0.55, 0.78, 0.73))


def saved_model(preset: str, folder: Path) -> Path:
    """An untrained `preset` model with the processor `regionmed-train` saves, exported as a Hub folder."""
    torch.manual_seed(0)
    config = RegionMedCLIPConfig.from_preset(preset)
    corpus = [f"{size} {kind} in the {side} {zone} zone" for kind in LESION_TYPES for side in ("left", "right")
              for zone in ("upper", "middle", "lower") for size in ("small", "large")]
    tokenizer = build_tokenizer(corpus * 4, vocab_size=config.text_config.vocab_size)
    RegionMedCLIPModel(config).save_pretrained(folder / "model")
    RegionMedCLIPProcessor(RegionMedCLIPImageProcessor(image_size=config.vision_config.image_size,
                                                       roi_size=config.roi_image_size, max_rois=config.max_rois),
                           tokenizer).save_pretrained(folder / "model")
    export_model(folder / "model", folder / "hub")
    return folder / "hub"


def measure(hub: Path, films: dict[int, Path], repeats: int, folder: Path) -> dict[str, Any]:
    port = free_port()
    process = start_app(hub, port, list(LESION_TYPES), folder / "app.log")
    driver = chromium()
    figures: dict[str, Any] = {"idle_rss_mib": round(proc_status_bytes("VmRSS", process.pid) / 2**20, 1)}
    try:
        for side, film in films.items():
            page = AppPage(driver, f"http://127.0.0.1:{port}/")
            page.upload(film, "Loaded")
            time.sleep(1)  # the canvas draws the film after the message
            for box in BOXES:
                page.draw_box([value * side for value in box], side, side)
            clicks, server = [], []
            for _ in range(repeats + 1):
                clicks.append(page.analyse(expect="Box 4"))
                server.append(float(re.search(r"Analysed in ([0-9.]+) s", page.text("summary")).group(1)))
            figures[f"film_{side}"] = {
                "click_to_result_s": round(statistics.median(clicks[1:]), 3), "first_click_s": round(clicks[0], 3),
                "server_analyse_s": round(statistics.median(server[1:]), 3), "clicks_s": [round(t, 3) for t in clicks],
                "boxes_in_table": len(page.table("box-results"))}
        figures["rss_after_mib"] = round(proc_status_bytes("VmRSS", process.pid) / 2**20, 1)
        figures["peak_rss_mib"] = round(proc_status_bytes("VmHWM", process.pid) / 2**20, 1)
    finally:
        driver.quit()
        stop_app(process)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--sides", type=int, nargs="+", default=[256, 2048], help="film sides in pixels")
    parser.add_argument("--repeats", type=int, default=5, help="timed clicks per film (after one warm-up)")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    if not browser_available():
        raise SystemExit("needs Chromium and ChromeDriver: apt-get install chromium chromium-driver")
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        films = {}
        for side in args.sides:
            films[side] = root / f"film_{side}.png"
            render_phantom(0, 0, size=side)[0].save(films[side])
        for preset in args.presets:
            hub = saved_model(preset, root / preset)
            results[preset] = measure(hub, films, args.repeats, root / preset)
            print(preset, results[preset], flush=True)
    write_report({"cpu": cpu_model(), "threads": torch.get_num_threads(), "boxes": len(BOXES),
                  "findings": len(LESION_TYPES), "presets": results}, args.output)


if __name__ == "__main__":
    main()
