"""Compression: what a worker's vector becomes before it travels.

- ``sparse``: the sparse vector (ascending indices, float64 or float32 values) every message is made of.
- ``compressors``: the compressor zoo (Top-k, Rand-k, natural, sign, …) with each one's α or ω.
- ``codec``: sparse vectors to bytes and back (plain, or Elias–Fano indices with float32 values).
- ``ops``: the array operations a worker's method step and replica use, so its vectors may live on another backend
  (numpy here; a PyTorch model's tensors in ``ef21.problems.torch.ops``) with the same bits.

May import: numpy and ``ef21.errors``. Nothing here knows a method, a problem or a transport.
"""
