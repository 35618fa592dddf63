"""A `python` for the docs runner whose `-m vgg_flax...` and `-c` runs start warm.

Every command a page runs is a process of its own, as the page says; what is
shared is the start-up: one server per page imports the CLIs once (about 4 s
of TensorFlow, JAX and orbax), and each `python -m vgg_flax.<cli> ...` or
`python -c CODE` is a child forked from it, which runs the module as
`__main__` (as `python -m` does) in the command's folder, with its
environment, arguments and standard streams, and exits as the interpreter
would (non-daemon threads joined, atexit handlers run), less the teardown of
the imported modules. cli_test.py forks its cases the same way.

Anything else (a script, `-m pytest`, an environment that changes what the
imports read: JAX_*, TF_*, PYTHON*) runs the real interpreter. What a child
can read anew, it does: TFDS_DATA_DIR, PYTHONFAULTHANDLER, and the storage
emulator's settings (`vgg_flax.io.clients.configure`). The shim passes the
signals it gets on to the command (SIGTERM, Ctrl-C's SIGINT, ...), and a
SIGKILLed shim takes its command with it; the command's exit code or signal is
the shim's. What differs: the command's PID is not the shim's, and its
`sys.executable` is the shim, so the `python` processes it starts (a sweep's
trainers) are warm too.

  with WarmPython(env) as shim_dir:   # put shim_dir first on the commands' PATH
    subprocess.run(['bash', '-c', 'python -m vgg_flax.train ...'], env=...)
"""

import faulthandler
import gc
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

# What the imports read from the environment: a command that sets another
# value runs in a fresh interpreter instead.
_READ_AT_IMPORT = ('JAX_', 'TF_', 'TFDS_', 'PYTHON')
# Read anew by `_child`, as a fresh start would (TFDS_DATA_DIR, PYTHONFAULTHANDLER), or
# only when a GPU is set up, which these processes never do (Keras sets it in the tests' process).
_READ_AGAIN = ('TFDS_DATA_DIR', 'TF_FORCE_GPU_ALLOW_GROWTH', 'PYTHONFAULTHANDLER')
_SHIM = '''#!{python} -S
import json, os, signal, socket, sys
argv = sys.argv[1:]
warm = (argv[:1] == ['-c'] and len(argv) >= 2) or (
    argv[:1] == ['-m'] and len(argv) >= 2 and argv[1].split('.')[0] == 'vgg_flax')
if warm:
  s = socket.socket(socket.AF_UNIX)
  s.connect({socket!r})
  socket.send_fds(s, [b'f'], [0, 1, 2])  # The streams first, then the command.
  s.sendall(json.dumps({{'argv': argv, 'cwd': os.getcwd(), 'env': dict(os.environ)}}).encode()
            + b'\\n')
  replies = s.makefile('rb')

  def reply():
    line = replies.readline()
    if not line:
      sys.exit('warm python: the server went away')
    return int(line)
  pid = reply()  # The command's process, or {declined}.
  if pid != {declined}:
    # A signal sent to this process reaches the command, as if it were this process
    # (SIGKILL cannot be caught: the server kills the command when this process is gone).
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGABRT,
                signal.SIGUSR1, signal.SIGUSR2):
      signal.signal(sig, lambda number, _: os.kill(pid, number))
    code = reply()
    if code < 0:  # Killed by a signal: so is this process, for its parent to see.
      signal.signal(-code, signal.SIG_DFL)
      os.kill(os.getpid(), -code)
    sys.exit(code)
os.execv({python!r}, [{python!r}] + argv)
'''
_DECLINED = 0  # Instead of a PID: the shim runs the real interpreter.


def _declined(env: dict[str, str]) -> bool:
  def read_at_import(e):
    return {k: v for k, v in e.items() if k.startswith(_READ_AT_IMPORT) and k not in _READ_AGAIN}
  mine, theirs = read_at_import(os.environ), read_at_import(env)
  return mine != theirs


def _child(request: dict, fds: list[int], shim: str) -> None:
  """In the forked child: runs the command and exits the interpreter with its code."""
  for target, fd in enumerate(fds):
    os.dup2(fd, target)
    os.close(fd)
  os.chdir(request['cwd'])
  os.environ.clear()
  os.environ.update(request['env'])
  from tensorflow_datasets.core import constants  # pylint: disable=g-import-not-at-top
  constants.DATA_DIR = constants.get_default_data_dir()  # What tfds read at import.
  from vgg_flax.io import clients  # pylint: disable=g-import-not-at-top
  clients.configure()  # Its import read STORAGE_EMULATOR_HOST in the server's environment.
  if os.environ.get('PYTHONFAULTHANDLER'):
    faulthandler.enable()
  signal.signal(signal.SIGTERM, signal.SIG_DFL)
  sys.executable = shim
  argv = request['argv']
  code = 0
  try:
    if argv[0] == '-c':
      sys.argv = ['-c'] + argv[2:]
      sys.path[0] = ''
      exec(compile(argv[1], '<string>', 'exec'), {'__name__': '__main__'})  # pylint: disable=exec-used
    else:
      import runpy  # pylint: disable=g-import-not-at-top
      sys.argv = [argv[1]] + argv[2:]
      sys.path[0] = request['cwd']
      runpy.run_module(argv[1], run_name='__main__', alter_sys=True)
  except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    if not isinstance(e.code, int) and e.code is not None:
      print(e.code, file=sys.stderr)
  except BaseException:  # pylint: disable=broad-except
    import traceback  # pylint: disable=g-import-not-at-top
    traceback.print_exc()
    code = 1
  _exit(code)


def _exit(code: int) -> None:
  """Ends the child as the interpreter's exit does, less the teardown of its modules:
  non-daemon threads joined, atexit handlers run, Python's and C's streams flushed.
  Tearing down what the server imported (TensorFlow, JAX, ...) took 1.3 s of CPU
  per command (the suite's user CPU: 15 min 52 s -> 13 min 47 s without it), and
  nothing a command writes depends on it."""
  import atexit  # pylint: disable=g-import-not-at-top
  import ctypes  # pylint: disable=g-import-not-at-top
  threading._shutdown()  # pylint: disable=protected-access  # What Py_Finalize does first.
  atexit._run_exitfuncs()  # pylint: disable=protected-access
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except (OSError, ValueError):  # Closed by the command, or its reader gone.
      pass
  ctypes.CDLL(None).fflush(None)  # C and C++ libraries' buffered output.
  os._exit(code)  # pylint: disable=protected-access


def serve(path: str) -> None:
  """Imports the CLIs, then forks a child per request on the Unix socket `path`."""
  import warnings  # pylint: disable=g-import-not-at-top
  # runpy warns that the module was imported before: on purpose, to fork it warm.
  warnings.filterwarnings('ignore', message='.*found in sys.modules after import')
  # The CLIs that define their flags only when run (convert defines its own on import).
  import vgg_flax.train, vgg_flax.evaluate, vgg_flax.predict  # noqa  pylint: disable=g-import-not-at-top,multiple-imports,unused-import
  import vgg_flax.sweep, vgg_flax.summary, vgg_flax.aot  # noqa  pylint: disable=g-import-not-at-top,multiple-imports,unused-import
  from vgg_flax import interop  # noqa  pylint: disable=g-import-not-at-top,unused-import
  import matplotlib.pyplot  # noqa  pylint: disable=g-import-not-at-top,unused-import  # curves.png
  import jax  # pylint: disable=g-import-not-at-top
  assert not jax._src.xla_bridge._backends, 'the server must not start a backend'  # pylint: disable=protected-access
  # What is imported stays, untouched by the children's collections (which would
  # copy each page the collector writes to): the pre-fork server's recipe.
  gc.freeze()
  server = socket.socket(socket.AF_UNIX)
  server.bind(path)
  server.listen(8)
  children = set()

  def stop(*_):
    for pid in list(children):
      os.kill(pid, signal.SIGKILL)
    os._exit(0)  # pylint: disable=protected-access
  signal.signal(signal.SIGTERM, stop)
  open(path + '.ready', 'w').close()
  while True:
    conn, _ = server.accept()
    _, fds, _, _ = socket.recv_fds(conn, 1, 3)
    data = b''
    while not data.endswith(b'\n'):
      data += conn.recv(1 << 16)
    request = json.loads(data)
    if _declined(request['env']):
      for fd in fds:
        os.close(fd)
      conn.sendall(f'{_DECLINED}\n'.encode())
      conn.close()
      continue
    pid = os.fork()
    if pid == 0:
      server.close()
      conn.close()
      _child(request, fds, shim=os.path.join(os.path.dirname(path), 'python'))
    for fd in fds:  # Else the command's output would stay open after it ends.
      os.close(fd)
    children.add(pid)
    conn.sendall(f'{pid}\n'.encode())  # The shim passes the signals it gets on to it.
    # A thread per command: a command may itself run `python` from PATH.
    threading.Thread(target=_watch, args=(conn, pid, children), daemon=True).start()


def _watch(conn: socket.socket, pid: int, children: set[int]) -> None:
  """Replies with the command's exit code; if the shim goes first (SIGKILLed: it
  cannot pass that on), kills the command as that signal would have."""
  while not (status := os.waitpid(pid, os.WNOHANG))[0]:
    if select.select([conn], [], [], 0.05)[0]:  # Nothing else comes: the shim is gone.
      os.kill(pid, signal.SIGKILL)  # Not reaped yet: the PID is still the command's.
      status = os.waitpid(pid, 0)
      break
  children.discard(pid)
  try:
    conn.sendall(f'{os.waitstatus_to_exitcode(status[1])}\n'.encode())
  except OSError:
    pass  # The shim is gone.
  conn.close()


class WarmPython:
  """A server and the folder with its `python` shim (see the module doc)."""

  def __init__(self, env: dict[str, str]):
    self._env = env
    self._dir = self._proc = None

  def __enter__(self) -> str:
    self._dir = tempfile.mkdtemp(prefix='warm_python')
    path = os.path.join(self._dir, 'socket')
    for name in ('python', 'python3'):
      shim = os.path.join(self._dir, name)
      with open(shim, 'w', encoding='utf-8') as f:
        f.write(_SHIM.format(python=sys.executable, socket=path, declined=_DECLINED))
      os.chmod(shim, 0o755)
    self._proc = subprocess.Popen([sys.executable, __file__, path], env=self._env,
                                  stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not os.path.exists(path + '.ready'):
      assert self._proc.poll() is None and time.monotonic() < deadline, 'warm python: no server'
      time.sleep(0.05)
    return self._dir

  def __exit__(self, *_):
    self._proc.terminate()
    try:
      self._proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
      self._proc.kill()
      self._proc.wait()
    shutil.rmtree(self._dir, ignore_errors=True)


if __name__ == '__main__':
  serve(sys.argv[1])
