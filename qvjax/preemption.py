"""Stopping cleanly on SIGTERM/SIGINT: finish the step, save, exit 0.

With several processes every host must save the *same* step, so they agree
through JAX's preemption sync point (the distributed runtime watches SIGTERM
itself and picks the step; a Ctrl-C is turned into a SIGTERM to join that
protocol). A single process just notes the signal.
"""

import os
import signal

import jax
from absl import logging
from jax.experimental import multihost_utils


class Preemption:

  def __init__(self):
    self.requested = False
    self._multi = jax.process_count() > 1
    if self._multi:
      self._previous = {signal.SIGINT: signal.signal(signal.SIGINT, self._to_sigterm)}
    else:
      self._previous = {s: signal.signal(s, self._note) for s in (signal.SIGTERM, signal.SIGINT)}

  def _note(self, signum, frame):
    logging.warning('Process %d got signal %d: saving at the next step boundary',
                    jax.process_index(), signum)
    self.requested = True

  def _to_sigterm(self, signum, frame):
    os.kill(os.getpid(), signal.SIGTERM)

  def reached(self, step: int) -> bool:
    """Call once per step on every process; True where all should save and stop."""
    if self._multi:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested

  def close(self):
    for s, handler in self._previous.items():
      signal.signal(s, handler)
