"""Under CI=true, a test skipped for a missing test extra fails instead.

The `test` extra (pyproject.toml) installs the peers some tests need: PyTorch
and Keras (weight import and export), libtpu (TPU compilation), Ray (the ray
launcher). Without them those tests skip, so a developer without the extras
can still run the rest; in CI, where `make test` installs them, such a skip
means a broken install, and must not pass as green. tests/conftest.py
registers these hooks; a pytest run takes them alone with `-p skip_policy`.
"""

import os
import re

import pytest

# The extra's modules that tests import with pytest.importorskip, or check for.
TEST_EXTRAS = ('torch', 'keras', 'libtpu', 'ray', 'jax_cuda12_plugin', 'nbclient')
# importorskip's reason ("could not import 'torch': No module named 'torch'"),
# and aot_test's ("libtpu is not installed (pip install ...)").
_MISSING = re.compile(r"could not import '(?P<a>[\w.]+)'|\b(?P<b>\w+) is not installed")


def missing_extra(reason: str) -> str | None:
  """The test extra a skip `reason` says is missing, or None."""
  for match in _MISSING.finditer(reason):
    module = (match['a'] or match['b']).split('.')[0]
    if module in TEST_EXTRAS:
      return module
  return None


def _fail_on_ci(report) -> None:
  if not report.skipped or os.environ.get('CI') != 'true':
    return
  reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
  module = missing_extra(reason)
  if module:
    report.outcome = 'failed'
    report.longrepr = (f'CI=true: skipped because the test extra {module!r} is missing '
                       f"({reason}); install the extras with `pip install -e '.[test]'` "
                       '(`make test` does).')


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):  # pylint: disable=unused-argument
  report = yield
  _fail_on_ci(report)
  return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):  # pylint: disable=unused-argument
  # A module-level importorskip skips the whole file at collection.
  report = yield
  _fail_on_ci(report)
  return report
