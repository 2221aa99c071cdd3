"""Named device profiles: an 8B-class model (Llama-3.1-8B) served by a continuous-batching
engine on one GPU of each kind. Each figure is derived from the published numbers in
``SOURCES`` by the arithmetic written next to it; docs/sim.md has the same table.

Model figures used throughout (Llama-3.1-8B: 32 layers, 8 KV heads of 128, GQA):

- weights: 16.1 GB in BF16; 5.0 GB at 4 bits (AWQ/GPTQ int4 or GGUF Q4_K_M), which the
  12 GB and 16 GB Intel cards need to hold the model and a useful KV cache;
- KV cache: 2 (K, V) x 32 layers x 8 heads x 128 x 2 bytes = 128 KiB per token, so a block
  of 16 tokens is 2 MiB;
- prefill: 2 x 8.0e9 = 16 GFLOP per token (compute bound).

Derivations:

- ``decode_ms`` (one decode step at batch 1, memory bound) = weight bytes / (memory
  bandwidth x achieved share); the share is what vLLM-class engines reach on each
  software stack (CUDA 0.7, ROCm on MI300X 0.55, ROCm on RDNA3 0.75 with FP16, Intel XPU
  0.6 on Battlemage and 0.45 on Alchemist).
- ``step_ms_per_seq`` = reading one sequence's KV cache at 2,048 tokens of context
  (256 MiB) at the same achieved bandwidth.
- ``prefill_tokens_per_second`` = dense FP16/BF16 peak x achieved MFU / 16 GFLOP (MFU 0.40
  H200, 0.30 MI300X, 0.25 RX 7900 XTX, 0.20 Arc B580, 0.15 Arc A770).
- ``prefix_cache_blocks`` (the KV pool, in 16-token blocks of 2 MiB) = (memory x 0.9, vLLM's
  gpu_memory_utilization, - weights - activations and graphs: 4 GB datacenter, 1-1.5 GB
  consumer) / 2 MiB.
- ``max_batch``: vLLM's default max_num_seqs (256) on datacenter parts; what fits the KV pool
  at ~2k tokens a sequence, rounded, on the consumer cards.
- ``max_batched_tokens`` (the chunked-prefill token budget of one step): vLLM V1's default
  for its OpenAI server, 8,192 on large-memory datacenter GPUs and 2,048 elsewhere.
"""

from __future__ import annotations

from typing import Any

SOURCES = {
    "h200": "NVIDIA H200 SXM datasheet: 141 GB HBM3e, 4.8 TB/s, BF16 989 TFLOPS dense",
    "mi300x": "AMD Instinct MI300X datasheet: 192 GB HBM3, 5.3 TB/s, FP16 1,307 TFLOPS dense",
    "rx7900xtx": "AMD Radeon RX 7900 XTX spec: 24 GB GDDR6, 960 GB/s, FP16 122.8 TFLOPS",
    "arc-b580": "Intel Arc B580 spec: 12 GB GDDR6, 456 GB/s, 233 INT8 TOPS (XMX) = "
                "116.5 FP16 TFLOPS",
    "arc-a770": "Intel Arc A770 16GB spec: 16 GB GDDR6, 560 GB/s, 275 INT8 TOPS (XMX) = "
                "137.6 FP16 TFLOPS",
}

PROFILES: dict[str, dict[str, Any]] = {
    # 16.1 GB / (4.8 TB/s x 0.7) = 4.8 ms; 256 MiB / 3.36 TB/s = 0.08 ms;
    # 989e12 x 0.40 / 16e9 = 24,700 tok/s; (126.9 - 16.1 - 4) GB / 2 MiB = 50,900 blocks.
    "h200": {"decode_ms": 4.8, "step_ms_per_seq": 0.08, "prefill_tokens_per_second": 24700,
             "prefix_cache_blocks": 50900, "max_batch": 256, "max_batched_tokens": 8192},
    # 16.1 GB / (5.3 TB/s x 0.55) = 5.5 ms; 256 MiB / 2.9 TB/s = 0.09 ms;
    # 1307e12 x 0.30 / 16e9 = 24,500 tok/s; (172.8 - 16.1 - 4) GB / 2 MiB = 72,800 blocks.
    "mi300x": {"decode_ms": 5.5, "step_ms_per_seq": 0.09, "prefill_tokens_per_second": 24500,
               "prefix_cache_blocks": 72800, "max_batch": 256, "max_batched_tokens": 8192},
    # 16.1 GB / (0.96 TB/s x 0.75) = 22.4 ms; 256 MiB / 720 GB/s = 0.37 ms;
    # 122.8e12 x 0.25 / 16e9 = 1,920 tok/s; (21.6 - 16.1 - 1.5) GB / 2 MiB = 1,900 blocks.
    "rx7900xtx": {"decode_ms": 22.4, "step_ms_per_seq": 0.37,
                  "prefill_tokens_per_second": 1920, "prefix_cache_blocks": 1900,
                  "max_batch": 16, "max_batched_tokens": 2048},
    # 5.0 GB / (456 GB/s x 0.6) = 18.3 ms; 256 MiB / 274 GB/s = 0.98 ms;
    # 116.5e12 x 0.20 / 16e9 = 1,460 tok/s; (10.8 - 5.0 - 1.0) GB / 2 MiB = 2,290 blocks.
    "arc-b580": {"decode_ms": 18.3, "step_ms_per_seq": 0.98,
                 "prefill_tokens_per_second": 1460, "prefix_cache_blocks": 2290,
                 "max_batch": 16, "max_batched_tokens": 2048},
    # 5.0 GB / (560 GB/s x 0.45) = 19.8 ms; 256 MiB / 252 GB/s = 1.07 ms;
    # 137.6e12 x 0.15 / 16e9 = 1,290 tok/s; (14.4 - 5.0 - 1.0) GB / 2 MiB = 4,000 blocks.
    "arc-a770": {"decode_ms": 19.8, "step_ms_per_seq": 1.07,
                 "prefill_tokens_per_second": 1290, "prefix_cache_blocks": 4000,
                 "max_batch": 32, "max_batched_tokens": 2048},
}
