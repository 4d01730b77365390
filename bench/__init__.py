"""Benchmarks: development tooling beside the product, never imported by ``tanglebox``.

Run from the repository root, in an environment with the development requirements installed
(``python -m pip install -r requirements-dev.txt``: the serving benchmark's clients need
``requests`` and ``websocket-client``, which the server itself does not): ``python -m bench``
for the serving benchmark, ``python -m bench.<name>`` for the others (``engine_vs_direct``,
``engine_batched``, ``batch_order``, ``quantization``, ``proxy_overhead``). Results and how to
reproduce them, llama-server's build included, are in docs/benchmarks.md.
"""
