"""Stopping cleanly on SIGTERM/SIGINT: finish the step, save, exit 0.

With several processes every host must save the *same* step, so they agree
through JAX's preemption sync point (the distributed runtime watches SIGTERM
itself and picks the step). A single process just notes the signal.
A local Ctrl-C of a multi-process job is an ordinary KeyboardInterrupt:
the hosts could not agree on a step for it.
"""

import signal

import jax
from absl import logging
from jax.experimental import multihost_utils


class Preemption:

  def __init__(self):
    self.requested = False
    self._multi = jax.process_count() > 1
    signals = () if self._multi else (signal.SIGTERM, signal.SIGINT)
    self._previous = {s: signal.signal(s, self._note) for s in signals}

  def _note(self, signum, frame):
    logging.warning('Process %d got signal %d: saving at the next step boundary',
                    jax.process_index(), signum)
    self.requested = True

  def reached(self, step: int) -> bool:
    """Call once per step on every process; True where all should save and stop."""
    if self._multi:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested

  def close(self):
    for s, handler in self._previous.items():
      signal.signal(s, handler)
