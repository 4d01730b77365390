"""Hugging Face transformers + torch: model folders, and ``.gguf`` files through transformers'
``gguf_file`` loading, on cpu, cuda or mps.

The flow, one module a step: ``plan`` decides how to load (dtype, device map, memory limits,
quantization) from the settings and what the machine has, without importing torch; ``load``
loads the tokenizer and the weights as planned; ``tokens`` reads the tokenizer (chat format,
end-of-turn tokens, the bytes of each token); ``backend`` is the batched backend the engine
drives, and ``static_decode`` its decode step on one preallocated cache (for CUDA graphs).
torch and transformers are imported only when a model is planned onto the machine or loaded,
so the web layer imports without them.
"""
