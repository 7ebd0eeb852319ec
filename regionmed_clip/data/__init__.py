"""The data layer: the canonical schema and its loading, fingerprints and file checksums, converters from
the public datasets' formats, hard-negative rules, VQA records and answer normalisation, and the synthetic
generator. Training and evaluation both import it; it imports only the shipped processing code."""
