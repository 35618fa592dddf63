"""One trainer per workdir: the lease, on a local disk and on a GCS server."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from vgg_flax.io import storage
from vgg_flax.io import workdirs
from vgg_flax.training import lease

HOLD_SCRIPT = """
import sys, time
from vgg_flax.training import lease
lease.acquire(sys.argv[1], refresh_s=30)
time.sleep(300)
"""


@pytest.fixture(params=['local', 'gcs'])
def workdir(request, tmp_path):
  if request.param == 'local':
    return str(tmp_path / 'run')
  return request.getfixturevalue('gcs_bucket') + '/runs/a'


def _fake_lease(workdir, host, pid, age_s):
  """Writes another holder's lease, refreshed `age_s` ago; returns its refresh time."""
  now = time.time()
  storage.makedirs(workdir)
  storage.write_text(f'{workdir}/{workdirs.LEASE_FILE}', json.dumps({
      'host': host, 'pid': pid, 'pid_start': None, 'started': now - age_s - 60,
      'refreshed': now - age_s, 'token': 'theirs'}))
  return now - age_s


def _timed(call, refreshed):
  """`call()`'s result (or WorkdirInUseError), and the ages of a lease refreshed at
  `refreshed` that it may have seen, in whole seconds as messages print them."""
  before = time.time()
  try:
    result = call()
  except lease.WorkdirInUseError as e:
    result = e
  return result, {str(a) for a in range(round(before - refreshed),
                                        round(time.time() - refreshed) + 1)}


def _proc_state(pid):
  with open(f'/proc/{pid}/stat') as f:
    return f.read().rsplit(')', 1)[1].split()[0]


def _wait_for(predicate, timeout_s=60.0):
  deadline = time.monotonic() + timeout_s
  while not predicate():
    assert time.monotonic() < deadline, 'timed out'
    time.sleep(0.05)


def test_second_trainer_refused_then_sigkilled_holder_taken_over(workdir, caplog):
  storage.makedirs(workdir)
  holder = subprocess.Popen([sys.executable, '-c', HOLD_SCRIPT, workdir])
  try:
    _wait_for(lambda: getattr(lease.read_holder(workdir), 'pid', None) == holder.pid)
    e, ages = _timed(lambda: lease.acquire(workdir), lease.read_holder(workdir).refreshed)
    age = re.search(r'last refresh (\d+) s ago', str(e)).group(1)
    assert isinstance(e, lease.WorkdirInUseError) and age in ages, (e, ages)
    assert str(e) == (
        f'workdir {workdir} is in use by host {socket.gethostname()}, PID {holder.pid} '
        f'(last refresh {age} s ago). Stop that trainer or use another --workdir; its lease '
        '(lease.json) is taken over once that process is gone or 300 s after its last refresh.')
    holder.send_signal(signal.SIGKILL)
    # Not reaped yet (a zombie, as when the parent is slow to notice): gone all the same.
    _wait_for(lambda: _proc_state(holder.pid) == 'Z')
    held = lease.acquire(workdir)
    try:
      assert lease.read_holder(workdir).pid == os.getpid()
      assert (f'of host {socket.gethostname()}, PID {holder.pid}: its process {holder.pid} is '
              'gone from this host.') in caplog.text
    finally:
      held.release()
  finally:
    holder.kill()
    holder.wait(timeout=30)
  assert not storage.exists(f'{workdir}/lease.json')


def test_live_lease_of_another_host_refused(workdir):
  refreshed = _fake_lease(workdir, 'h1', 1234, age_s=5)
  e, ages = _timed(lambda: lease.acquire(workdir, stale_after_s=60, refresh_s=10), refreshed)
  assert isinstance(e, lease.WorkdirInUseError), e
  age = re.search(r'in use by host h1, PID 1234 \(last refresh (\d+) s ago\)', str(e))
  assert age and age.group(1) in ages, (str(e), ages)
  assert lease.read_holder(workdir).token == 'theirs'  # Left as it was.


def test_lease_not_refreshed_is_taken_over(workdir, caplog):
  refreshed = _fake_lease(workdir, 'h1', 1234, age_s=100)
  held, ages = _timed(lambda: lease.acquire(workdir, stale_after_s=60, refresh_s=10), refreshed)
  try:
    assert lease.read_holder(workdir).token == held.holder.token
    age = re.search(r'of host h1, PID 1234: it was last refreshed (\d+) s ago, more than 60 s\.',
                    caplog.text)
    assert age and age.group(1) in ages, (caplog.text, ages)
  finally:
    held.release()
  assert lease.read_holder(workdir) is None


def test_refresh_updates_the_timestamp(workdir):
  with lease.hold(workdir, stale_after_s=30, refresh_s=0.2, process_index=0) as held:
    first = lease.read_holder(workdir)
    _wait_for(lambda: lease.read_holder(workdir).refreshed > first.refreshed, 20)
    now = lease.read_holder(workdir)
    assert (now.token, now.started, now.pid) == (first.token, first.started, os.getpid())
    assert not held.lost.is_set()


def test_a_lease_taken_over_is_lost_and_left_to_the_new_holder(workdir, caplog):
  held = lease.acquire(workdir, stale_after_s=30, refresh_s=20)
  _fake_lease(workdir, 'h2', 99, age_s=0)  # Another trainer took over.
  assert not held.refresh()
  assert held.lost.is_set()
  assert 'Lost the lease' in caplog.text and 'to host h2, PID 99' in caplog.text
  held.release()
  assert lease.read_holder(workdir).host == 'h2'


def test_racing_takeovers_have_one_winner(workdir):
  for _ in range(3):
    _fake_lease(workdir, 'h1', 1234, age_s=100)
    results = []

    def take():
      try:
        results.append(lease.acquire(workdir, stale_after_s=60, refresh_s=10))
      except lease.WorkdirInUseError as e:
        results.append(e)

    threads = [threading.Thread(target=take) for _ in range(3)]
    for t in threads:
      t.start()
    for t in threads:
      t.join()
    winners = [r for r in results if isinstance(r, lease.Lease)]
    assert len(winners) == 1, results
    assert lease.read_holder(workdir).token == winners[0].holder.token
    winners[0].release()


RACE_SCRIPT = """
import sys
from vgg_flax.training import lease
refused = 0
for _ in range(int(sys.argv[2])):
  try:
    held = lease.acquire(sys.argv[1], stale_after_s=30, refresh_s=10)
  except lease.WorkdirInUseError:
    refused += 1
    continue
  held.release()
  break
print(refused)
"""


def test_a_refreshing_holder_never_loses_its_local_lease_to_a_launch(tmp_path):
  # Regression: a refresh deleted the lease, then created it again; a launch in
  # between took it (here after 265 refusals) and the healthy holder stopped.
  workdir, tries = str(tmp_path / 'run'), 3000
  with lease.hold(workdir, stale_after_s=30, refresh_s=0.002, process_index=0) as held:
    first = held.holder.refreshed
    refused = subprocess.run([sys.executable, '-c', RACE_SCRIPT, workdir, str(tries)],
                             capture_output=True, text=True, timeout=300, check=True).stdout
    assert int(refused) == tries  # Refused every time: never acquired.
    assert not held.lost.is_set()
    assert held.holder.refreshed > first  # It was refreshing meanwhile.
    assert lease.read_holder(workdir).token == held.holder.token


def test_a_lost_answer_is_not_a_lost_lease(gcs_bucket, monkeypatch, caplog):
  # Regression: a refresh that landed but whose answer was lost was retried by
  # the client, failed its precondition, and the holder stopped, naming itself
  # as the trainer that took over. The server is real; the network drops the
  # answer to the next request of each method in `lose`.
  import requests  # pylint: disable=g-import-not-at-top
  from google.auth.transport import requests as transport  # pylint: disable=g-import-not-at-top
  send, lose, lost = transport.AuthorizedSession.request, set(), []

  def request(session, method, url, *args, **kwargs):
    response = send(session, method, url, *args, **kwargs)
    if method in lose:
      lose.discard(method)
      lost.append((method, response.status_code))
      raise requests.exceptions.ConnectionError('connection reset (the answer was lost)')
    return response

  monkeypatch.setattr(transport.AuthorizedSession, 'request', request)
  workdir = gcs_bucket + '/runs/a'
  lose.add('POST')  # The upload that creates the lease.
  held = lease.acquire(workdir, stale_after_s=30, refresh_s=20)
  first = lease.read_holder(workdir)
  assert first.token == held.holder.token
  lose.add('POST')  # A refresh.
  assert held.refresh() and not held.lost.is_set()
  now = lease.read_holder(workdir)
  assert (now.token, now.pid) == (first.token, os.getpid()) and now.refreshed > first.refreshed
  assert held.refresh()  # With the generation it adopted.
  lose.add('DELETE')
  held.release()
  assert lease.read_holder(workdir) is None
  assert lost == [('POST', 200), ('POST', 200), ('DELETE', 200)]
  assert 'Lost the lease' not in caplog.text and 'changed by another' not in caplog.text


def test_only_process_0_holds_it(tmp_path):
  with lease.hold(str(tmp_path), process_index=1) as held:
    assert held is None
    assert not os.path.exists(tmp_path / 'lease.json')


def test_refresh_interval_checked(tmp_path):
  with pytest.raises(ValueError, match='refresh_s=60 must be positive and less than '
                     'stale_after_s=30'):
    lease.acquire(str(tmp_path), stale_after_s=30, refresh_s=60)
