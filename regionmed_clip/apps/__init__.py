"""Applications on top of every other layer: the demo, the Hub export and the push."""
