"""Encoding a dataset split once: image, text and region embeddings, cached to disk as safetensors.

Every evaluation task scores embeddings, never pixels, so encoding is the expensive step and
re-scoring (another prompt set, another uncertain-label policy, another K) should not repeat it.
`EmbeddingCache` stores each named set of tensors in `<folder>/<name>.safetensors` together with a
key (model weights and config hashes, data file hashes, split, limit, processor settings, what was
encoded) and a checksum of its tensors; a file whose key differs is recomputed, never silently
reused, and a damaged one (truncated, unreadable, its checksum wrong) is rebuilt with a warning.

All embeddings returned here are L2-normalised float32 on the CPU.
"""

import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from regionmed_clip.processing import PROPOSAL_INPUT_NAMES, ROI_INPUT_NAMES

__all__ = [
    "EmbeddingCache",
    "encode_images",
    "encode_proposals",
    "encode_regions",
    "encode_texts",
    "tensors_sha256",
]

logger = logging.getLogger(__name__)

_KEY_FIELD = "regionmed_eval_key"
_SUM_FIELD = "regionmed_eval_sha256"


class EmbeddingCache:
    """Named tensor sets under `folder`, each valid for one `key` (a JSON-able mapping); `folder=None`
    computes every time.

    A file is reused only when it reads whole and its key and checksum (SHA-256 of the tensors' names,
    dtypes, shapes and bytes, stored beside the key) match: a truncated or otherwise damaged file is
    rebuilt, with a warning naming it."""

    def __init__(self, folder: str | Path | None, key: Mapping[str, Any]):
        self.folder = None if folder is None else Path(folder)
        self.key = dict(key)

    def path(self, name: str, suffix: str = ".safetensors") -> Path | None:
        return None if self.folder is None else self.folder / f"{name}{suffix}"

    def _key(self, name: str, extra: Mapping[str, Any] | None) -> str:
        return json.dumps({**self.key, "name": name, **({"extra": dict(extra)} if extra else {})}, sort_keys=True,
                          default=str)

    def get_or_compute(self, name: str, compute: Callable[[], dict[str, torch.Tensor]],
                       extra: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
        """The tensors stored under `name` when the file's key equals this cache's key (plus the name and
        `extra`, e.g. a digest of the boxes encoded), else `compute()`'s result, written for next time.
        Returns `{tensor name: tensor}`."""
        key = self._key(name, extra)
        path = self.path(name)
        if path is not None and path.is_file():
            stored = self._read(path, key)
            if stored is not None:
                logger.info("embeddings %r read from %s", name, path)
                return stored
        tensors = compute()
        if path is not None:
            tensors = {name_: value.contiguous() for name_, value in tensors.items()}
            _write_atomically(path, lambda partial: save_file(
                tensors, str(partial), metadata={_KEY_FIELD: key, _SUM_FIELD: tensors_sha256(tensors)}))
        return tensors

    @staticmethod
    def _read(path: Path, key: str) -> dict[str, torch.Tensor] | None:
        """The tensors of `path` when its key is `key` and it is whole; None (with a warning when
        damaged) otherwise."""
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                if metadata.get(_KEY_FIELD) != key:
                    logger.info("embeddings in %s were made from other inputs; re-encoding", path)
                    return None
                tensors = {tensor: handle.get_tensor(tensor) for tensor in handle.keys()}
        except Exception as error:  # noqa: BLE001 - safetensors raises its own error type, and OSError
            logger.warning("embedding cache %s is damaged (%s: %s); rebuilding it", path, type(error).__name__,
                           str(error).splitlines()[0] if str(error) else "")
            return None
        if metadata.get(_SUM_FIELD) != tensors_sha256(tensors):
            logger.warning("embedding cache %s is damaged (checksum mismatch); rebuilding it", path)
            return None
        return tensors

    def get_or_compute_json(self, name: str, compute: Callable[[], Any]) -> Any:
        """As `get_or_compute`, for a JSON-able value stored in `<name>.json` (with its key and checksum)."""
        key = self._key(name, None)
        path = self.path(name, ".json")
        if path is not None and path.is_file():
            try:
                stored = json.loads(path.read_text())
                if stored["key"] == key:
                    text = json.dumps(stored["value"], sort_keys=True)
                    if stored["sha256"] != hashlib.sha256(text.encode()).hexdigest():
                        raise ValueError("checksum mismatch")
                    return stored["value"]
            except Exception as error:  # noqa: BLE001 - truncated JSON, missing fields, a bad checksum
                logger.warning("embedding cache %s is damaged (%s: %s); rebuilding it", path, type(error).__name__,
                               error)
        value = compute()
        if path is not None:
            text = json.dumps(value, sort_keys=True)
            record = {"key": key, "sha256": hashlib.sha256(text.encode()).hexdigest(), "value": value}
            _write_atomically(path, lambda partial: partial.write_text(json.dumps(record)))
        return value


def tensors_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of named tensors: each name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _write_atomically(path: Path, write: Callable[[Path], Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")  # a kill mid-write never leaves a readable cache
    write(partial)
    partial.replace(path)


def _normalised(embeds: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(embeds.float(), dim=-1).cpu()


def _progress(total: int, description: str, enabled: bool) -> tqdm:
    return tqdm(total=total, desc=description, unit="img", disable=not enabled, leave=False)


@torch.no_grad()
def encode_texts(
    model: Any, processor: Any, texts: Sequence[str], batch_size: int, device: torch.device, progress: bool = False
) -> torch.Tensor:
    """`(len(texts), D)` normalised text embeddings, `batch_size` texts per forward."""
    chunks = []
    with tqdm(total=len(texts), desc="texts", unit="text", disable=not progress, leave=False) as bar:
        for start in range(0, len(texts), batch_size):
            encoded = processor(text=list(texts[start : start + batch_size]))
            output = model.get_text_features(input_ids=encoded["input_ids"].to(device),
                                             attention_mask=encoded["attention_mask"].to(device), return_dict=True)
            chunks.append(_normalised(output.pooler_output))
            bar.update(len(chunks[-1]))
    return torch.cat(chunks) if chunks else torch.zeros(0, model.config.projection_dim)


@torch.no_grad()
def encode_images(
    model: Any,
    processor: Any,
    images: Sequence[Any],
    batch_size: int,
    device: torch.device,
    boxes: Sequence[Sequence[Sequence[float]]] | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """`(N, D)` normalised image embeddings: box-free (the global view and the processor's proposals
    pooled), or with `boxes[i]` (xyxy pixels, may be empty) pooled into image i's embedding."""
    chunks = []
    with _progress(len(images), "images" if boxes is None else "images + boxes", progress) as bar:
        for start in range(0, len(images), batch_size):
            batch = list(images[start : start + batch_size])
            regions = None if boxes is None else [list(b) for b in boxes[start : start + batch_size]]
            inputs = processor(images=batch, regions=regions)
            roi = {key: inputs[key].to(device) for key in (*ROI_INPUT_NAMES, *PROPOSAL_INPUT_NAMES) if key in inputs}
            chunks.append(_normalised(model.get_image_features(pixel_values=inputs["pixel_values"].to(device),
                                                                      **roi, return_dict=True).pooler_output))
            bar.update(len(batch))
    return torch.cat(chunks) if chunks else torch.zeros(0, model.config.projection_dim)


def _height_width(image: Any, image_processor: Any) -> tuple[int, int]:
    """`(height, width)` of an image as the processor reads it (a PIL image's own size)."""
    from PIL import Image

    from regionmed_clip.processing.medical_image_io import load_medical_pil

    if not isinstance(image, Image.Image):
        image = load_medical_pil(image, dicom_frame=image_processor.dicom_frame,
                                 max_image_pixels=image_processor.max_image_pixels)
    return image.size[1], image.size[0]


@torch.no_grad()
def encode_proposals(
    model: Any, processor: Any, images: Sequence[Any], batch_size: int, device: torch.device, progress: bool = False
) -> dict[str, torch.Tensor]:
    """Box-free, with every proposal kept: `image_embeds (N, D)` (as `encode_images`), normalised
    `proposal_embeds (N, P, D)` (zeros at padding), `proposal_mask (N, P)` bool and `proposal_boxes
    (N, P, 4)` pixel xyxy on each original image; P is the most proposals of any image."""
    images_out, embeds, masks, boxes = [], [], [], []
    image_processor = processor.image_processor
    with _progress(len(images), "images + proposals", progress) as bar:
        for start in range(0, len(images), batch_size):
            batch = list(images[start : start + batch_size])
            inputs = processor(images=batch, proposals=True)
            output = model(pixel_values=inputs["pixel_values"].to(device),
                           **{key: inputs[key].to(device) for key in PROPOSAL_INPUT_NAMES})
            images_out.append(_normalised(output.image_embeds))
            embeds.append(output.proposal_embeds.float().cpu())
            masks.append(output.proposal_mask.bool().cpu())
            for image, mask in zip(batch, masks[-1], strict=True):
                pixel_boxes = torch.zeros(mask.shape[0], 4)
                windows = image_processor.proposal_boxes(*_height_width(image, image_processor))
                pixel_boxes[: len(windows)] = torch.as_tensor(windows, dtype=torch.float32)
                boxes.append(pixel_boxes)
            bar.update(len(batch))
    slots = max(chunk.shape[1] for chunk in embeds)
    pad = lambda chunk: torch.nn.functional.pad(chunk, (0, 0) * (chunk.ndim - 2) + (0, slots - chunk.shape[1]))  # noqa: E731
    return {"image_embeds": torch.cat(images_out), "proposal_embeds": torch.cat([pad(chunk) for chunk in embeds]),
            "proposal_mask": torch.cat([pad(chunk) for chunk in masks]), "proposal_boxes": torch.stack(
                [torch.nn.functional.pad(box, (0, 0, 0, slots - box.shape[0])) for box in boxes])}


@torch.no_grad()
def encode_regions(
    model: Any,
    processor: Any,
    images: Sequence[Any],
    boxes: Sequence[Sequence[Sequence[float]]],
    batch_size: int,
    device: torch.device,
    transforms: Mapping[str, Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]] | None = None,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Normalised region embeddings `(L, D)` of every box in `boxes` (per image, xyxy pixels), in
    order, once per entry of `transforms` (`{"true": identity}` by default): each transform maps the
    processor's ROI batch (`ROI_INPUT_NAMES`) to a changed one, e.g. the probe's controls. Every box is kept
    (the processor is widened past its `max_rois` when an image has more)."""
    transforms = transforms or {"true": lambda roi: roi}
    widest = max((len(image_boxes) for image_boxes in boxes), default=0)
    processor = processor.with_max_rois(widest)
    chunks: dict[str, list[torch.Tensor]] = {name: [] for name in transforms}
    with _progress(len(images), "regions", progress) as bar:
        for start in range(0, len(images), batch_size):
            batch = list(images[start : start + batch_size])
            inputs = processor(images=batch, regions=[list(b) for b in boxes[start : start + batch_size]])
            pixel_values = inputs["pixel_values"].to(device)
            roi = {key: inputs[key] for key in ROI_INPUT_NAMES}
            mask = roi["roi_mask"].to(torch.bool)
            if mask.any():
                for name, transform in transforms.items():
                    changed = {key: value.to(device) for key, value in transform(roi).items()}
                    regions = model.get_region_features(pixel_values=pixel_values, **changed).pooler_output
                    chunks[name].append(_normalised(regions[mask.to(device)]))
            bar.update(len(batch))
    dim = model.config.projection_dim
    return {name: torch.cat(parts) if parts else torch.zeros(0, dim) for name, parts in chunks.items()}
