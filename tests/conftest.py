"""Shared test set-up: quiet TensorFlow, a shared XLA compilation cache, no test
touches ~/tensorflow_datasets."""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# libtpu is installed for vgg_flax.aot's tests; without this every JAX process
# (and every trainer subprocess, which inherits it) would try to open a TPU.
# Compiling for a TPU topology and jax.export for 'tpu' work without the backend.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Many tests (and the training subprocesses they start, which inherit the
# environment) compile the same tiny train step: compile it once per session.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), '.pytest_cache', 'jax'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
# The suite compiles some 150 distinct train, eval and init steps (and hundreds
# of small programs), tiny and run for a few steps each: at LLVM's -O1 instead of
# XLA's default -O2 they compile 15-20% faster and run as fast, with the same
# semantics (no fast-math either way); the suite's CPU time drops by a tenth.
# Commands run outside the suite (`make train`, the benchmark) keep XLA's default.
SUITE_XLA_FLAG = '--xla_backend_optimization_level=1'
if SUITE_XLA_FLAG not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {SUITE_XLA_FLAG}".strip()

import pytest

# Under CI=true, a skip for a missing test extra (torch, keras, libtpu, ray) fails.
from skip_policy import pytest_make_collect_report  # pylint: disable=unused-import
from skip_policy import pytest_runtest_makereport  # pylint: disable=unused-import


@pytest.fixture(scope='session', autouse=True)
def _warm_python():
  """One warm interpreter per worker for the tests' CLI commands (`helpers.python()`)."""
  import helpers  # pylint: disable=g-import-not-at-top
  import warm_python  # pylint: disable=g-import-not-at-top
  with warm_python.WarmPython(dict(os.environ)) as folder:
    helpers._WARM['python'] = os.path.join(folder, 'python')  # pylint: disable=protected-access
    yield
    helpers._WARM.clear()  # pylint: disable=protected-access


@pytest.fixture(autouse=True)
def _isolated_tfds_dir(tmp_path, tmp_path_factory, monkeypatch):
  monkeypatch.setenv('TFDS_DATA_DIR', str(tmp_path / 'tensorflow_datasets'))
  # The image-folder check's cache (not under tmp_path: that may be an image root).
  monkeypatch.setenv('VGG_FLAX_CACHE_DIR', str(tmp_path_factory.mktemp('vgg_flax_cache')))


@pytest.fixture(scope='session')
def digits(tmp_path_factory):
  """The built-in digits, built once per test process (about 1 CPU-s), for the tests
  that only read them."""
  import helpers  # pylint: disable=g-import-not-at-top
  from vgg_flax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  path = str(tmp_path_factory.mktemp('digits'))
  input_pipeline.get_builder(helpers.tiny_config(path))
  return path


@pytest.fixture(scope='session')
def gcs_server():
  """A fake-gcs-server on 127.0.0.1 for this test process (each xdist worker has one).

  STORAGE_EMULATOR_HOST, the one variable a user sets, points at it for the
  rest of the session: gcsfs, tensorstore and the trainer subprocesses that
  tests start read it from the environment. It only affects gs:// paths.
  """
  import gcs  # pylint: disable=g-import-not-at-top  # tests/gcs.py
  from vgg_flax.io import clients  # pylint: disable=g-import-not-at-top
  server = gcs.GcsServer().start()
  saved = os.environ.get('STORAGE_EMULATOR_HOST')
  os.environ['STORAGE_EMULATOR_HOST'] = server.url
  clients.configure()
  try:
    yield server
  finally:
    server.stop()
    if saved is None:
      os.environ.pop('STORAGE_EMULATOR_HOST', None)
    else:
      os.environ['STORAGE_EMULATOR_HOST'] = saved


@pytest.fixture
def gcs_bucket(gcs_server, request):
  """gs://URL of a new, empty bucket on the session's server."""
  import re  # pylint: disable=g-import-not-at-top
  name = re.sub(r'[^a-z0-9]+', '-', request.node.name.lower()).strip('-')[:40]
  return gcs_server.create_bucket(f'{name}-{os.urandom(4).hex()}')


# The longest tests (a minute or more each on 2 cores) go first, so that the two
# workers of `make test` do not end with one of them still running one alone.
LONGEST_FIRST = ('docs_test.py::test_every_command', 'test_a_dead_process_stops',
                 'test_a_frozen_bucket_stops_a_trainer', 'test_ray_runs_side_by_side')


def pytest_collection_modifyitems(config, items):  # pylint: disable=unused-argument
  """The longest tests first; and under a mutation (tests/mutations/sitecustomize.py)
  every `resume` test must fail on an assertion: one that passes cannot tell a
  resume from a restart."""
  items.sort(key=lambda item: not any(name in item.nodeid for name in LONGEST_FIRST))
  mutation = os.environ.get('VGG_FLAX_MUTATION')
  if not mutation:
    return
  for item in items:
    if item.get_closest_marker('resume'):
      item.add_marker(pytest.mark.xfail(
          strict=True, raises=AssertionError,
          reason=f'VGG_FLAX_MUTATION={mutation}: this test must fail'))
