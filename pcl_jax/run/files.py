"""The files of one run directory other than checkpoints: metrics.jsonl, config.json, TensorBoard.

This module owns their formats and makes every write safe to interrupt: JSON files are written
to a temporary file and renamed, and each metrics line is appended with one `write` + `fsync`, so
a killed run leaves whole lines only (and a torn last line, after a crash of the machine, is
skipped on reading and dropped on resume). It also owns the run directory's own checks: that it
is a writable directory, and a lock so that one trainer at a time writes it. Only process 0 of a
multi-host run should write these files.
"""

import errno
import fcntl
import hashlib
import json
import math
import os
import re
import tempfile
from typing import IO, Callable, List, Optional, Tuple

# OS errors the user fixes (space, quota, permissions, a read-only disk).
USER_OS_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)
# How TensorStore (under Orbax, which raises it as a ValueError) reports the OS error it met, and
# the file.
_TENSORSTORE_ERRNO = re.compile(r"os_error_code='(\d+)'")
_TENSORSTORE_FILE = re.compile(r'local file "([^"]+)"')


def file_digest(path: str) -> Tuple[int, str]:
  """(size in bytes, SHA-256 hex digest) of a file, read in blocks: what checkpoint checksums
  and the decoded-image cache's manifest record."""
  digest, size = hashlib.sha256(), 0
  with open(path, 'rb') as handle:
    for block in iter(lambda: handle.read(1 << 24), b''):
      digest.update(block)
      size += len(block)
  return size, digest.hexdigest()


def storage_failure(error: BaseException) -> Optional[Tuple[int, str]]:
  """(errno, file or '') when `error`, or an error it was raised from or while handling, is an
  OS error the user fixes (`USER_OS_ERRNOS`: a full or read-only disk, permissions), whether
  raised by Python or reported in the message of an Orbax/TensorStore error; else None."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in USER_OS_ERRNOS:
      return error.errno, error.filename or ''
    match = _TENSORSTORE_ERRNO.search(str(error))
    if match and int(match.group(1)) in USER_OS_ERRNOS:
      file_match = _TENSORSTORE_FILE.search(str(error))
      return int(match.group(1)), file_match.group(1) if file_match else ''
    error = error.__cause__ or error.__context__
  return None


class WorkdirError(OSError):
  """The run directory cannot be used (a file, not writable, or in use); one-line message."""


def prepare_workdir(workdir: str) -> None:
  """Creates WORKDIR if needed and checks that files can be written into it.

  Raises:
    WorkdirError: WORKDIR is a file, cannot be created, or is not writable.
  """
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise WorkdirError(f'--workdir={workdir} is a file, not a directory; pass a directory path '
                       '(it is created if missing)')
  try:
    os.makedirs(workdir, exist_ok=True)
    handle, probe = tempfile.mkstemp(dir=workdir, prefix='.write_test_')
    os.close(handle)
    os.remove(probe)
  except OSError as error:
    raise WorkdirError(f'--workdir={workdir} is not writable ({error.strerror}); fix its '
                       'permissions or pass another --workdir') from error


class WorkdirLock:
  """An advisory lock on WORKDIR/.lock: two trainers writing one run directory would corrupt it.

  flock is released by the kernel when the holder dies, even by SIGKILL, so a killed run never
  leaves a stale lock. In a multi-host run only process 0 should lock (`enabled`): the others
  share its directory.
  """

  def __init__(self, workdir: str, enabled: bool = True):
    self.path = os.path.join(workdir, '.lock')
    self.enabled = enabled
    self._fd = None

  def __enter__(self) -> 'WorkdirLock':
    self.acquire()
    return self

  def __exit__(self, *exc_info) -> None:
    self.release()

  def acquire(self) -> None:
    """Takes the lock; raises WorkdirError if another process holds it."""
    if not self.enabled or self._fd is not None:
      return
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      holder = os.read(fd, 64).decode(errors='replace').strip() or 'unknown'
      os.close(fd)
      raise WorkdirError(
          f'--workdir={os.path.dirname(self.path)} is in use by another training process '
          f'(pid {holder}); wait for it to finish or pass another --workdir') from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    self._fd = fd

  def release(self) -> None:
    if self._fd is not None:
      os.close(self._fd)  # releases the lock; the file stays and is reused
      self._fd = None

  @classmethod
  def check_free(cls, workdir: str) -> None:
    """Raises WorkdirError now if another process holds the lock (a fast start-up check)."""
    with cls(workdir):
      pass


def write_atomic(path: str, write: Callable[[IO], None], binary: bool = False) -> None:
  """Fills `path` through `write(file)` on a temp file in the same directory, fsyncs, renames.

  Readers see the old file or the whole new one, never a half-written file; a failed write
  leaves the old file and removes the temp file.
  """
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  suffix = os.path.splitext(path)[1]
  handle, tmp_path = tempfile.mkstemp(dir=directory, prefix='.tmp_', suffix=suffix)
  try:
    with os.fdopen(handle, 'wb' if binary else 'w') as tmp:
      write(tmp)
      tmp.flush()
      os.fsync(tmp.fileno())
    os.replace(tmp_path, path)
  except BaseException as error:
    if os.path.exists(tmp_path):
      os.remove(tmp_path)
    if isinstance(error, OSError) and error.filename in (None, tmp_path):
      error.filename = path  # the file the user knows, not the temporary one
    raise


def write_json_atomic(path: str, payload) -> None:
  """Writes `payload` as JSON to `path` atomically (see `write_atomic`)."""
  write_atomic(path, lambda tmp: json.dump(payload, tmp, indent=2, sort_keys=True,
                                           default=_json_default))


def _json_default(value):
  if hasattr(value, 'tolist'):
    return value.tolist()
  raise TypeError(f'{type(value).__name__} is not JSON serialisable')


def _finite_or_none(value):
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


class MetricsLog:
  """Append-only `metrics.jsonl` (one object per epoch) mirrored to TensorBoard scalars."""

  def __init__(self, workdir: str, tensorboard: bool = True):
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self._writer = None
    if tensorboard:
      from torch.utils import tensorboard as torch_tb  # pylint: disable=g-import-not-at-top
      self._writer = torch_tb.SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def records(self) -> List[dict]:
    return read_metrics(self.path)

  def truncate_from(self, epoch: int) -> None:
    """Drops records of epochs >= `epoch` (written after the checkpoint we resume from)."""
    kept = [r for r in self.records() if r.get('epoch', -1) < epoch]
    lines = ''.join(json.dumps(r, sort_keys=True) + '\n' for r in kept)
    write_atomic(self.path, lambda tmp: tmp.write(lines))

  def append(self, record: dict) -> None:
    record = {key: _finite_or_none(value) for key, value in record.items()}
    line = (json.dumps(record, sort_keys=True, default=_json_default) + '\n').encode()
    # One os.write of the whole line: a kill leaves the line whole or absent. A disk that fills
    # mid-line writes part of it: that part is cut off again, so no torn line is left behind.
    fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
      size = os.fstat(fd).st_size
      try:
        written = os.write(fd, line)
      except OSError:
        os.ftruncate(fd, size)
        raise
      if written != len(line):
        os.ftruncate(fd, size)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.path)
      os.fsync(fd)
    finally:
      os.close(fd)
    if self._writer is not None:
      for key, value in record.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key != 'epoch':
          self._writer.add_scalar(key, value, record['epoch'])
      self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()


def read_metrics(path: str) -> List[dict]:
  """Reads metrics.jsonl, ignoring a torn last line (a run killed mid-write)."""
  if not os.path.exists(path):
    return []
  records = []
  with open(path) as handle:
    for line in handle:
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return records
