"""Integrations with other libraries, each imported on demand so ``import fastattn`` pulls in none of them.

* :mod:`fastattn.integrations.transformers`: ``register()`` makes Hugging Face's
  ``attn_implementation="fastattn"`` work (needs ``pip install 'fastattn[hf]'``).
"""
