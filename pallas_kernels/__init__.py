"""Pallas attention kernels: one file per kernel (BlockSizes, kernel, jitted wrapper, jnp reference).

flash_attention      prefill flash attention (Triton for GPU, Mosaic for TPU, interpret on CPU)
paged_attention      paged attention for 1..N query tokens per sequence, split-K, quantized pages
paged_attention_tpu  the Mosaic (TPU) lowering of paged attention
kv_formats           quantized KV page formats: quantize / dequantize references, 4-bit packing
"""
