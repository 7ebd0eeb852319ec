"""Evaluation of RegionMed-CLIP: zero-shot classification, retrieval, region probes, grounding and VQA tasks,
their results records and the `regionmed-eval` CLI. Import the module you need (`regionmed_clip.evaluation.tasks`,
`.probe`, `.retrieval`, ...): this file loads nothing, so importing one task does not load the others."""
