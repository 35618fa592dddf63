"""What this host's CPU has for low-precision matrix work (AVX-512 BF16, AMX), and
how a program that runs once is compiled for it.

`matrix_features()` reads the flags of /proc/cpuinfo once (Linux x86; on other
platforms, or if the file cannot be read, the answer is empty, so callers keep
their float32 choices). `models.layers` asks `has_bf16_arithmetic()` to choose
a conv lowering for `model.dtype='bfloat16'` on the CPU; the benchmark prints
the features in its header. `run_once` runs a parameter initialisation.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import jax

# The /proc/cpuinfo flags that matter here: bf16 dot products in AVX-512
# (Intel Cooper Lake and later, AMD Zen 4 and later) and the AMX tile unit
# with its bf16 multiplies (Intel Sapphire Rapids and later).
MATRIX_FLAGS = ('avx512_bf16', 'amx_tile', 'amx_bf16')
CPUINFO = '/proc/cpuinfo'
# A program that runs once (an initialisation) spends more time in LLVM's
# optimisations than it saves: without them it compiles 4-5x faster (VGG-16's
# init: 3.7 s -> 0.8 s; a width-8 VGG-11's: 2.7 s -> 0.5 s), its values within
# 2 ulp (no FMA contraction).
RUN_ONCE_OPTIONS = {'xla_backend_optimization_level': 0}


def parse_cpuinfo(text: str) -> tuple[str, frozenset[str]]:
  """(model name, the `MATRIX_FLAGS` present) of a /proc/cpuinfo text.

  The first processor's entry is taken: a host's cores are alike.
  """
  model = re.search(r'^model name\s*:\s*(.*)$', text, re.M)
  flags = re.search(r'^flags\s*:\s*(.*)$', text, re.M)
  present = set(flags.group(1).split()) if flags else set()
  return (model.group(1).strip() if model else ''), frozenset(
      f for f in MATRIX_FLAGS if f in present)


@functools.lru_cache(maxsize=None)
def _read(path: str) -> tuple[str, frozenset[str]]:
  try:
    with open(path) as f:
      return parse_cpuinfo(f.read())
  except OSError:  # Not Linux, or no /proc: unknown, so no features.
    return '', frozenset()


def model_name(path: str = CPUINFO) -> str:
  """The CPU's model name ('' if unknown)."""
  return _read(path)[0]


def matrix_features(path: str = CPUINFO) -> frozenset[str]:
  """The `MATRIX_FLAGS` this CPU has (read once; empty if unknown)."""
  return _read(path)[1]


def has_bf16_arithmetic(path: str = CPUINFO) -> bool:
  """Whether the CPU multiplies bf16 natively (AVX-512 BF16 or AMX-BF16)."""
  return bool(matrix_features(path) & {'avx512_bf16', 'amx_bf16'})


def run_once(jitted: Any, *args: Any) -> Any:
  """`jitted(*args)` (a `jax.jit` function), compiled for a single call: on the CPU
  without LLVM's optimisations (`RUN_ONCE_OPTIONS`), elsewhere as `jax.jit` does."""
  if jax.default_backend() != 'cpu':
    return jitted(*args)
  return jitted.lower(*args).compile(compiler_options=RUN_ONCE_OPTIONS)(*args)
