"""Benchmarks: `python -m qvjax.bench --config=configs/qv_small.py [--what=train|decode|all]
[--json=PATH] [--estimate]`.

Per config, training: parameters, FLOPs per token, compile time, step time
(median of --steps after --warmup), tokens/s, MFU, and the compiled step's
memory (XLA's memory_analysis()). Decoding (qvjax.decode's cache): cache
bytes per token and time per generated token at each --contexts length and
--batches size; MLA paradigms also in their naive (non-absorbed) form.
--estimate: memory and step time on paper (qvjax.estimate), nothing run.

Batches are synthetic (random tokens, one document per row): the step is
measured, not the input pipeline (docs/data.md has that benchmark). The peak
for MFU is the published per-chip figure on known GPUs/TPUs and the measured
matmul rate of the model's dtype on CPU (qvjax.metrics); docs/performance.md
has the figures and what limits them.

Several configs: --configs=configs/qkv_small.py,configs/scale/125m.py:qv;
--set=key=value (repeatable) overrides every config, like --config.key=value.
"""

import importlib.util
import json
import os
import statistics
import sys
import time

from absl import app, flags
from ml_collections import config_flags

from qvjax import config as config_lib

FLAGS = flags.FLAGS
_DEFINED = False


def define_flags():
  """Flags exist only when bench runs as a program (tests call run())."""
  global _DEFINED
  if _DEFINED:
    return
  _DEFINED = True
  config_flags.DEFINE_config_file('config', None, 'A config file (configs/*.py[:arg]).')
  flags.DEFINE_list('configs', [], 'More config files (path[:arg]), benched in turn.')
  flags.DEFINE_multi_string('set', [], 'key=value override for every config (e.g. '
                            'model.dtype=bfloat16).')
  flags.DEFINE_enum('what', 'train', ['train', 'decode', 'all'], 'What to time.')
  flags.DEFINE_string('json', None, 'Also write the results as JSON here.')
  flags.DEFINE_string('markdown', None, 'Also write the results as Markdown tables here.')
  flags.DEFINE_bool('estimate', False, 'Memory and step time on paper only (no compile).')
  flags.DEFINE_integer('steps', 10, 'Timed train steps (median reported).')
  flags.DEFINE_integer('warmup', 2, 'Untimed train steps after compiling.')
  flags.DEFINE_list('contexts', ['256', '1024', '4096'], 'Decode cache lengths.')
  flags.DEFINE_list('batches', ['1', '8'], 'Decode batch sizes.')
  flags.DEFINE_integer('decode_steps', 8, 'Timed decode steps per point (median reported).')
  flags.DEFINE_integer('devices', None, '--estimate: device count (default: this host\'s).')
  flags.DEFINE_string('chip', 'h200', '--estimate: chip for the step time (a key of '
                      'qvjax.metrics.PUBLISHED_PEAKS).')
  flags.DEFINE_float('mfu', 0.4, '--estimate: the MFU the step time assumes.')
  flags.DEFINE_bool('keep_freed_memory', True, 'On CPU, qvjax.host.keep_freed_memory() '
                    '(glibc keeps large freed blocks: no page faults on every step).')


def load_config(spec: str):
  """configs/x.py or configs/x.py:arg -> ConfigDict (config_flags' convention)."""
  path, _, arg = spec.partition(':')
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  if root not in sys.path:
    sys.path.insert(0, root)  # So that config files can import configs.*.
  module_spec = importlib.util.spec_from_file_location('_bench_config', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def apply_overrides(c, overrides):
  for item in overrides:
    key, _, text = item.partition('=')
    *parents, leaf = key.split('.')
    node = c
    for p in parents:
      node = node[p]
    old = node[leaf]
    if isinstance(old, bool):
      value = text.lower() in ('1', 'true', 'yes')
    elif isinstance(old, (int, float)):
      value = type(old)(float(text)) if isinstance(old, int) else float(text)
    else:
      value = text
    node[leaf] = value
  return c


def _median(times):
  return statistics.median(times)


def synthetic_batch(c, batch: int, seed: int = 0):
  import numpy as np
  rng = np.random.default_rng(seed)
  rows = rng.integers(3, c.model.vocab_size, (batch, c.seq_len + 1), dtype=np.int32)
  return {'inputs': rows[:, :-1], 'targets': rows[:, 1:],
          'positions': np.broadcast_to(np.arange(c.seq_len, dtype=np.int32),
                                       (batch, c.seq_len)).copy(),
          'segment_ids': np.ones((batch, c.seq_len), np.int32),
          'weights': np.ones((batch, c.seq_len), np.float32)}


def bench_train(c, steps: int, warmup: int, log=print) -> dict:
  import jax
  from flax.core import spmd

  from qvjax import estimate, metrics, sharding, train
  mesh = sharding.mesh_for(c)
  batch_size = config_lib.global_batch_size(c, jax.device_count())
  local = batch_size // jax.process_count()
  with jax.set_mesh(mesh), spmd.logical_axis_rules(sharding.logical_rules(c.model, mesh)):
    setup = train.build(c, mesh)
    step = train.make_train_step(setup, mesh)
    state = setup.init()
    batch = train.to_global(synthetic_batch(c, local, seed=jax.process_index()), mesh)
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    memory = estimate.memory_dict(compiled.memory_analysis())
    for _ in range(warmup):
      state, stats = compiled(state, batch)
    jax.block_until_ready((state, stats))
    peak, source = metrics.peak_flops_per_device(c.model.dtype)
    times = []
    for _ in range(steps):
      start = time.perf_counter()
      state, stats = compiled(state, batch)
      jax.block_until_ready((state, stats))
      times.append(time.perf_counter() - start)
    if source.startswith('measured'):
      # The machine's rate can drift under load: judge against the best seen.
      peak = max(peak, metrics.peak_flops_per_device(c.model.dtype)[0])
    else:
      peak *= jax.device_count()
    loss = float(stats['loss'])
  step_s = _median(times)
  tokens = batch_size * c.seq_len
  flops_per_token = metrics.train_flops_per_token(c.model, c.seq_len)
  out = {
      'params': metrics.param_count(setup.abstract[0]),
      'train_flops_per_token': flops_per_token,
      'tokens_per_step': tokens, 'global_batch': batch_size, 'seq_len': c.seq_len,
      'dtype': c.model.dtype, 'remat': c.remat, 'loss_chunk': c.loss_chunk,
      'grad_accum_steps': c.grad_accum_steps, 'mesh': sharding.describe(mesh),
      'compile_s': compile_s, 'step_s_median': step_s, 'step_s_all': times,
      'tokens_per_s': tokens / step_s, 'peak_flops': peak, 'peak_source': source,
      'mfu': tokens / step_s * flops_per_token / peak, 'memory': memory,
      'final_loss': loss,
  }
  log(f'  train: {out["params"] / 1e6:.2f}M params, {flops_per_token / 1e6:.1f} MFLOPs/token, '
      f'compile {compile_s:.1f} s, step {step_s * 1e3:.0f} ms (median of {steps}), '
      f'{out["tokens_per_s"]:.0f} tokens/s, MFU {out["mfu"]:.1%} of {peak / 1e9:.1f} GFLOP/s '
      f'({source}), compiled step memory {memory["total"] / 2 ** 20:.0f} MiB '
      f'(args {memory["argument"] / 2 ** 20:.0f}, temp {memory["temp"] / 2 ** 20:.0f})')
  return out


def bench_decode(c, contexts, batches, steps: int, log=print) -> dict:
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from flax.core import spmd

  from qvjax import decode, sharding, train
  mesh = sharding.mesh_for(c)
  m = c.model
  forms = ['absorbed', 'naive'] if m.attention in config_lib.MLA_PARADIGMS else ['default']
  out = {'cache_bytes_per_token': decode.cache_bytes_per_token(m), 'points': []}
  log(f'  decode: cache {out["cache_bytes_per_token"]} bytes/token '
      f'({m.num_layers} layers, {m.dtype})')
  # A batch of 1 cannot be split over the data axes: replicate the batch.
  rules = [(k, None if k == 'batch' else v) for k, v in sharding.logical_rules(m, mesh)]
  with jax.set_mesh(mesh), spmd.logical_axis_rules(rules):
    setup = train.build(c, mesh)
    model_state = setup.init()[0]
    for form in forms:
      model = nnx.merge(setup.graphdefs[0], model_state)
      for block in model.blocks:
        if form == 'naive':
          block.attn.absorb = False
      graphdef, params = nnx.split(model)

      def greedy_step(params, cache, token_B, graphdef=graphdef):
        logits_B1V, cache = decode.extend(nnx.merge(graphdef, params), cache, token_B[:, None])
        return jnp.argmax(logits_B1V[:, 0], axis=-1).astype(jnp.int32), cache

      step = jax.jit(greedy_step, donate_argnums=1)
      for S in contexts:
        for B in batches:
          cache = _filled_cache(m, B, S, steps + 2)
          token = jnp.zeros((B,), jnp.int32)
          start = time.perf_counter()
          compiled = step.lower(params, cache, token).compile()
          compile_s = time.perf_counter() - start
          token, cache = compiled(params, cache, token)  # Warm-up.
          jax.block_until_ready(token)
          times = []
          for _ in range(steps):
            start = time.perf_counter()
            token, cache = compiled(params, cache, token)
            jax.block_until_ready(token)
            times.append(time.perf_counter() - start)
          point = {'form': form, 'context': S, 'batch': B, 'ms_per_token': 1e3 * _median(times),
                   'compile_s': compile_s,
                   'cache_bytes': out['cache_bytes_per_token'] * S * B}
          out['points'].append(point)
          log(f'    {form:8s} context {S:5d} batch {B:2d}: {point["ms_per_token"]:8.2f} ms per '
              f'token step ({point["cache_bytes"] / 2 ** 20:.1f} MiB cache)')
          del cache
  return out


def _filled_cache(m, batch: int, length: int, headroom: int):
  """A cache of `length` slots holding random entries, its index `headroom`
  slots before the end: decoding attends over the whole cache (the mask hides
  nothing it would not read anyway), so this costs what a real one does."""
  import jax
  import jax.numpy as jnp

  from qvjax import decode
  cache = decode.init_cache(m, batch, length)
  key = jax.random.key(0)
  layers = []
  for layer in cache['layers']:
    filled = {}
    for name, array in layer.items():
      key, sub = jax.random.split(key)
      filled[name] = jax.random.normal(sub, array.shape, array.dtype)
    layers.append(filled)
  positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
  return {'index': jnp.asarray(length - headroom, jnp.int32), 'positions': positions,
          'layers': layers}


def run(specs, overrides=(), what='train', json_path=None, estimate_only=False, steps=10,
        warmup=2, contexts=(256, 1024, 4096), batches=(1, 8), decode_steps=8, devices=None,
        chip='h200', mfu=0.4, configs=None, log=print, markdown_path=None,
        keep_freed_memory=True) -> list[dict]:
  """Benches each config (paths or ConfigDicts); returns (and writes) the results."""
  import jax

  from qvjax import host
  tuned = keep_freed_memory and jax.default_backend() == 'cpu' and host.keep_freed_memory()
  results = []
  items = list(configs or []) + [load_config(s) for s in specs]
  for c in items:
    c = apply_overrides(c, overrides)
    entry = {'config': c.name, 'attention': c.model.attention,
             'num_kv_heads': c.model.num_kv_heads, 'machine': machine() | {
                 'keep_freed_memory': tuned}}
    if estimate_only:
      from qvjax import estimate
      e = estimate.estimate(c, devices or jax.device_count(), chip, mfu)
      log(estimate.format_estimate(e))
      entry['estimate'] = e
      results.append(entry)
      continue
    config_lib.validate_static(c)
    config_lib.validate_for_devices(c, jax.device_count(), jax.process_count())
    log(f'{c.name} ({c.model.attention}, num_kv_heads={c.model.num_kv_heads}) on '
        f'{entry["machine"]["devices"]}, load {entry["machine"]["load"]}')
    if what in ('train', 'all'):
      entry['train'] = bench_train(c, steps, warmup, log)
    if what in ('decode', 'all'):
      entry['decode'] = bench_decode(c, [int(x) for x in contexts], [int(x) for x in batches],
                                     decode_steps, log)
    results.append(entry)
  if json_path:
    with open(json_path, 'w') as f:
      json.dump(results, f, indent=1, default=str)
  if markdown_path:
    with open(markdown_path, 'w') as f:
      f.write(markdown(results))
  return results


def markdown(results) -> str:
  """Markdown tables of results (train, decode, estimate), one row per config."""
  out = []
  train = [r for r in results if 'train' in r]
  if train:
    out += ['| config | attention | G | params | dtype | batch x seq | remat | MFLOPs/token | '
            'compile s | step ms | tokens/s | MFU | peak | step memory MiB |',
            '|---|---|---|---|---|---|---|---|---|---|---|---|---|---|']
    for r in train:
      t = r['train']
      out.append(f'| {r["config"]} | {r["attention"]} | {r["num_kv_heads"]} | '
                 f'{t["params"] / 1e6:.1f}M | {t["dtype"]} | {t["global_batch"]} x {t["seq_len"]} | '
                 f'{t["remat"]} | {t["train_flops_per_token"] / 1e6:.1f} | {t["compile_s"]:.1f} | '
                 f'{t["step_s_median"] * 1e3:.1f} | {t["tokens_per_s"]:.0f} | {t["mfu"]:.1%} | '
                 f'{t["peak_flops"] / 1e12:.3g} TFLOP/s ({t["peak_source"]}) | '
                 f'{t["memory"]["total"] / 2 ** 20:.0f} |')
    out.append('')
  decode = [r for r in results if 'decode' in r]
  if decode:
    points = sorted({(p['context'], p['batch']) for r in decode for p in r['decode']['points']})
    out += ['| config | attention | form | cache B/token | ' +
            ' | '.join(f'ms/token @{c} x{b}' for c, b in points) + ' |',
            '|---|---|---|---|' + '---|' * len(points)]
    for r in decode:
      d = r['decode']
      for form in dict.fromkeys(p['form'] for p in d['points']):
        times = {(p['context'], p['batch']): p['ms_per_token'] for p in d['points']
                 if p['form'] == form}
        out.append(f'| {r["config"]} | {r["attention"]} | {form} | '
                   f'{d["cache_bytes_per_token"]} | ' +
                   ' | '.join(f'{times[k]:.2f}' if k in times else '' for k in points) + ' |')
    out.append('')
  estimates = [r for r in results if 'estimate' in r]
  if estimates:
    gib = lambda b: f'{b / 2 ** 30:.1f}'
    out += ['| config | params | devices | mesh | params+grads+AdamW GiB/device | '
            'activations GiB/device (none / dots / full) | total GiB/device | '
            'KV cache MiB per 1k tokens | step s |',
            '|---|---|---|---|---|---|---|---|---|']
    for r in estimates:
      e, per = r['estimate'], r['estimate']['per_device']
      acts = per['activations_by_remat']
      mesh = 'x'.join(str(v) for v in e['mesh'].values())
      out.append(f'| {e["config"]} | {e["params"] / 1e6:.0f}M | {e["devices"]} | {mesh} | '
                 f'{gib(per["params"] + per["grads"] + per["optimizer"])} | '
                 f'{gib(acts["none"])} / {gib(acts["dots"])} / {gib(acts["full"])} | '
                 f'{gib(per["total"])} ({e["remat"]}) | '
                 f'{e["kv_cache_bytes_per_1k_tokens"] / 2 ** 20:.1f} | '
                 f'{e.get("step_time_s", float("nan")):.2f} |')
    out.append('')
  return '\n'.join(out)


def machine() -> dict:
  import platform

  import jax
  d = jax.devices()[0]
  load = os.getloadavg() if hasattr(os, 'getloadavg') else None
  return {'devices': f'{jax.device_count()} x {d.device_kind} ({d.platform})',
          'cpu_count': os.cpu_count(), 'processor': platform.processor() or platform.machine(),
          'jax': jax.__version__, 'load': [round(x, 2) for x in load] if load else None,
          'xla_flags': os.environ.get('XLA_FLAGS', '')}


def main(argv):
  del argv
  specs = list(FLAGS.configs)
  configs = [FLAGS.config] if FLAGS.config is not None else []
  if not specs and not configs:
    raise app.UsageError('give --config=... or --configs=...')
  try:
    run(specs, FLAGS.set, FLAGS.what, FLAGS.json, FLAGS.estimate, FLAGS.steps, FLAGS.warmup,
        FLAGS.contexts, FLAGS.batches, FLAGS.decode_steps, FLAGS.devices, FLAGS.chip, FLAGS.mfu,
        configs=configs, markdown_path=FLAGS.markdown,
        keep_freed_memory=FLAGS.keep_freed_memory)
  except config_lib.ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  define_flags()
  app.run(main)
