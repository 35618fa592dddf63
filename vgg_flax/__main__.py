"""Lists the commands of vgg_flax, one line each: `python -m vgg_flax`.

  python -m vgg_flax                  the commands
  python -m vgg_flax COMMAND ...      the same as python -m vgg_flax.COMMAND ...

Each command's line is the first line of its module's docstring, read from
the source without importing it: the description lives in one place, and the
list prints in a fraction of a second.
"""

from __future__ import annotations

import ast
import os
import runpy
import sys

COMMANDS = ('train', 'evaluate', 'predict', 'convert', 'sweep', 'aot', 'benchmark', 'summary')
USAGE = 2


def summary_line(command: str) -> str:
  """The first line of the docstring of `vgg_flax.<command>`."""
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f'{command}.py')
  with open(path, encoding='utf-8') as f:
    doc = ast.get_docstring(ast.parse(f.read())) or ''
  return doc.strip().splitlines()[0] if doc.strip() else ''


def usage() -> str:
  width = max(map(len, COMMANDS))
  return '\n'.join(
      ['usage: python -m vgg_flax.COMMAND [flags]  (--helpshort after a command lists its flags)',
       '', 'commands:'] + [f'  {c:<{width}}  {summary_line(c)}' for c in COMMANDS])


def main(argv: list[str]) -> int:
  if len(argv) < 2 or argv[1] in ('-h', '--help', '--helpshort', 'help'):
    print(usage())
    return 0
  if argv[1] not in COMMANDS:
    print(f'error: {argv[1]!r} is not a vgg_flax command; expected one of '
          f'{", ".join(COMMANDS)} (python -m vgg_flax lists them).', file=sys.stderr)
    return USAGE
  sys.argv = [f'vgg_flax.{argv[1]}'] + argv[2:]
  runpy.run_module(f'vgg_flax.{argv[1]}', run_name='__main__', alter_sys=True)
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv))
