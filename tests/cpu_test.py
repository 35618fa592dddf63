"""Tests for vgg_flax.runtime.cpu: the CPU's bf16 matrix features from /proc/cpuinfo."""

from vgg_flax.runtime import cpu

# Trimmed /proc/cpuinfo entries of the three kinds of host this project runs on.
ZEN3 = 'model name\t: AMD EPYC 7B13\nflags\t\t: fpu avx2 fma\n\nmodel name\t: AMD EPYC 7B13\n'
ZEN4 = ('model name\t: AMD EPYC 9B14\n'
        'flags\t\t: fpu avx2 avx512f avx512_vnni avx512_bf16 avx512_vp2intersect\n')
SAPPHIRE = ('model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz\n'
            'flags\t\t: fpu avx512f avx512_bf16 amx_bf16 avx512_fp16 amx_tile amx_int8\n')


def test_parse_cpuinfo_finds_model_and_matrix_flags():
  assert cpu.parse_cpuinfo(ZEN3) == ('AMD EPYC 7B13', frozenset())
  assert cpu.parse_cpuinfo(ZEN4) == ('AMD EPYC 9B14', frozenset({'avx512_bf16'}))
  assert cpu.parse_cpuinfo(SAPPHIRE)[1] == {'avx512_bf16', 'amx_bf16', 'amx_tile'}
  assert cpu.parse_cpuinfo('') == ('', frozenset())  # Not Linux x86: nothing known.


def test_has_bf16_arithmetic_reads_the_file_once(tmp_path):
  path = tmp_path / 'cpuinfo'
  path.write_text(ZEN4)
  assert cpu.has_bf16_arithmetic(str(path))
  path.write_text(ZEN3)  # Read once: the answer stays the first one.
  assert cpu.has_bf16_arithmetic(str(path))
  assert cpu.model_name(str(path)) == 'AMD EPYC 9B14'
  assert not cpu.has_bf16_arithmetic(str(tmp_path / 'missing'))
  assert cpu.matrix_features(str(tmp_path / 'missing')) == frozenset()
