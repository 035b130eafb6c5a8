"""Quantized checkpoint inputs: FP8 block-scaled weights (DeepSeek-V3/R1, Kimi-K2, Qwen3 FP8) read as fp32.

- ``layout``: detects the layout from config.json and the tensor names/dtypes and folds each quantized weight and
  its scale into one ``QuantInfo`` source (the scales leave the plan); every inconsistency is one MergeError.
- ``dequant``: fp32(w) * scale of the element's block, per chunk, as DeepSeek's ``weight_dequant`` computes it
  (one fp32 rounding per element): the engine's reader reads the raw bytes and the scales, its compute workers
  dequantize each chunk in place before the kernel runs.
"""
