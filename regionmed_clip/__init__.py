"""RegionMed-CLIP, installed as one namespace (distribution `regionmed-clip`).

The design card's folders are its subpackages (setup.cfg maps each repository folder to its name here):
`regionmed_clip.modeling_regionmed_clip` and `regionmed_clip.processing` (the shipped remote code),
`regionmed_clip.training_scripts`, `regionmed_clip.evaluation`. This folder holds the rest: `cli` (the
console scripts' error boundary), `data` (what training and evaluation both read), `scoring` and
`figures` (metrics and charts, no model or training code), and `apps` (demo, export, push).
docs/ARCHITECTURE.md gives the layers and what each may import.
"""
