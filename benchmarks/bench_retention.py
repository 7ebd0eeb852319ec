"""The retention benchmark (issue 24): does the region recipe keep what a pretrained foundation knows?

The synthetic data stands in for a real foundation's world. Per seed:

1. **foundation**: a tiny transformers `CLIPModel` (sized like the tiny preset: 128 px, patch 8, 2 x 64 towers,
   projection 64), with a CLIP byte-level BPE tokenizer trained here with `tokenizers` on the train split's
   captions (saved as vocab.json + merges.txt), trained with a plain symmetric InfoNCE loop
   (`CLIPModel(return_loss=True)`) on (global view, report) pairs, saved as a CLIPModel folder with a
   `CLIPImageProcessor`, then converted with `regionmed-convert --from clip`. 2400 steps by default: at 600
   (seed 0) the foundation had learnt nothing (loss 3.47 -> 3.12, zero-shot AUROC 0.506, retrieval R@1 0%).
   The converter sizes the region modules for a ViT-B (ROI crops of half the view, 8 ROIs, a 3 x 3 context grid, 2 fusion layers); the start
   folder resizes them (fresh, gates closed, nothing the source knows touched) to the tiny preset's (32 px crops,
   4 ROIs, 2 x 2 grid, 1 fusion layer), so that both region arms run the same region machinery;
2. **pretrained**: `regionmed-train --config RUN/run.yaml` (training_scripts/configs/pretrained_start.yaml with
   `model: {pretrained: the start folder}`) for `--max-steps` steps;
3. **random**: the default recipe from random towers (`regionmed-train --preset tiny`), same data, steps, seed.

Then the probe (`run_probe`, test split): the foundation's own zero-shot and retrieval (its CLIPModel forward,
CLIP's processor and tokenizer, the probe's prompts and metrics), the converted folders at step 0 (equal to the
foundation: pooled / global-view zero-shot and retrieval), and both region arms after training (box-free
zero-shot, retrieval R@1, region side / zone / type); and (the foundation's own task) zero-shot and image<->report
retrieval on the first 200 training films, which is what this foundation knows (on the test split it stays near
chance), before and after each arm. Trainings run `--jobs` at a time, one thread each; a
finished step is reused (its marker exists), so the command can be re-run to add seeds.

    regionmed-data synth --n 2000 --seed 0 --output data/synth
    python benchmarks/bench_retention.py --data data/synth --runs runs/retention --seeds 0 \\
        --foundation-steps 2400 --max-steps 600 --output benchmarks/results/bench_retention.json

(`--seeds 0 1 2` for the issue's three; about 25 minutes a seed on 2 shared cores. `--seeds 1 2 --merge
benchmarks/results/bench_retention.json` adds seeds to an earlier report, checked to be of the same steps and recipe.)
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmark_report import seed_parser, seed_summary, train_minutes, write_report  # noqa: E402

from regionmed_clip.evaluation.probe import run_probe  # noqa: E402
from regionmed_clip.evaluation.results import to_json  # noqa: E402

RECIPE = Path(__file__).resolve().parents[1] / "training_scripts" / "configs" / "pretrained_start.yaml"
IMAGE, PATCH, WIDTH, LAYERS, HEADS, MLP, EMBED, POSITIONS = 128, 8, 64, 2, 4, 128, 64, 77  # the tiny preset's sizes
# The region modules of the tiny preset (the converter's are a ViT-B's); all start fresh with closed gates.
TINY_REGION = {"max_rois": 4, "roi_image_size": 32, "roi_context_grid": 2, "roi_fusion_layers": 1}
TRAIN_ROWS = 200  # training films probed for (d), the foundation's own task


# -- the foundation: a tiny CLIPModel trained with plain InfoNCE on (global view, report) ----------------------


def _captions(rows) -> list[str]:
    corpus = []
    for row in rows:
        corpus += [row["report_caption"], row["summary_caption"], *(row["negative_captions"] or []),
                   *(region.get("caption") for region in row["regions"] or [] if isinstance(region, dict))]
    return [text for text in corpus if isinstance(text, str)]


def train_clip_tokenizer(corpus: list[str], folder: Path, vocab_size: int = 2048) -> None:
    """CLIP's byte-level BPE layout (every byte alone and word-final `</w>`, the learnt merges, then
    <|startoftext|> and <|endoftext|>), its merges learnt with `tokenizers` on `corpus`."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.normalizer = normalizers.Lowercase()
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=symbols,
                                                        end_of_word_suffix="</w>", show_progress=False))
    learnt = folder / "bpe"
    learnt.mkdir(parents=True, exist_ok=True)
    bpe.model.save(str(learnt))
    merges = [tuple(line.split()) for line in (learnt / "merges.txt").read_text().splitlines()[1:] if line.strip()]
    vocab = dict.fromkeys(symbols + [symbol + "</w>" for symbol in symbols])
    for left, right in merges:
        vocab.setdefault(left + right)
    tokens = [*vocab, "<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({token: index for index, token in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    shutil.rmtree(learnt)


def _clip_pixels(image_processor, values) -> "Any":
    from regionmed_clip.evaluation.rows import decode_image

    images = [decode_image(value).convert("RGB") for value in values]
    return image_processor(images=images, return_tensors="pt")["pixel_values"]


def train_foundation(data: Path, folder: Path, seed: int, steps: int, batch_size: int = 32, lr: float = 1e-3) -> None:
    """Train the foundation CLIPModel and save it (with tokenizer and CLIPImageProcessor) into `folder`."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer, get_cosine_schedule_with_warmup

    from regionmed_clip.data.schema import load_canonical

    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = load_canonical(data, "train", decode_images=False)
    meta = list(rows.remove_columns("image"))
    train_clip_tokenizer(_captions(meta), folder)
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE})
    config = CLIPConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": WIDTH, "num_hidden_layers": LAYERS,
                     "num_attention_heads": HEADS, "intermediate_size": MLP, "max_position_embeddings": POSITIONS,
                     "eos_token_id": tokenizer.eos_token_id, "bos_token_id": tokenizer.bos_token_id,
                     "pad_token_id": tokenizer.pad_token_id},
        vision_config={"image_size": IMAGE, "patch_size": PATCH, "hidden_size": WIDTH, "num_hidden_layers": LAYERS,
                       "num_attention_heads": HEADS, "intermediate_size": MLP},
        projection_dim=EMBED)
    model = CLIPModel(config)
    pixels = torch.cat([_clip_pixels(image_processor, rows[start:start + 256]["image"])
                        for start in range(0, len(rows), 256)])
    text = tokenizer([row["report_caption"] for row in meta], padding=True, truncation=True, max_length=POSITIONS,
                     return_tensors="pt")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    schedule = get_cosine_schedule_with_warmup(optimizer, max(1, steps // 20), steps)
    generator = torch.Generator().manual_seed(seed)
    order, log, started = torch.randperm(len(meta), generator=generator), [], time.time()
    model.train()
    for step in range(steps):
        start = (step * batch_size) % len(meta)
        if start + batch_size > len(meta):
            order, start = torch.randperm(len(meta), generator=generator), 0
        index = order[start:start + batch_size]
        loss = model(input_ids=text["input_ids"][index], attention_mask=text["attention_mask"][index],
                     pixel_values=pixels[index], return_loss=True).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == steps - 1:
            log.append({"step": step, "loss": round(loss.item(), 4), "seconds": round(time.time() - started, 1)})
            print(json.dumps(log[-1]), flush=True)
    model.eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    image_processor.save_pretrained(folder)
    (folder / "train_log.json").write_text(json.dumps({"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
                                                      "log": log, "seconds": round(time.time() - started, 1)}))


def start_folder(converted: Path, output: Path) -> None:
    """The converted folder with its (fresh, closed) region modules sized like the tiny preset's."""
    from regionmed_clip.modeling_regionmed_clip import RegionMedCLIPModel
    from regionmed_clip.processing import RegionMedCLIPImageProcessor, RegionMedCLIPProcessor, load_tokenizer

    source = RegionMedCLIPModel.from_pretrained(converted)
    config = source.config
    for key, value in TINY_REGION.items():
        setattr(config, key, value)
    model = RegionMedCLIPModel(config)
    kept = {key: value for key, value in source.state_dict().items() if not key.startswith("roi_processor.")}
    missing, unexpected = model.load_state_dict(kept, strict=False)
    if unexpected or any(not key.startswith("roi_processor.") for key in missing):
        raise RuntimeError(f"start folder: unexpected {unexpected}, missing {missing}")
    image_processor = RegionMedCLIPImageProcessor.from_pretrained(converted)
    image_processor.max_rois, image_processor.roi_size = TINY_REGION["max_rois"], TINY_REGION["roi_image_size"]
    processor = RegionMedCLIPProcessor(image_processor=image_processor, tokenizer=load_tokenizer(converted))
    model.save_pretrained(output)
    processor.save_pretrained(output)


def foundation_job(data: Path, seed_dir: Path, seed: int, steps: int) -> None:
    """Foundation -> `regionmed-convert --from clip` -> start folder -> the pretrained arm's run.yaml."""
    import yaml

    train_foundation(data, seed_dir / "foundation", seed, steps)
    convert = Path(sys.executable).parent / "regionmed-convert"
    command = [str(convert)] if convert.is_file() else [sys.executable, "-m", "regionmed_clip.training_scripts.convert"]
    subprocess.run([*command, "--from", "clip", str(seed_dir / "foundation"), str(seed_dir / "converted")], check=True)
    start_folder(seed_dir / "converted", seed_dir / "start")
    run = yaml.safe_load(RECIPE.read_text())
    run["model"] = {"pretrained": str((seed_dir / "start").resolve())}
    (seed_dir / "run.yaml").write_text(yaml.safe_dump(run, sort_keys=False))


# -- the foundation's own figures, through its own CLIPModel forward ------------------------------------------


def foundation_probe(data: Path, folder: Path, split: str = "test", limit: int | None = None) -> dict[str, Any]:
    """The foundation's zero-shot (macro AUROC) and image<->report retrieval on `split` (its first `limit` rows),
    scored exactly as `run_probe` scores a RegionMed-CLIP model (same rows, prompts, ensembles and metrics)."""
    import torch
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    from regionmed_clip.data.schema import load_canonical
    from regionmed_clip.evaluation.probe import _retrieval, class_names, zero_shot_auroc, zero_shot_scores
    from regionmed_clip.evaluation.zero_shot import DEFAULT_PROMPTS, load_prompt_templates, prompts_for

    model = CLIPModel.from_pretrained(folder).eval()
    tokenizer, image_processor = CLIPTokenizer.from_pretrained(folder), CLIPImageProcessor.from_pretrained(folder)
    rows = load_canonical(data, split, decode_images=False)
    if limit is not None:
        rows = rows.select(range(min(limit, len(rows))))
    meta = list(rows.remove_columns("image"))

    def features(output) -> torch.Tensor:
        return (output if isinstance(output, torch.Tensor) else output.pooler_output).float()

    def encode(texts: list[str]) -> torch.Tensor:
        batch = tokenizer(texts, padding=True, truncation=True, max_length=POSITIONS, return_tensors="pt")
        return features(model.get_text_features(**batch))

    with torch.no_grad():
        images = torch.cat([features(model.get_image_features(pixel_values=_clip_pixels(image_processor,
                                                                                        rows[start:start + 64]["image"])))
                            for start in range(0, len(rows), 64)])
        reports = torch.cat([encode([row["report_caption"] for row in meta[start:start + 64]])
                             for start in range(0, len(meta), 64)])
        classes = class_names([row["labels"] or [] for row in meta])
        prompts = prompts_for(load_prompt_templates(DEFAULT_PROMPTS), classes)
        positive = {name: encode(prompts["positive"][name]) for name in classes}
        negative = {name: encode(prompts["negative"][name]) for name in classes}
    labels = {name: torch.tensor([name in (row["labels"] or []) for row in meta]) for name in classes}
    # the model's outputs are normalised, as RegionMedCLIPModel's `image_embeds` / `text_embeds` (retrieval ranks dot products)
    images, reports = torch.nn.functional.normalize(images, dim=-1), torch.nn.functional.normalize(reports, dim=-1)
    return {"zero_shot": zero_shot_auroc(zero_shot_scores(images, positive, negative), labels),
            "retrieval": _retrieval(images, reports, [row["report_caption"] for row in meta])}


# -- scheduling: trainings `jobs` at a time, one thread each ---------------------------------------------------


def _jobs(runs: Path, data: Path, seeds: list[int], foundation_steps: int, max_steps: int) -> list[dict[str, Any]]:
    script = Path(__file__).resolve()
    jobs = []
    for seed in seeds:
        seed_dir = runs / f"s{seed}"
        train = ["--data", str(data), "--max-steps", str(max_steps), "--seed", str(seed), "--save-steps", str(max_steps)]
        jobs += [
            {"name": f"foundation_s{seed}", "done": seed_dir / "run.yaml", "after": None, "log": seed_dir / "foundation.log",
             "command": [sys.executable, str(script), "--foundation-job", "--data", str(data), "--runs", str(runs),
                         "--seeds", str(seed), "--foundation-steps", str(foundation_steps)]},
            {"name": f"random_s{seed}", "done": seed_dir / "random" / "final", "after": None,
             "log": seed_dir / "random.log",
             "command": [sys.executable, "-m", "regionmed_clip.training_scripts.train", "--preset", "tiny", *train,
                         "--output-dir", str(seed_dir / "random")]},
            {"name": f"pretrained_s{seed}", "done": seed_dir / "pretrained" / "final", "after": f"foundation_s{seed}",
             "log": seed_dir / "pretrained.log",
             "command": [sys.executable, "-m", "regionmed_clip.training_scripts.train", "--config",
                         str(seed_dir / "run.yaml"), *train, "--output-dir", str(seed_dir / "pretrained")]},
        ]
    return jobs


def _figures(seed_dir: Path, data: Path) -> dict[str, Any]:
    """Every figure of one seed (probe reports cached beside the runs)."""

    def probe(name: str, model_dir: Path, **options) -> dict[str, Any]:
        path = seed_dir / f"probe_{name}.json"
        if not path.is_file():
            path.write_text(to_json(run_probe(model_dir, data, **{"split": "test", **options})))
        return json.loads(path.read_text())

    path = seed_dir / "probe_foundation.json"
    if not path.is_file():
        path.write_text(to_json(foundation_probe(data, seed_dir / "foundation")))
    foundation = json.loads(path.read_text())
    # (d) what the foundation knows is its training pairs (on the test split it stays near chance at these sizes):
    # image<->report retrieval and zero-shot on the first TRAIN_ROWS training films, before and after each arm
    path = seed_dir / "probe_foundation_train.json"
    if not path.is_file():
        path.write_text(to_json(foundation_probe(data, seed_dir / "foundation", "train", TRAIN_ROWS)))
    on_train = {"foundation": json.loads(path.read_text())}
    for name, model_dir in (("start_step0", seed_dir / "start"), ("pretrained", seed_dir / "pretrained" / "final"),
                            ("random", seed_dir / "random" / "final")):
        on_train[name] = probe(f"{name}_train", model_dir, split="train", limit=TRAIN_ROWS,
                               parts=("zero_shot", "retrieval"))["box_free"]
    converted = probe("converted_step0", seed_dir / "converted", parts=("zero_shot", "retrieval"))
    reports = {"start_step0": probe("start_step0", seed_dir / "start"),
               "pretrained": probe("pretrained", seed_dir / "pretrained" / "final"),
               "random": probe("random", seed_dir / "random" / "final")}

    def arm(report: dict[str, Any]) -> dict[str, float]:
        box_free, true = report["box_free"], report["regions"]["conditions"]["true"]
        return {
            "box_free_macro_auroc": box_free["zero_shot"]["macro_auroc"],  # best-matching proposal (the default)
            "pooled_macro_auroc": box_free["zero_shot_pooled"]["macro_auroc"],
            "global_view_macro_auroc": box_free["zero_shot_global_view"]["macro_auroc"],
            "text_to_image_R@1": box_free["retrieval"]["text_to_image_R@1"],
            "image_to_text_R@1": box_free["retrieval"]["image_to_text_R@1"],
            "global_view_text_to_image_R@1": box_free["retrieval_global_view"]["text_to_image_R@1"],
            "global_view_image_to_text_R@1": box_free["retrieval_global_view"]["image_to_text_R@1"],
            "region_side": true["side"]["accuracy"], "region_zone": true["zone"]["accuracy"],
            "region_type": true["type"]["accuracy"],
        }

    own = {"macro_auroc": foundation["zero_shot"]["macro_auroc"],
           "text_to_image_R@1": foundation["retrieval"]["text_to_image_R@1"],
           "image_to_text_R@1": foundation["retrieval"]["image_to_text_R@1"],
           "chance_R@1": foundation["retrieval"]["chance_R@1"]}
    step0 = {}
    for name, report in (("converted", converted), ("start", reports["start_step0"])):
        box_free = report["box_free"]
        step0[name] = {"pooled_macro_auroc": box_free["zero_shot_pooled"]["macro_auroc"],
                       "global_view_macro_auroc": box_free["zero_shot_global_view"]["macro_auroc"],
                       "best_proposal_macro_auroc": box_free["zero_shot"]["macro_auroc"],
                       "text_to_image_R@1": box_free["retrieval"]["text_to_image_R@1"],
                       "image_to_text_R@1": box_free["retrieval"]["image_to_text_R@1"]}
        step0[name]["pooled_minus_foundation_macro_auroc"] = step0[name]["pooled_macro_auroc"] - own["macro_auroc"]
        step0[name]["max_abs_per_class_auroc_difference"] = max(
            abs(box_free["zero_shot_pooled"]["per_class"][c]["auroc"] - foundation["zero_shot"]["per_class"][c]["auroc"])
            for c in foundation["zero_shot"]["per_class"])
        step0[name]["text_to_image_R@1_minus_foundation"] = step0[name]["text_to_image_R@1"] - own["text_to_image_R@1"]
    retention = {name: {"pooled_macro_auroc": (block["zero_shot"] if name == "foundation" else block["zero_shot_pooled"])
                        ["macro_auroc"],
                        "text_to_image_R@1": block["retrieval"]["text_to_image_R@1"],
                        "image_to_text_R@1": block["retrieval"]["image_to_text_R@1"],
                        "text_to_image_R@10": block["retrieval"]["text_to_image_R@10"],
                        "chance_R@1": block["retrieval"]["chance_R@1"]}
                 for name, block in on_train.items()}
    foundation_log = json.loads((seed_dir / "foundation" / "train_log.json").read_text())
    return {"foundation": {**own, "train_minutes": round(foundation_log["seconds"] / 60, 2),
                           "final_loss": foundation_log["log"][-1]["loss"]},
            "step0": step0,
            "step0_regions": arm(reports["start_step0"]),
            f"train_split_first_{TRAIN_ROWS}": retention,
            "pretrained": {**arm(reports["pretrained"]), "train_minutes": train_minutes(seed_dir / "pretrained")},
            "random": {**arm(reports["random"]), "train_minutes": train_minutes(seed_dir / "random")}}


def _run_settings(args: argparse.Namespace) -> dict[str, Any]:
    """What makes two reports' figures comparable: steps, recipe and region modules (written in every report)."""
    return {"foundation_steps": args.foundation_steps, "max_steps": args.max_steps,
            "recipe": str(RECIPE.relative_to(RECIPE.parents[2])), "tiny_region_modules": TINY_REGION}


def _merged_seeds(path: Path, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The per-seed figures of an earlier report for the seeds this run does not run; an error naming the field when
    that report was made with other steps, recipe or region modules (its figures would not be comparable)."""
    earlier = json.loads(path.read_text())
    for field, value in _run_settings(args).items():
        if earlier.get(field) != value:
            raise SystemExit(f"--merge {path}: its {field} is {earlier.get(field)!r}, this run's is {value!r}")
    return {seed: figures for seed, figures in earlier["per_seed"].items() if int(seed) not in args.seeds}


def main(argv: list[str] | None = None) -> int:
    parser = seed_parser(__doc__, "folder for the foundations, runs and probe reports", 600, "steps of each region arm")
    parser.add_argument("--foundation-steps", type=int, default=2400)
    parser.add_argument("--merge", type=Path, default=None,
                        help="an earlier report of this benchmark (same data, steps and recipe): its seeds that this run "
                             "does not run are kept in the report, so seeds can be added on another day or machine")
    parser.add_argument("--foundation-job", action="store_true", help=argparse.SUPPRESS)  # one foundation (internal)
    args = parser.parse_args(argv)
    if args.foundation_job:
        foundation_job(args.data, args.runs / f"s{args.seeds[0]}", args.seeds[0], args.foundation_steps)
        return 0
    import torch

    torch.set_num_threads(1)  # the probes share the cores with the trainings
    args.runs.mkdir(parents=True, exist_ok=True)
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    pending = [job for job in _jobs(args.runs, args.data, args.seeds, args.foundation_steps, args.max_steps)
               if not job["done"].exists()]
    done = {f"{kind}_s{seed}" for seed in args.seeds for kind in ("foundation", "random", "pretrained")} - {
        job["name"] for job in pending}
    running: dict[str, tuple[subprocess.Popen, Any, float]] = {}
    per_seed: dict[str, dict[str, Any]] = {}
    kept = _merged_seeds(args.merge, args) if args.merge else {}
    started = time.time()

    def report_seeds() -> None:
        for seed in args.seeds:
            if str(seed) not in per_seed and all(f"{kind}_s{seed}" in done for kind in ("foundation", "random", "pretrained")):
                try:
                    per_seed[str(seed)] = _figures(args.runs / f"s{seed}", args.data)
                except Exception as error:  # a probe that fails must not orphan the trainings still running
                    print(f"seed {seed}: probe failed: {type(error).__name__}: {error}", flush=True)
                    continue
                print(f"seed {seed}: {json.dumps(per_seed[str(seed)])}", flush=True)
                reported = {**kept, **per_seed}
                write_report({"data": str(args.data), "seeds_requested": args.seeds, "seeds_run": sorted(per_seed, key=int),
                              "seeds_merged": sorted(kept, key=int), "merged_from": str(args.merge) if kept else None,
                              **_run_settings(args),
                              "per_seed": dict(sorted(reported.items(), key=lambda item: int(item[0]))),
                              **seed_summary(reported),
                              "wall_minutes": round((time.time() - started) / 60, 1)}, args.output)

    report_seeds()
    while pending or running:
        while len(running) < args.jobs:
            ready = next((job for job in pending if job["after"] is None or job["after"] in done), None)
            if ready is None:
                break
            pending.remove(ready)
            ready["log"].parent.mkdir(parents=True, exist_ok=True)
            log = ready["log"].open("w")
            print(f"[{time.strftime('%H:%M:%S')}] start {ready['name']}: {' '.join(ready['command'])}", flush=True)
            running[ready["name"]] = (subprocess.Popen(ready["command"], stdout=log, stderr=subprocess.STDOUT,
                                                       env=environment), log, time.time())
        time.sleep(5)
        for name, (process, log, began) in list(running.items()):
            if process.poll() is None:
                continue
            log.close()
            del running[name]
            if process.returncode != 0:
                print(f"{name} failed (exit {process.returncode}): see {log.name}", flush=True)
                pending = [job for job in pending if job["after"] != name]
                continue
            print(f"[{time.strftime('%H:%M:%S')}] done {name} in {(time.time() - began) / 60:.1f} min", flush=True)
            done.add(name)
            report_seeds()
    return 0 if per_seed else 1


if __name__ == "__main__":
    raise SystemExit(main())
