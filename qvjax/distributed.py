"""Joining the processes of a multi-host job with JAX's distributed runtime.

Every host runs the same command. On TPU pods, SLURM and Open MPI the
cluster is detected by `jax.distributed.initialize()` itself; elsewhere the
--coordinator_address/--num_processes/--process_id flags say it.
"""

import glob
import os
import sys

import jax

from qvjax.config import ConfigError

# Variables that mean "this process is one of several" for JAX's cluster
# detection (jax._src.clusters): SLURM, Open MPI, Cloud TPU pods.
_CLUSTER_VARS = {
    'SLURM_NTASKS': lambda v: int(v) > 1,
    'OMPI_COMM_WORLD_SIZE': lambda v: int(v) > 1,
    'TPU_WORKER_HOSTNAMES': lambda v: ',' in v,
    'MEGASCALE_COORDINATOR_ADDRESS': lambda v: bool(v),
}


def in_cluster() -> bool:
  """A multi-process scheduler's variables, or a Cloud TPU VM (whose workers
  JAX finds through the metadata server; a single-host VM joins as one)."""
  if glob.glob('/dev/accel*') or glob.glob('/dev/vfio/[0-9]*'):
    return True
  return any(name in os.environ and is_multi(os.environ[name])
             for name, is_multi in _CLUSTER_VARS.items())


def initialize(coordinator_address: str | None, num_processes: int | None,
               process_id: int | None, timeout_s: int = 300, mode: str = 'auto') -> None:
  """Starts the distributed runtime when this is one of several processes
  (mode 'auto': flags or a detected cluster; 'on': always; 'off': never)."""
  explicit = coordinator_address is not None
  if explicit and (num_processes is None or process_id is None):
    raise ConfigError(f'--coordinator_address={coordinator_address} is invalid alone: '
                      'also pass --num_processes and --process_id')
  if explicit and not 0 <= process_id < num_processes:
    raise ConfigError(f'--process_id={process_id} is invalid: must be in [0, {num_processes})')
  if mode == 'off' or (mode == 'auto' and not explicit and not in_cluster()):
    return
  # CPU collectives across processes need gloo; GPU/TPU bring their own.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  # If a process never joins, the runtime aborts the others from C++ after
  # the timeout (exit 134, DEADLINE_EXCEEDED); this line says what it means.
  print(f'process {process_id if explicit else "(auto)"}: joining '
        f'{num_processes or "the detected"} processes at '
        f'{coordinator_address or "the detected coordinator"}; a process missing after '
        f'{timeout_s}s aborts the run with DEADLINE_EXCEEDED', file=sys.stderr, flush=True)
  try:
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               initialization_timeout=timeout_s)
  except Exception as e:  # The runtime's own errors are long; say what to check.
    raise ConfigError(
        f'distributed start failed for process {process_id} with coordinator '
        f'{coordinator_address or "(auto-detected)"}: {str(e).splitlines()[0]} '
        f'(are all {num_processes or "the"} processes started, with the same '
        '--coordinator_address and --num_processes?)') from None
