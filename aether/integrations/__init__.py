"""Integrations of AETHER into model libraries.

`aether.integrations.transformers`: `attn_implementation="aether"` and `AetherCache` for Hugging Face
transformers (needs the `eval` extra: `pip install -e .[eval]`). It is not imported here, so
`import aether` never needs transformers.
"""
