"""Training side of RegionMed-CLIP: data, collator, staged Trainer and the command-line tools."""
