"""`regionmed-demo`: build the tiny model, run it on 4 ROIs per image, save it as a Hub remote-code
folder and reload it with `AutoModel.from_pretrained(..., trust_remote_code=True)`."""

import argparse
import time
from pathlib import Path

import torch
from transformers import AutoModel

from modeling_regionmed_clip import RegionMedCLIPConfig, RegionMedCLIPModel


def random_batch(config: RegionMedCLIPConfig, batch_size: int, rois_per_image: int, seed: int) -> dict[str, torch.Tensor]:
    """Random pixels and tokens in the model's input layout, with `rois_per_image` boxes per image."""
    generator = torch.Generator().manual_seed(seed)
    size, roi_size = config.vision_config.image_size, config.roi_image_size
    corner = torch.rand(batch_size, rois_per_image, 2, generator=generator) * 0.6
    extent = 0.1 + torch.rand(batch_size, rois_per_image, 2, generator=generator) * 0.3
    input_ids = torch.randint(5, config.text_config.vocab_size, (batch_size, 32), generator=generator)
    input_ids[:, 0] = config.text_config.cls_token_id
    return {
        "pixel_values": torch.randn(batch_size, 3, size, size, generator=generator),
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "roi_pixel_values": torch.randn(batch_size, rois_per_image, 3, roi_size, roi_size, generator=generator),
        "roi_boxes": torch.cat([corner, corner + extent], dim=-1),
        "roi_mask": torch.ones(batch_size, rois_per_image, dtype=torch.bool),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="tiny", help="model preset (default: tiny)")
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/demo"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    config = RegionMedCLIPConfig.from_preset(args.preset)
    model = RegionMedCLIPModel(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"built RegionMed-CLIP '{args.preset}': {n_params:,} parameters, attention={config._attn_implementation}")

    inputs = random_batch(config, batch_size=4, rois_per_image=4, seed=args.seed)
    start = time.perf_counter()
    out = model(**inputs, return_loss=True)
    out.loss.backward()
    print(f"forward+backward, 4 images x 4 ROIs: loss {out.loss.item():.4f} in {time.perf_counter() - start:.2f}s; "
          f"region_embeds {tuple(out.region_embeds.shape)}")

    model_dir = args.output_dir / "model"
    model.save_pretrained(model_dir)
    print(f"saved remote-code model to {model_dir}: {', '.join(sorted(p.name for p in model_dir.iterdir()))}")

    reloaded = AutoModel.from_pretrained(model_dir, trust_remote_code=True).eval()
    model.eval()
    with torch.no_grad():
        same = torch.equal(model(**inputs).logits_per_image, reloaded(**inputs).logits_per_image)
    print(f"reloaded with AutoModel(trust_remote_code=True) as {type(reloaded).__name__}: identical logits = {same}")
    if not same:
        raise SystemExit("reloaded model disagrees with the saved one")


if __name__ == "__main__":
    main()
