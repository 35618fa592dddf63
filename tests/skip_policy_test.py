"""tests/skip_policy.py: under CI=true a skip for a missing test extra fails."""

import os
import re
import subprocess
import sys
import textwrap

import skip_policy

TESTS = os.path.dirname(os.path.abspath(__file__))

# Extras made missing by a None in sys.modules: `import torch` then raises
# ModuleNotFoundError, as without the package.
SAMPLES = {
    'extras_test.py': '''
        import sys
        import pytest

        def test_torch_missing():
          sys.modules['torch'] = None
          pytest.importorskip('torch')

        def test_libtpu_missing():  # aot_test's own check.
          pytest.skip("libtpu is not installed (pip install -e '.[tpu]')")

        def test_another_module_missing():
          pytest.importorskip('vgg_flax_no_such_module')

        def test_another_reason():
          pytest.skip('needs 8 devices')
        ''',
    'ray_test.py': '''
        import sys
        import pytest

        sys.modules['ray'] = None
        ray = pytest.importorskip('ray')  # At module level: skipped at collection.

        def test_uses_ray():
          pass
        ''',
}


def _pytest(tmp_path, ci):
  for name, source in SAMPLES.items():
    (tmp_path / name).write_text(textwrap.dedent(source))
  env = {k: v for k, v in os.environ.items() if k != 'CI'}
  env.update(PYTHONPATH=TESTS, PYTEST_DISABLE_PLUGIN_AUTOLOAD='1', **({'CI': ci} if ci else {}))
  # As CI runs it, but on through the collection error to see every outcome.
  run = subprocess.run(
      [sys.executable, '-m', 'pytest', '-p', 'skip_policy', '-p', 'no:cacheprovider', '-q',
       '-rfEs', '--continue-on-collection-errors', str(tmp_path)],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
  outcomes = {}
  for outcome, where in re.findall(r'^(FAILED|ERROR|SKIPPED) (?:\[\d+\] )?(\S+)', run.stdout,
                                   re.MULTILINE):
    outcomes[where.split('::')[-1].rstrip(':')] = outcome
  return run, outcomes


def test_ci_fails_a_skip_for_a_missing_test_extra_and_only_that(tmp_path):
  run, outcomes = _pytest(tmp_path, ci='true')
  assert run.returncode == 1, run.stdout
  assert outcomes == {'test_torch_missing': 'FAILED', 'test_libtpu_missing': 'FAILED',
                      'ray_test.py': 'ERROR', 'extras_test.py:13': 'SKIPPED',
                      'extras_test.py:16': 'SKIPPED'}, run.stdout
  assert ("CI=true: skipped because the test extra 'torch' is missing (Skipped: could not "
          "import 'torch'") in run.stdout
  assert "CI=true: skipped because the test extra 'ray' is missing" in run.stdout


def test_without_ci_a_missing_extra_is_a_skip(tmp_path):
  for ci in (None, 'false'):
    run, outcomes = _pytest(tmp_path, ci=ci)
    assert run.returncode == 0, run.stdout
    assert outcomes == {'ray_test.py:6': 'SKIPPED', 'extras_test.py:7': 'SKIPPED',
                        'extras_test.py:10': 'SKIPPED', 'extras_test.py:13': 'SKIPPED',
                        'extras_test.py:16': 'SKIPPED'}, run.stdout


def test_the_suite_runs_under_the_policy(request):
  hooks = [getattr(p, 'pytest_make_collect_report', None)
           for p in request.config.pluginmanager.get_plugins()]
  assert skip_policy.pytest_make_collect_report in hooks
  assert skip_policy.missing_extra("could not import 'keras.src': No module named 'keras'") == (
      'keras')
  assert skip_policy.missing_extra("could not import 'scipy': No module named 'scipy'") is None
