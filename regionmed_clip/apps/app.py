"""`regionmed-app`: the model's demo app (a Gradio Space): drop a film, draw boxes, see the findings and where.

    regionmed-app --model DIR_OR_REPO [--host 127.0.0.1] [--port 7860] [--prompts FILE] [--findings A B ...]

The film (PNG, JPEG, 16-bit TIFF or DICOM) is decoded by the package's medical image reader and shown in
a box-drawing canvas (`gradio_image_annotation`). "Analyse" then answers two questions with the model's
public API only (`AutoModelForZeroShotImageClassification` / `AutoProcessor` with `trust_remote_code=True`, and
the model's zero-shot pipeline, as a user would call them):

* what is in this film: box-free scores per finding (the pipeline without boxes), and for the selected
  finding the heatmap of its probability over the full-resolution proposals with the best one marked;
* what is in each drawn box: its scores per finding (the pipeline with `boxes=`), and the nearest region
  caption among every (finding, side, zone) wording of `--region-template`.

It runs offline: analytics off, no share link, system fonts (no font or script from the network). A bad
input (not an image, an empty file, a box outside the film, a DICOM without pixels, fewer than two
findings) is a message in the page; the app keeps serving.
"""

import argparse
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from regionmed_clip.apps.export import check_repo_id
from regionmed_clip.cli import UsageError, console_script, positive_int
from regionmed_clip.data.synthetic import SIDES, ZONES
from regionmed_clip.evaluation.zero_shot import DEFAULT_PROMPTS, load_prompt_templates
from regionmed_clip.figures import overlay_regions
from regionmed_clip.processing.medical_image_io import load_medical_pil

__all__ = [
    "DEFAULT_REGION_TEMPLATE",
    "DEFAULT_TEMPLATE",
    "AppInputError",
    "BoxReading",
    "FilmAnalysis",
    "FilmReader",
    "build_app",
    "canvas_picture",
    "default_findings",
    "display_scale",
    "launch",
    "main",
    "parse_boxes",
    "parse_findings",
    "read_film",
]

logger = logging.getLogger(__name__)

DEFAULT_TEMPLATE = "There is a {}."  # the zero-shot pipeline's hypothesis template
DEFAULT_REGION_TEMPLATE = "{finding} in the {side} {zone} zone"
TASK = "zero-shot-image-classification"
HEATMAP_SIDE = 768  # longest side of the heatmap picture, in pixels
DISPLAY_SIDE = 1024  # longest side of the film's copy on the box canvas, in pixels
BEST_REGION_COLOUR = (255, 215, 0)
# System fonts only: Gradio's default theme fetches its fonts from Google, which an offline app must not.
SANS_FONTS = ("system-ui", "Helvetica", "Arial", "sans-serif")
MONO_FONTS = ("ui-monospace", "Consolas", "monospace")


class AppInputError(ValueError):
    """Input the app cannot use (the film, the findings or a box); its message is shown in the page."""


@dataclass
class BoxReading:
    """One drawn box: `box` xyxy in film pixels, `scores` [(finding, probability)] ranked, and the nearest
    region caption with its probability among the region captions."""

    box: list[float]
    scores: list[tuple[str, float]]
    caption: str
    caption_score: float


@dataclass
class FilmAnalysis:
    """The box-free reading of a film (`findings`: the pipeline's ranked entries, each with `label`, `score`,
    `box` and `heatmap`) and one `BoxReading` per drawn box."""

    findings: list[dict[str, Any]]
    boxes: list[BoxReading] = field(default_factory=list)

    def finding(self, label: str) -> dict[str, Any]:
        return next(entry for entry in self.findings if entry["label"] == label)


def parse_findings(text: str) -> list[str]:
    """The findings of a comma- or newline-separated list, in order, each once; at least two (a softmax over one
    label is always 1)."""
    findings = list(dict.fromkeys(name.strip() for name in text.replace("\n", ",").split(",") if name.strip()))
    if len(findings) < 2:
        raise AppInputError(f"list at least two findings, separated by commas (got {findings or 'none'})")
    return findings


def display_scale(width: int, height: int) -> float:
    """The factor from film pixels to the canvas' copy, whose longer side is at most `DISPLAY_SIDE`: a 3000 px
    radiograph is not sent to the browser at full size (the model still reads the full film)."""
    return min(1.0, DISPLAY_SIDE / max(width, height))


def parse_boxes(annotation: dict[str, Any] | None, width: int, height: int, max_boxes: int,
                scale: float = 1.0) -> list[list[float]]:
    """The drawn boxes of the canvas' value (`{"boxes": [{"xmin", "ymin", "xmax", "ymax", ...}]}`, in the pixels of
    a copy of the film scaled by `scale`) as xyxy film pixels; an error naming the box that is empty or outside the
    `width` x `height` film, or one box too many."""
    boxes = []
    for number, drawn in enumerate((annotation or {}).get("boxes") or [], start=1):
        x0, y0, x1, y1 = (float(drawn[key]) / scale for key in ("xmin", "ymin", "xmax", "ymax"))
        where = f"box {number} (x {x0:g}..{x1:g}, y {y0:g}..{y1:g})"
        if not (x1 > x0 and y1 > y0):
            raise AppInputError(f"{where} is empty: draw it with some width and height")
        slack = 0.5 / scale  # the copy's rounding: its last pixel may map a little past the film's edge
        if x0 < -slack or y0 < -slack or x1 > width + slack or y1 > height + slack:
            raise AppInputError(f"{where} lies outside the {width} x {height} film: draw it on the image")
        boxes.append([max(0.0, x0), max(0.0, y0), min(float(width), x1), min(float(height), y1)])
    if len(boxes) > max_boxes:
        raise AppInputError(f"{len(boxes)} boxes drawn; the model reads at most {max_boxes} per film: remove some")
    return boxes


def read_film(path: str | os.PathLike) -> Image.Image:
    """The film at `path` decoded as the model's processor decodes it ("L" or "RGB"); an `AppInputError` that
    names the file when it is empty or no image."""
    path = Path(path)
    name = path.name
    if path.stat().st_size == 0:
        raise AppInputError(f"{name} is empty (0 bytes)")
    try:
        return load_medical_pil(path)
    except (ValueError, TypeError, OSError) as error:
        raise AppInputError(f"{name} is not a film the model can read: {str(error).replace(str(path), name)}") from None


class FilmReader:
    """The model loaded for the app: `analyse(film, findings, boxes)` -> `FilmAnalysis`.

    `source` is a model folder or Hub repo id, loaded with `AutoModelForZeroShotImageClassification` (the exported
    folder's `auto_map` gives it the model class `AutoModel` gives) / `AutoProcessor` and `trust_remote_code=True`;
    the scores come from the zero-shot pipeline class this package ships in every export (`custom_pipelines`)."""

    def __init__(self, source: str, template: str = DEFAULT_TEMPLATE,
                 region_template: str = DEFAULT_REGION_TEMPLATE) -> None:
        from transformers import AutoModelForZeroShotImageClassification, AutoProcessor

        from regionmed_clip.processing.pipeline_regionmed_clip import RegionMedCLIPZeroShotPipeline

        _check_template(template, "{}", "--template")
        for placeholder in ("{finding}", "{side}", "{zone}"):  # also keeps captions apart from the hypotheses
            _check_template(region_template, placeholder, "--region-template")
        self.template, self.region_template = template, region_template
        # the exported folder maps this auto class to the model (AutoModel's), and registers it for the task
        self.model = AutoModelForZeroShotImageClassification.from_pretrained(source, trust_remote_code=True).eval()
        self.processor = AutoProcessor.from_pretrained(source, trust_remote_code=True)
        self.classifier = RegionMedCLIPZeroShotPipeline(model=self.model, tokenizer=self.processor.tokenizer,
                                                        image_processor=self.processor.image_processor, task=TASK)

    @property
    def max_boxes(self) -> int:
        return int(self.model.config.max_rois)

    def region_captions(self, findings: Sequence[str]) -> list[str]:
        """Every (finding, side, zone) wording of the region template, e.g. "nodule in the left upper zone"."""
        return [self.region_template.format(finding=finding, side=side, zone=zone)
                for finding in findings for side in SIDES for zone in ZONES]

    def analyse(self, film: Image.Image, findings: Sequence[str], boxes: Sequence[Sequence[float]] = ()) -> FilmAnalysis:
        findings = list(findings)
        entries = self.classifier(film, candidate_labels=findings, hypothesis_template=self.template, heatmap=True)
        analysis = FilmAnalysis(findings=entries)
        if boxes:
            # One region pass for both questions: a softmax over all the texts, renormalised over each group, is
            # exactly the softmax over that group.
            hypotheses = [self.template.format(finding) for finding in findings]
            captions = self.region_captions(findings)
            ranked_per_box = self.classifier(film, candidate_labels=hypotheses + captions, hypothesis_template="{}",
                                             boxes=[list(box) for box in boxes])
            finding_of = dict(zip(hypotheses, findings, strict=True))
            for box, ranked in zip(boxes, ranked_per_box, strict=True):
                scores = _renormalised([(finding_of[e["label"]], e["score"]) for e in ranked if e["label"] in finding_of])
                nearest = _renormalised([(e["label"], e["score"]) for e in ranked if e["label"] not in finding_of])[0]
                analysis.boxes.append(BoxReading(list(box), scores, *nearest))
        return analysis

    def heatmap_picture(self, film: Image.Image, analysis: FilmAnalysis, label: str) -> Image.Image:
        """The film with `label`'s proposal probabilities painted over it and its best region outlined."""
        entry = analysis.finding(label)
        return overlay_regions(film, [entry["box"]], [f"best region: {label}"], [BEST_REGION_COLOUR],
                               heatmap=entry["heatmap"], title=f"{label}: p = {entry['score']:.2f} (box-free)",
                               side=min(HEATMAP_SIDE, max(film.size)))


def _renormalised(ranked: list[tuple[str, float]]) -> list[tuple[str, float]]:
    """`(label, probability)` pairs, ranked, scaled to sum to 1."""
    total = sum(score for _, score in ranked)
    return [(label, score / total) for label, score in ranked]


def _check_model_source(model: str) -> None:
    """A local model folder with its config, or else a Hub repo id; a UsageError naming --model otherwise."""
    folder = Path(model)
    if folder.exists():
        if not (folder / "config.json").is_file():
            raise UsageError(f"--model {model!r} is not a model folder (it has no config.json): give the folder "
                             "regionmed-export wrote, or a Hub repo id")
        return
    try:
        check_repo_id(model, "--model")
    except UsageError:
        raise UsageError(f"--model {model!r} is neither a folder nor a Hub repo id (ORG/NAME)") from None


def _check_template(template: str, placeholder: str, flag: str) -> None:
    if placeholder not in template:
        raise UsageError(f"{flag} {template!r} must hold {placeholder}")


def default_findings(prompts: str | Path = DEFAULT_PROMPTS) -> list[str]:
    """The classes of a prompt-template file (`evaluation/prompts/chest_xray.yaml` by default)."""
    return list(load_prompt_templates(prompts).get("classes") or {})


# -- the page -------------------------------------------------------------------------------------------------


def canvas_picture(film: Image.Image) -> np.ndarray:
    """The film's RGB copy for the box canvas, scaled by `display_scale`: `(h, w, 3)` uint8."""
    scale = display_scale(film.width, film.height)
    picture = film.convert("RGB")
    if scale < 1:
        picture = picture.resize((max(1, round(film.width * scale)), max(1, round(film.height * scale))),
                                 Image.Resampling.BILINEAR)
    return np.asarray(picture)


def _summary(analysis: FilmAnalysis, seconds: float) -> str:
    top = analysis.findings[0]
    lines = [f"**Box-free top finding:** {top['label']} (p = {top['score']:.2f})"]
    for number, reading in enumerate(analysis.boxes, start=1):
        finding, score = reading.scores[0]
        lines.append(f"**Box {number}:** {finding} (p = {score:.2f}); nearest region caption: "
                     f"*{reading.caption}* (p = {reading.caption_score:.2f})")
    lines.append(f"*Analysed in {seconds:.3f} s.*")
    return "\n\n".join(lines)


def _box_table(analysis: FilmAnalysis) -> list[list[Any]]:
    return [[number, ", ".join(f"{value:.0f}" for value in reading.box), reading.scores[0][0],
             round(reading.scores[0][1], 3), reading.caption,
             "; ".join(f"{label} {score:.2f}" for label, score in reading.scores)]
            for number, reading in enumerate(analysis.boxes, start=1)]


def _problem(error: Exception) -> str:
    if isinstance(error, AppInputError):
        return f"**Cannot analyse this input.** {error}"
    logger.exception("regionmed-app: unexpected error")  # the traceback stays in the server's log
    return (f"**Something went wrong** ({type(error).__name__}: {error}). The app is still running: "
            "try another film or other boxes.")


def build_app(reader: FilmReader, findings: Sequence[str], title: str = "RegionMed-CLIP") -> Any:
    """The Gradio `Blocks` of the app over `reader`, with `findings` as the default list."""
    import gradio as gr
    from gradio_image_annotation import image_annotator

    def upload(file: str | None) -> tuple[Any, Any, Any, Any]:
        if file is None:  # cleared, by the user or below after a bad file: the message stays
            return gr.update(), gr.update(), gr.update(), gr.update()
        try:
            film = read_film(file)  # gradio keeps the upload's own file name in its cache path
        except Exception as error:  # noqa: BLE001 - shown in the page, the app keeps serving
            return None, None, _problem(error), None  # the file field is cleared for the next try
        message = f"Loaded a {film.width} x {film.height} film. Draw boxes on it (optional), then press Analyse."
        return {"image": canvas_picture(film), "boxes": []}, film, message, gr.update()

    def analyse(film: Image.Image | None, annotation: dict | None, findings_text: str
                ) -> tuple[str, str, Any, Any, Any, Any, FilmAnalysis | None, Any]:
        empty = ("", None, gr.update(choices=[], value=None), None, [], None, gr.update())
        try:
            if film is None:
                raise AppInputError("upload a film first (PNG, JPEG, TIFF or DICOM)")
            labels = parse_findings(findings_text)
            scale = display_scale(film.width, film.height)
            boxes = parse_boxes(annotation, film.width, film.height, reader.max_boxes, scale)
            began = time.perf_counter()
            analysis = reader.analyse(film, labels, boxes)
            seconds = time.perf_counter() - began
        except Exception as error:  # noqa: BLE001 - shown in the page, the app keeps serving
            return (_problem(error), *empty)
        top = analysis.findings[0]["label"]
        scores = {entry["label"]: entry["score"] for entry in analysis.findings}
        # the boxes go back onto the canvas numbered with their top finding, so the table's rows can be found
        numbered = [{"xmin": x0 * scale, "ymin": y0 * scale, "xmax": x1 * scale, "ymax": y1 * scale,
                     "label": f"{number}: {reading.scores[0][0]}"}
                    for number, reading in enumerate(analysis.boxes, start=1) for x0, y0, x1, y1 in [reading.box]]
        canvas_value = {"image": canvas_picture(film), "boxes": numbered} if numbered else gr.update()
        return ("", _summary(analysis, seconds), scores,
                gr.update(choices=[entry["label"] for entry in analysis.findings], value=top),
                reader.heatmap_picture(film, analysis, top), _box_table(analysis), analysis, canvas_value)

    def select(film: Image.Image | None, analysis: FilmAnalysis | None, label: str | None) -> Any:
        if film is None or analysis is None or not label:
            return None
        return reader.heatmap_picture(film, analysis, label)

    with gr.Blocks(title=title, analytics_enabled=False) as app:
        gr.Markdown(f"# {title}\nZero-shot findings of a radiograph, with and without boxes. "
                    "**Research use only: not for clinical use.**")
        film_state, analysis_state = gr.State(None), gr.State(None)
        with gr.Row():
            with gr.Column():
                film_file = gr.File(label="Film (PNG, JPEG, TIFF or DICOM)", elem_id="film-file")
                canvas = image_annotator(label="Draw boxes on the film (optional)", sources=[], image_type="numpy",
                                         disable_edit_boxes=True, elem_id="film-canvas", show_clear_button=False)
                findings_box = gr.Textbox(", ".join(findings), label="Findings (comma-separated)", lines=2,
                                          elem_id="findings")
                run = gr.Button("Analyse", variant="primary", elem_id="analyse")
            with gr.Column():
                message = gr.Markdown(elem_id="message")
                summary = gr.Markdown(elem_id="summary")
                scores = gr.Label(label="Box-free findings", num_top_classes=5, elem_id="box-free-scores")
                selected = gr.Dropdown(label="Heatmap of", choices=[], elem_id="heatmap-finding")
                heatmap = gr.Image(label="Where (box-free proposals; best region outlined)", type="pil",
                                   interactive=False, elem_id="heatmap")
                table = gr.Dataframe(headers=["box", "xyxy", "top finding", "p", "nearest region caption", "scores"],
                                     interactive=False, elem_id="box-results")
        film_file.change(upload, film_file, [canvas, film_state, message, film_file])
        run.click(analyse, [film_state, canvas, findings_box],
                  [message, summary, scores, selected, heatmap, table, analysis_state, canvas])
        selected.input(select, [film_state, analysis_state, selected], heatmap)
    return app


def theme() -> Any:
    import gradio as gr

    return gr.themes.Default(font=list(SANS_FONTS), font_mono=list(MONO_FONTS))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="regionmed-app", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model folder (regionmed-export's) or Hub repo id")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0 in a Space)")
    parser.add_argument("--port", type=positive_int, default=7860)
    parser.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS,
                        help="prompt-template file whose classes are the default findings")
    parser.add_argument("--findings", nargs="+", default=None, help="default findings (instead of --prompts' classes)")
    parser.add_argument("--template", default=DEFAULT_TEMPLATE, help="hypothesis template of a finding ({})")
    parser.add_argument("--region-template", default=DEFAULT_REGION_TEMPLATE,
                        help="region caption wording ({finding}, {side}, {zone}) for a box's nearest caption")
    parser.add_argument("--title", default="RegionMed-CLIP")
    return parser


def launch(model: str, host: str = "127.0.0.1", port: int = 7860, findings: Sequence[str] | None = None,
           prompts: str | Path = DEFAULT_PROMPTS, template: str = DEFAULT_TEMPLATE,
           region_template: str = DEFAULT_REGION_TEMPLATE, title: str = "RegionMed-CLIP") -> None:
    """Load `model` and serve the app on `host`:`port` until interrupted (a Space's `app.py` calls this)."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # read when gradio is imported: set before
    _check_model_source(model)
    defaults = list(findings) if findings else default_findings(prompts)
    if len(defaults) < 2:
        raise UsageError(f"the default findings need at least two names, got {defaults} (--findings or --prompts)")
    reader = FilmReader(model, template, region_template)
    print(f"regionmed-app: serving {model} on http://{host}:{port} (Ctrl+C to stop)", flush=True)
    build_app(reader, defaults, title).launch(server_name=host, server_port=port, share=False, show_error=False,
                                              theme=theme(), footer_links=[], quiet=True)


@console_script("regionmed-app")
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    launch(args.model, args.host, args.port, args.findings, args.prompts, args.template, args.region_template,
           args.title)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
