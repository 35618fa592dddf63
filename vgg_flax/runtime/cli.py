"""What every command line does around its `main`: one-line errors for the user's mistakes.

  if __name__ == '__main__':
    cli.run(main)

A mistake in the user's input (a flag, a config field or value, a missing or
unreadable file, unprepared data, a workdir of another model, a bad weight
file) prints `error: ...` on stderr and exits with 2 (usage: flags and
config) or 1 (anything else), without a traceback. Errors that are bugs keep
their traceback; `--verbosity=1` (or VGG_FLAX_TRACEBACK=1) shows it for any
error, for a bug report.

The product's own errors are the ones its modules raise with a `raise`
statement (ValueError, OSError, ... with a message written for the user); the
same types raised by a failed operation, or inside JAX, Flax or TensorFlow,
are bugs, except missing or unreadable files.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
import traceback
from typing import Any, Callable, Sequence

from absl import app
from absl import flags

from vgg_flax.runtime import errors

_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Raised by the product's own modules with a message for the user.
_PRODUCT_ERRORS = (ValueError, KeyError, OSError, ImportError, RuntimeError, ArithmeticError)
# The user's files, wherever they are opened.
_FILE_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
USAGE, FAILURE = 2, 1


def exit_code(error: BaseException) -> int | None:
  """2 or 1 for an error the user caused, None for a bug (keeps its traceback)."""
  if isinstance(error, (errors.UsageError, app.UsageError, flags.Error)):
    return USAGE
  if isinstance(error, _FILE_ERRORS):
    return FAILURE
  if isinstance(error, _PRODUCT_ERRORS) and not isinstance(error, NotImplementedError):
    # Raised by a `raise` statement of the product (not, say, a failed unpacking).
    where = traceback.extract_tb(error.__traceback__)[-1]
    if (os.path.abspath(where.filename).startswith(_PACKAGE + os.sep)
        and (where.line or '').lstrip().startswith('raise')):
      return FAILURE
  return None


def message(error: BaseException) -> str:
  """The error's text as one short paragraph."""
  text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
  if isinstance(error, OSError) and error.filename and str(error.filename) not in text:
    text = f'{error.filename}: {error.strerror or text}'
  return text.strip() or type(error).__name__


def _show_traceback() -> bool:
  if os.environ.get('VGG_FLAX_TRACEBACK', '') not in ('', '0'):
    return True
  return flags.FLAGS.is_parsed() and flags.FLAGS['verbosity'].value >= 1


def fail(text: str, code: int) -> None:
  print(f'error: {text}', file=sys.stderr)
  sys.exit(code)


def _config_fields(argv: Sequence[str]) -> list[str]:
  """The dotted fields of the --config file's config, for 'did you mean'."""
  try:
    config = flags.FLAGS['config'].value
  except Exception:  # pylint: disable=broad-except  # Only a hint.
    return []
  fields = []

  def walk(node: Any, prefix: str) -> None:
    for key, value in node.items():
      fields.append(prefix + key)
      if hasattr(value, 'items'):
        walk(value, f'{prefix}{key}.')
  walk(config, '')
  del argv
  return fields


def _flag_error(error: flags.Error, argv: Sequence[str]) -> str:
  """absl's flag errors, said in the user's terms."""
  text = str(error).strip().splitlines()[0]
  unknown = re.match(r"Unknown command line flag '([^']+)'", text)
  if unknown and unknown.group(1).startswith('config.'):
    field = unknown.group(1)[len('config.'):]
    fields = _config_fields(argv)
    close = difflib.get_close_matches(field, fields, n=3)
    hint = f" Did you mean {', '.join('config.' + c for c in close)}?" if close else ''
    return f'--config.{field}: the config has no field {field!r}.{hint}'
  if unknown:
    close = re.search(r'Did you mean: (.+?) ?\?', text)
    hint = f" Did you mean --{close.group(1).replace(', ', ', --')}?" if close else ''
    return f'--{unknown.group(1)}: no such flag.{hint} (--helpshort lists them.)'
  required = re.match(r'flag --(\w+)=None: Flag --\w+ must have a value other than None', text)
  if required:
    return f'--{required.group(1)} is required.'
  if 'Error whilst parsing config file' in str(error):
    # The config module's own exception: its last line, not the traceback.
    last = [l for l in str(error).strip().splitlines() if l.strip()][-1]
    return f'{text.split(":")[0]}: {last.strip()}'
  return text


def _parse_flags(argv: Sequence[str]) -> list[str]:
  """absl's flag parsing, with one-line errors (the `flags_parser` of app.run)."""
  for arg in argv[1:]:  # A missing config file: named before absl's lazy loading hides it.
    m = re.fullmatch(r'--config=([^:]+)(:.*)?', arg)
    if m and not os.path.exists(m.group(1)):
      fail(f'--config={m.group(1)}: no such config file (see configs/ for the shipped ones).',
           USAGE)
  try:
    return flags.FLAGS(list(argv))
  except flags.Error as e:
    fail(_flag_error(e, argv), USAGE)
  except OSError as e:  # ml_collections: the config file failed to load.
    fail(f'--config: {str(e).strip().splitlines()[-1].strip()}', USAGE)
  except (AttributeError, KeyError) as e:  # An override of no field, once the file loads.
    text = _unknown_field(e, argv)
    if text is None:
      raise
    fail(text, USAGE)
  raise AssertionError('unreachable')


def _unknown_field(error: Exception, argv: Sequence[str]) -> str | None:
  """ml_collections' error for a --config.FIELD override of no field, as one line."""
  texts, e = [], error
  while e is not None:  # AttributeError(KeyError(hint)) <- KeyError(hint) <- KeyError(key)
    texts += [e.args[0]] if e.args and isinstance(e.args[0], str) else []
    e = e.__context__
  if not texts or not re.fullmatch(r'\w+', texts[-1]):
    return None
  key, text = texts[-1], '\n'.join(texts)
  for arg in argv[1:]:
    field = arg[len('--config.'):].split('=', 1)[0] if arg.startswith('--config.') else ''
    if key in field.split('.'):
      hint = re.search(r'Did you mean "([^"]+)" instead', text)
      suggestion = (f' Did you mean config.{field.rsplit(key, 1)[0]}{hint.group(1)}?'
                    if hint else '')
      return f'--config.{field}: the config has no field {field!r}.{suggestion}'
  return None


def run(main: Callable[[list[str]], Any], define_flags: Callable[[], None] | None = None,
        argv: Sequence[str] | None = None) -> None:
  """`absl.app.run(main)` with the errors above.

  Args:
    main: the command's main(argv).
    define_flags: defines the command's flags. ml_collections reads the
      --config.FIELD overrides while defining --config, so a field that does not
      exist fails here, before absl parses anything.
    argv: default sys.argv.
  """
  if define_flags is not None:
    try:
      define_flags()
    except (AttributeError, KeyError) as e:
      text = _unknown_field(e, sys.argv if argv is None else argv)
      if text is None or _show_traceback():
        raise
      fail(text, USAGE)

  app.run(lambda args: call(main, args), argv=list(argv) if argv is not None else None,
          flags_parser=_parse_flags)


def call(main: Callable[..., Any], *args: Any) -> Any:
  """`main(*args)`, answering the user's errors in one line (for CLIs without absl)."""
  try:
    return main(*args)
  except KeyboardInterrupt:
    if _show_traceback():
      raise
    print('error: interrupted.', file=sys.stderr)
    sys.exit(130)
  except Exception as e:  # pylint: disable=broad-except
    code = exit_code(e)
    if code is None or _show_traceback():
      raise
    fail(message(e), code)


class ArgumentParser(argparse.ArgumentParser):
  """argparse for the CLIs without absl: a usage error in one line, exit 2."""

  def error(self, message: str):  # pylint: disable=signature-differs
    fail(f'{message} (--help lists the flags).', USAGE)
