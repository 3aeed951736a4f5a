"""Stop requests: SIGTERM/SIGINT (or a caller's `should_stop`) become a flag the loop polls.

This module owns how a run is asked to stop (`StopRequest`) and how it says it stopped
(`TrainingInterrupted`, which `main` turns into exit status 128 + signal). What is saved before
stopping is train.py's decision.
"""

import os
import signal
import threading
from typing import Callable, Optional


class TrainingInterrupted(Exception):
  """Training stopped on request (SIGTERM/SIGINT or `should_stop`); rerunning resumes exactly.

  Attributes:
    signum: the signal that asked to stop, or None (a `should_stop` callable).
  """

  def __init__(self, message: str, signum: Optional[int] = None):
    super().__init__(message)
    self.signum = signum


class StopRequest:
  """Turns SIGTERM/SIGINT into a flag that the loop polls between steps; a second signal kills.

  A callable: True once a stop was requested (by a signal or by the caller's `should_stop`).
  Handlers are installed only in the main thread and never over a signal the process was told
  to ignore (nohup); `with` restores the previous ones.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self, should_stop: Optional[Callable[[], bool]] = None):
    self.signum: Optional[int] = None
    self._should_stop = should_stop
    self._previous = {}
    self._pid = os.getpid()

  def __enter__(self) -> 'StopRequest':
    if threading.current_thread() is threading.main_thread():
      for signum in self.SIGNALS:
        if signal.getsignal(signum) is not signal.SIG_IGN:
          self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc_info) -> None:
    for signum, previous in self._previous.items():
      signal.signal(signum, signal.SIG_DFL if previous is None else previous)
    self._previous.clear()

  def _handle(self, signum, frame) -> None:
    if os.getpid() != self._pid:
      # A forked DataLoader worker inherited this handler; Ctrl-C reaches the whole process
      # group. The main process stops the loader, which ends its workers.
      return
    if self.signum is not None:
      # Asked twice: stop at once. Checkpoints on disk stay valid (Orbax commits by rename), so
      # this loses only the work since the last one.
      previous = self._previous.get(signum)
      self.__exit__()
      if callable(previous):
        previous(signum, frame)  # SIGINT: Python's default handler raises KeyboardInterrupt
      else:
        os.kill(os.getpid(), signum)
      return
    self.signum = signum
    # os.write, not logging: a signal handler may run while the logging lock is held.
    os.write(2, (f'\n{signal.Signals(signum).name} received: saving a checkpoint and stopping '
                 'at the next step (send it again to stop at once)\n').encode())

  @property
  def reason(self) -> str:
    return signal.Signals(self.signum).name if self.signum is not None else 'stop requested'

  def __call__(self) -> bool:
    return self.signum is not None or bool(self._should_stop and self._should_stop())
