"""Every shell command and Python snippet of README.md and docs/*.md, run as written.

Each page runs top to bottom in a folder of its own (configs/ linked in), with
.venv's `python` first on PATH; a block that fails fails the page, naming the
block's line. A fence tagged `sh` or `python` runs; others (outputs, trees) do
not. An HTML comment right above a fence (invisible when the page is
rendered) says how the suite runs it at tiny scale, and nothing else changes:

  <!-- test: tiny -->              TINY sizes after each `vgg_flax.train` command
  <!-- test: tiny imagenet -->     the same, on the digits, for the ImageNet configs
  <!-- test: tiny folder -->       the same on an image folder (all of it)
  <!-- test: setup images ... -->  the FIXTURES the block reads, made first
  <!-- test: sub 'A' 'B' -->       text A replaced by B before the block runs
  <!-- test: given 'CODE' -->      Python run before the snippet (what the page assumes)
  <!-- test: skip REASON -->       not run: what it needs that no test machine has

Directives combine with ';'. The skipped blocks are listed in SKIPPED below, so
a new one is a visible change.
"""

import dataclasses
import os
import re
import shlex
import subprocess
import sys
import time

import pytest

from helpers import ROOT
import docs_fixtures
import warm_python

PAGES = ['README.md'] + sorted(
    os.path.join('docs', f) for f in os.listdir(os.path.join(ROOT, 'docs')) if f.endswith('.md'))
RUN = ('sh', 'python')
# A VGG of width 8 on 64 digits, one epoch, lax.conv (the fastest to compile).
TINY = ('--config.model.width=8 --config.model.fc_dim=32 --config.model.conv_impl=xla '
        '--config.batch_size=16 --config.num_epochs=1 --config.log_every_steps=2')
DIGITS = "'--config.train_split=train[:64]'"  # 4 steps (the image folders are small).
# The ImageNet recipe's configs, on the digits at 32 px.
IMAGENET = ('--config.dataset=digits --config.data_dir=$DIGITS --config.image_size=32 '
            '--config.input.scale_min=32 --config.input.scale_max=36 '
            "--config.input.color_shift=0 '--config.input.mean=(77.7,)' '--config.input.std=(82.5,)' "
            "--config.eval_batch_size=40 '--config.eval_split=test[:40]'")
SKIPPED = {  # page: the number of blocks it does not run.
    'README.md': 0,
    'docs/pods.md': 2,
    'docs/sweeps.md': 2,
    'docs/testing.md': 1,
}


@dataclasses.dataclass
class Block:
  page: str
  line: int  # Of the opening fence, 1-based.
  lang: str
  code: str
  directives: list[list[str]]


def blocks(page: str) -> list[Block]:
  """The fenced blocks of `page`, with the directives of the comment above each."""
  lines = open(os.path.join(ROOT, page), encoding='utf-8').read().splitlines()
  found, i = [], 0
  while i < len(lines):
    fence = re.match(r'^(\s*)```(\w*)\s*$', lines[i])
    if not fence:
      i += 1
      continue
    indent, lang, start = fence.group(1), fence.group(2), i
    body = []
    i += 1
    while not re.match(rf'^{indent}```\s*$', lines[i]):
      body.append(lines[i][len(indent):])
      i += 1
    i += 1
    comment = lines[start - 1].strip() if start else ''
    directive = re.fullmatch(r'<!-- test: (.*) -->', comment)
    directives = _directives(directive.group(1)) if directive else []
    found.append(Block(page, start + 1, lang, '\n'.join(body) + '\n', directives))
  return found


def _directives(text: str) -> list[list[str]]:
  """'sub "a" "b"; tiny' -> [['sub', 'a', 'b'], ['tiny']] (a quoted ';' stays)."""
  lexer = shlex.shlex(text, posix=True, punctuation_chars=';')
  lexer.whitespace_split = True
  directives = [[]]
  for token in lexer:
    if token == ';':
      directives.append([])
    else:
      directives[-1].append(token)
  return [d for d in directives if d]


def prepared(block: Block, folder: str, env: dict[str, str] | None = None) -> str | None:
  """The block's code as the suite runs it; None if skipped. Makes its fixtures, whose
  commands run in `env`."""
  code = block.code
  for words in block.directives:
    verb, args = words[0], words[1:]
    if verb == 'skip':
      assert args, f'{block.page}:{block.line}: skip needs a reason'
      return None
    if verb == 'setup':
      for name in args:
        getattr(docs_fixtures, name)(folder, env)
    elif verb == 'sub':
      old, new = args
      assert old in code, f'{block.page}:{block.line}: {old!r} is not in the block'
      code = code.replace(old, new)
    elif verb == 'given':
      code = args[0] + '\n' + code
    elif verb == 'tiny':
      assert set(args) <= {'imagenet', 'folder'}, f'{block.page}:{block.line}: tiny {args}'
      extra = ' '.join([TINY] + ([] if 'folder' in args else [DIGITS]) +
                       ([IMAGENET] if 'imagenet' in args else []))
      code = _after_commands(code, extra)
    else:
      raise AssertionError(f'{block.page}:{block.line}: unknown directive {verb!r}')
  return code


def _after_commands(code: str, extra: str) -> str:
  """`extra` after the arguments of each `python -m vgg_flax.train` (or `make train`)."""
  out, lines = [], code.split('\n')
  i = 0
  while i < len(lines):
    command = [lines[i]]
    while command[-1].rstrip().endswith('\\'):
      i += 1
      command.append(lines[i])
    text = '\n'.join(command)
    if re.search(r'-m vgg_flax\.train\b', text):
      text, comment = re.fullmatch(r'(.*?)(\s+#.*)?', text, re.S).groups()
      text += ' ' + extra + (comment or '')
    elif re.match(r'\s*make train\b', text):
      given = re.search(r"ARGS='([^']*)'", text)  # make passes ARGS to its recipe's shell.
      args = f'ARGS="{extra} {given.group(1) if given else ""}"'
      text = (text.replace(given.group(0), args) if given else
              text.replace('make train', f'make train {args}', 1))
    out.append(text)
    i += 1
  return '\n'.join(out)


@dataclasses.dataclass
class Runner:
  env: dict[str, str]  # The commands' environment: the warm python first on PATH.
  python: str  # That python (tests/warm_python.py).


@pytest.fixture(scope='session')
def runner(tmp_path_factory):
  """One warm python for every page this worker runs, and their digits, prepared on first use."""
  env = dict(os.environ)
  env.pop('PYTHONPATH', None)  # The suite's own (tests/mutations) stays out.
  env['DIGITS'] = env['TFDS_DATA_DIR'] = str(tmp_path_factory.mktemp('digits'))
  env['VGG_FLAX_CACHE_DIR'] = str(tmp_path_factory.mktemp('vgg_flax_cache'))
  with warm_python.WarmPython(env) as warm:
    env['PATH'] = os.pathsep.join([warm, os.path.dirname(sys.executable), env['PATH']])
    yield Runner(env, os.path.join(warm, 'python'))


def run_page(page: str, folder: str, runner: Runner) -> list[int]:
  """Runs `page`'s blocks in `folder`; returns the lines of the skipped ones."""
  for name in ('configs', 'Makefile', 'pyproject.toml'):
    os.symlink(os.path.join(ROOT, name), os.path.join(folder, name))
  # The suite's venv, with install stamps of its own: `make train` here must
  # never reinstall the package from this folder.
  venv, here = os.path.dirname(os.path.dirname(sys.executable)), os.path.join(folder, '.venv')
  os.mkdir(here)
  for name in os.listdir(venv):
    if not name.startswith(('.installed', 'bin')):
      os.symlink(os.path.join(venv, name), os.path.join(here, name))
  os.mkdir(os.path.join(here, 'bin'))  # Its python the warm one: `make train` uses .venv/bin/python.
  for name in os.listdir(os.path.join(venv, 'bin')):
    target = runner.python if name == 'python' else os.path.join(venv, 'bin', name)
    os.symlink(target, os.path.join(here, 'bin', name))
  for stamp in ('.installed', '.installed-test'):
    open(os.path.join(here, stamp), 'w').close()
  runs, skipped = [], []
  for block in blocks(page):
    if block.lang not in RUN:
      assert not block.directives, f'{page}:{block.line}: directives on a block that does not run'
    elif any(words[0] == 'skip' for words in block.directives):
      assert prepared(block, folder) is None
      skipped.append(block.line)
    else:
      runs.append(block)
  for block in runs:
    code = prepared(block, folder, runner.env)
    argv = ['bash', '-e', '-o', 'pipefail', '-c', code] if block.lang == 'sh' else [
        runner.python, '-c', code]
    start = time.monotonic()
    result = subprocess.run(argv, cwd=folder, env=runner.env, capture_output=True, text=True,
                            timeout=600, check=False)
    print(f'{block.page}:{block.line}: {time.monotonic() - start:.1f} s')  # pytest -s: the costly ones.
    assert result.returncode == 0, (
        f'{block.page}:{block.line}: exit {result.returncode}\n{code}\n--- output:\n'
        f'{(result.stdout + result.stderr)[-4000:]}')
  return skipped


@pytest.mark.parametrize('page', PAGES)
def test_every_command_and_snippet_of_the_page_runs(page, tmp_path, runner):
  skipped = run_page(page, str(tmp_path), runner)
  assert len(skipped) == SKIPPED.get(page, 0), (page, skipped)


def test_the_runner_sees_every_block_and_fails_a_broken_one(tmp_path, runner):
  page = tmp_path / 'page.md'
  page.write_text('<!-- test: sub "exit 3" "true" -->\n```sh\nexit 3\n```\n\n'
                  '```\nnot run\n```\n\n```python\nraise SystemExit(4)\n```\n')
  found = blocks(str(page))
  assert [(b.line, b.lang) for b in found] == [(2, 'sh'), (6, ''), (10, 'python')]
  assert prepared(found[0], str(tmp_path)) == 'true\n'
  with pytest.raises(AssertionError, match=r'page.md:10: exit 4'):
    run_page(str(page), str(tmp_path), runner)


@pytest.mark.parametrize('page', PAGES)
def test_every_relative_link_of_the_page_resolves(page):
  text = open(os.path.join(ROOT, page), encoding='utf-8').read()
  missing = [target for target in re.findall(r'\]\(([^)#\s:]+)(?:#[^)]*)?\)', text)
             if not os.path.exists(os.path.join(ROOT, os.path.dirname(page), target))]
  assert missing == [], missing
