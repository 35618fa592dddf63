"""Issue 13: every CLI answers the user's mistakes in one `error:` line, exit 2 or 1.

Each case is a real `python -m vgg_flax.<cli> ...` run, with its whole output
asserted. Starting ~15 interpreters would take a minute of imports, so one
driver process imports the CLIs once and forks a child per case, which runs
the module as `__main__` (as `python -m` does) with its own argv and stderr.
"""

import json
import os
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import pytest

from vgg_flax.io import storage
from vgg_flax.runtime import cli
from vgg_flax.runtime import errors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_DRIVER = textwrap.dedent('''
    import json, os, runpy, sys, warnings
    # runpy warns that the module was imported before: on purpose, to fork it warm.
    warnings.filterwarnings('ignore', message='.*found in sys.modules after import')
    import vgg_flax.train, vgg_flax.evaluate, vgg_flax.predict, vgg_flax.summary  # noqa
    import vgg_flax.sweep, vgg_flax.benchmark, vgg_flax.aot  # noqa
    results = []
    for module, argv, env in json.load(sys.stdin):
      out = os.open(os.path.join(os.environ['CLI_OUT'], f'{len(results)}.txt'),
                    os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
      pid = os.fork()
      if pid == 0:  # The child: `python -m module argv...`, stdout and stderr to `out`.
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.environ.update(env)
        sys.argv = [module] + argv
        code = 0
        try:
          runpy.run_module(module, run_name='__main__', alter_sys=True)
        except SystemExit as e:
          code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:  # A traceback, as the interpreter would print it.
          import traceback
          traceback.print_exc()
          code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
      os.close(out)
      results.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
    print(json.dumps(results))
''')


def _cases(tmp):
  """(module, argv, env, exit code, the whole expected output)."""
  workdir = os.path.join(tmp, 'run')  # A run whose config.json was cut short.
  os.makedirs(workdir)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write('{"model": {"depth": 1')
  with open(os.path.join(workdir, 'dataset.json'), 'w') as f:
    f.write('{}')
  missing = os.path.join(tmp, 'nowhere')
  w = f'--workdir={tmp}/new'
  return [
      ('vgg_flax.train', [w, '--config.batch_size=0'], {}, 2,
       'error: config.batch_size=0 is not allowed: must be > 0.'),
      ('vgg_flax.train', [w, '--config.model.dpth=13'], {}, 2,
       "error: --config.model.dpth: the config has no field 'model.dpth'. "
       'Did you mean config.model.depth?'),
      ('vgg_flax.train', [w, '--config=configs/nope.py'], {}, 2,
       'error: --config=configs/nope.py: no such config file (see configs/ for the shipped '
       'ones).'),
      ('vgg_flax.train', [w, '--config.batch_size=abc'], {}, 2,
       "error: flag --config.batch_size=abc: invalid literal for int() with base 10: 'abc'"),
      ('vgg_flax.train', [], {}, 2, 'error: --workdir is required.'),
      ('vgg_flax.train', ['--wrkdir=x'], {}, 2,
       'error: --wrkdir: no such flag. Did you mean --workdir? (--helpshort lists them.)'),
      ('vgg_flax.train', [w, '--config.model.depth=7'], {}, 2,
       'error: config.model.depth=7 is not allowed: expected one of 11, 13, 16, 19.'),
      ('vgg_flax.train', [w, "--config.dataset=image_folder", f'--config.data_dir={missing}'],
       {}, 1, f'error: image folder {missing} (config.data_dir) does not exist; expected '
       '<root>/<class>/<image> with config.validation_split or config.eval_data_dir, or '
       '<root>/train/<class>/<image> and <root>/test/<class>/<image>.'),
      ('vgg_flax.train', [f'--workdir={workdir}'], {}, 1,
       f'error: {workdir}/config.json is not valid JSON (Expecting \',\' delimiter: line 1 '
       'column 22 (char 21): a write cut short?); it records the run\'s config: restore it '
       'from a copy of the run, or use another --workdir.'),
      ('vgg_flax.evaluate', [f'--workdir={missing}'], {}, 1,
       f'error: {missing}/config.json does not exist: is {missing} a vgg_flax training '
       'workdir?'),
      ('vgg_flax.evaluate', [f'--workdir={workdir}'], {}, 1,
       f'error: {workdir}/config.json is not valid JSON (Expecting \',\' delimiter: line 1 '
       "column 22 (char 21): a write cut short?); it records the run's config: restore it "
       'from a copy of the run, or use another --workdir.'),
      ('vgg_flax.summary', ['--config=configs/vgg16.py', '--config.model.widht=8'], {}, 2,
       "error: --config.model.widht: the config has no field 'model.widht'. "
       'Did you mean config.model.width?'),
      ('vgg_flax.sweep', [f'--config={missing}.py', f'--workdir={tmp}/sweep'], {}, 2,
       f'error: --config={missing}.py: no such config file (see configs/ for the shipped '
       'ones).'),
      ('vgg_flax.benchmark', ['--workloads=32'], {}, 2,
       "error: argument --workloads: --workloads='32': expected SIZExBATCH[,SIZExBATCH...], "
       'e.g. 32x128,224x8 (--help lists the flags).'),
      ('vgg_flax.aot', ['--config=configs/vgg16.py', '--topology=v9:1x1'], {}, 2, None),
  ]


def run_clis(commands, out_dir, timeout=300):
  """Runs [(module, argv, env)] as `python -m module argv...`, one after the other, in
  children forked from one warm driver; returns their exit codes and whole outputs."""
  env = dict(os.environ, CLI_OUT=str(out_dir))
  done = subprocess.run([sys.executable, '-c', _DRIVER], cwd=ROOT, env=env, text=True,
                        capture_output=True, timeout=timeout, input=json.dumps(commands))
  assert done.returncode == 0, done.stderr[-3000:]
  codes = json.loads(done.stdout.strip().splitlines()[-1])
  return codes, [(out_dir / f'{i}.txt').read_text() for i in range(len(commands))]


@pytest.fixture(scope='module')
def outputs(tmp_path_factory):
  tmp = str(tmp_path_factory.mktemp('cli'))
  cases = _cases(tmp)
  codes, texts = run_clis([(m, a, e) for m, a, e, _, _ in cases],
                          tmp_path_factory.mktemp('outputs'))
  return cases, codes, texts


def test_user_errors_are_one_line_without_a_traceback(outputs):
  cases, codes, texts = outputs
  for (module, argv, _, code, expected), got_code, text in zip(cases, codes, texts):
    where = f'{module} {" ".join(argv)}:\n{text}'
    assert 'Traceback' not in text, where
    assert got_code == code, where
    if expected is None:  # Only the form: one line naming the flag.
      assert len(text.strip().splitlines()) == 1 and text.startswith('error: --topology='), where
    else:
      assert text.strip() == expected, where


def test_exit_codes_tell_the_users_errors_from_bugs(tmp_path):
  assert cli.exit_code(errors.UsageError('x')) == cli.USAGE
  with pytest.raises(FileNotFoundError) as missing:
    open(tmp_path / 'nope', encoding='utf-8')  # pylint: disable=consider-using-with
  assert cli.exit_code(missing.value) == cli.FAILURE
  damaged = tmp_path / 'result.json'
  damaged.write_text('{"step": ')
  with pytest.raises(ValueError) as product:  # A `raise` of the product: the user's.
    storage.read_json(damaged)
  assert cli.exit_code(product.value) == cli.FAILURE
  with pytest.raises(TypeError) as bug:  # Raised inside JAX: a bug, keeps its traceback.
    jnp.zeros((2, 3)).reshape(4)
  assert cli.exit_code(bug.value) is None
  # A failed operation in a product module (not a `raise` statement): a bug.
  code = compile('a, b = [1]', os.path.join(os.path.dirname(cli.__file__), 'step.py'), 'exec')
  with pytest.raises(ValueError) as unpacking:
    exec(code, {})  # pylint: disable=exec-used
  assert cli.exit_code(unpacking.value) is None


def test_a_cut_short_last_metrics_row_is_left_out_and_others_are_named(tmp_path):
  from vgg_flax.training import reporting  # pylint: disable=g-import-not-at-top
  path = tmp_path / 'metrics.jsonl'
  path.write_text('{"step": 1, "train_loss": 2.0}\n{"step": 2, "train_l')
  assert reporting.read_metrics(path) == [{'step': 1, 'train_loss': 2.0}]
  path.write_text('{"step": 1, "tr\n{"step": 2, "train_loss": 1.0}\n')
  with pytest.raises(ValueError, match=r'metrics.jsonl line 1 is not valid JSON'):
    reporting.read_metrics(path)
