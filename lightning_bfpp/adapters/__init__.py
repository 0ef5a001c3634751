"""Ready-made pipeline modules for models of other libraries.

Each adapter lives in its own module and imports its library only when that module is imported, so
``import lightning_bfpp.adapters`` needs nothing beyond lightning-bfpp itself:

- :mod:`lightning_bfpp.adapters.litgpt`: LitGPT's ``GPT`` (``pip install "lightning-bfpp[litgpt]"``).
- :mod:`lightning_bfpp.adapters.huggingface`: ``transformers`` causal language models of the GPT-2 and Llama
  families (``pip install "lightning-bfpp[hf]"``).
"""
