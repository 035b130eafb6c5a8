"""Quantized checkpoint inputs read as fp32: FP8 block-scaled (DeepSeek-V3/R1, Kimi-K2, Qwen3 FP8), compressed-tensors
FP8 (per tensor, channel or block) and MXFP4 (gpt-oss experts).

- ``layout``: detects the layout from config.json and the tensor names/dtypes and folds each quantized weight and
  its scales into one ``QuantInfo`` source (the scales leave the plan); every inconsistency is one MergeError.
- ``mxfp4``: gpt-oss's ``*_blocks`` + ``*_scales``, named, shaped and valued as transformers dequantizes them
  (apo_kernels' compiled pass where built, else numpy lines; on CUDA a Triton kernel).
- ``dequant``: fp32(w) * scale of the element's block, per chunk, as DeepSeek's ``weight_dequant`` computes it
  (one fp32 rounding per element): the engine's reader reads the raw bytes and the scales; its compute workers hand
  a chunk's raw bytes to apo_kernels' compiled pass, which dequantizes them tile by tile inside the extrapolation,
  or (parts of packed tensors, no compiled pass, torch kernels) dequantize the chunk in place before the kernel.
"""
