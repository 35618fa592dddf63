"""The warm `python` (tests/warm_python.py) ends a command as the interpreter does."""

import subprocess
import sys

from helpers import python

# What a real interpreter does at exit, each printed by the command: its
# non-daemon threads finish, then its atexit handlers run, and what C wrote to
# stdout is not lost (the real one buffers it, a pipe here, and flushes it last);
# its exit code is the process's.
COMMAND = '''
import atexit, ctypes, sys, threading, time
atexit.register(lambda: print('atexit ran', flush=True))
def late():
  time.sleep(0.3)
  print('thread finished', flush=True)
threading.Thread(target=late).start()
ctypes.CDLL(None).printf(b'C buffered ')
print('main done', flush=True)
sys.exit(3)
'''


def test_a_warm_command_exits_as_the_interpreter_does():
  assert python() != sys.executable  # The warm one.
  for interpreter in (python(), sys.executable):
    result = subprocess.run([interpreter, '-c', COMMAND], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 3, (interpreter, result.stderr)
    assert result.stdout.count('C buffered ') == 1, (interpreter, result.stdout)
    assert result.stdout.replace('C buffered ', '') == (
        'main done\nthread finished\natexit ran\n'), (interpreter, result.stdout)
