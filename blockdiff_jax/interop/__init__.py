"""Pretrained models in and out: Hugging Face folders, GGUF files, tokenizers, the MASK token.

Model layer: imports blockdiff_jax.model and blockdiff_jax.data only.

* ``pretrained.load(spec, cache_dir, **cfg_kwargs) -> Pretrained``: the one entry point
  for ``--config.init.pretrained=smollm2|PATH`` (a .gguf file or an HF folder).
* ``hf``: ``read_overrides``, ``transformer_config``, ``load_params`` (sharded reads),
  ``export``; ``architectures``: config.json <-> config.model and the tensor layout.
* ``gguf_io``: GGUF -> HF config and tensors (dequantized, Q/K rows unpermuted).
* ``tokenizer.PretrainedTokenizer``: a model's own tokenizer behind the data layer's
  interface, with chat templates; ``tokenizer.qwen_tokenizer`` for Qwen's vocabulary offline.
* ``causal_lm``: the model as a plain causal LM (logits, perplexity, greedy decoding).
"""
