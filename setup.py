"""The compiled CPU pass (apo_kernels._cpass), built at install; pyproject.toml holds everything else.

optional=True: without a C compiler the install still succeeds and the merge computes with the numpy twin.
-ffp-contract=off and no -ffast-math keep every rounding of the contract (no fused multiply-add); no -march, so
that a wheel runs on any CPU of its platform (the x86-64 build adds AVX2 clones, and an AVX-512 one of the fp8
decode, chosen at run time).
"""

import sys

from setuptools import Extension, setup

flags = [] if sys.platform == "win32" else ["-O3", "-ffp-contract=off", "-fno-fast-math", "-fno-strict-aliasing"]
setup(
    ext_modules=[
        Extension("apo_kernels._cpass", ["apo_kernels/_cpass.c"], extra_compile_args=flags, optional=True),
    ]
)
