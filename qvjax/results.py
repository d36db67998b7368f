"""A suite's results: results.csv, results.md and loss_curves.png in its
directory, from each cell's workdir (metrics.jsonl) and each run's config.

Per run (statistics over the seeds that finished):
  params_attention  attention parameters, all layers (AGF exponents included)
  params_total      every parameter (embedding once when tied)
  flops_per_token   forward matmul FLOPs per token at seq_len
                    (qvjax.metrics; training is 3x this)
  cache_bytes_per_token  KV cache, all layers, model dtype (qvjax.decode)
  eval_loss, eval_ppl    the final evaluation: mean and sample std (ddof 1)
  dppl_pct          100 (ppl / ppl of the baseline run - 1), paired by seed
                    index (same data order and init seed), then mean and std
  tokens_per_s      the median of the logged training rates, mean over seeds
  wall_s            wall time of the cells' processes (DIR/suite_log.jsonl),
                    mean over seeds
A std needs two finished seeds: it is left empty otherwise.
"""

import csv
import io
import json
import math
import os

import numpy as np

from qvjax import experiments

CSV_COLUMNS = [
    'run', 'label', 'attention', 'position', 'num_kv_heads', 'ctx_dim', 'baseline',
    'params_attention', 'params_total', 'flops_per_token', 'cache_bytes_per_token',
    'seeds_finished', 'seeds', 'num_train_steps', 'train_tokens',
    'eval_loss_mean', 'eval_loss_std', 'eval_ppl_mean', 'eval_ppl_std',
    'dppl_pct_mean', 'dppl_pct_std', 'tokens_per_s', 'wall_s',
]


def model_facts(c) -> dict:
  """Parameter counts (abstract: nothing is allocated), FLOPs and cache bytes."""
  import jax
  from flax import nnx

  from qvjax import decode, metrics
  from qvjax.model import Decoder
  abstract = nnx.eval_shape(lambda: Decoder(c.model, nnx.Rngs(0)))
  flat, _ = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(abstract)))
  total = attention = 0
  for path, leaf in flat:
    size = int(np.prod(leaf.shape))
    total += size
    if any(str(getattr(k, 'key', k)) == 'attn' for k in path):
      attention += size
  return {'params_attention': attention, 'params_total': total,
          'flops_per_token': metrics.forward_flops_per_token(c.model, c.seq_len),
          'cache_bytes_per_token': decode.cache_bytes_per_token(c.model)}


def local_dir(workdir: str) -> str:
  """Where the runner keeps local files (logs) for this suite directory."""
  if workdir.startswith('gs://'):
    return os.path.abspath(os.path.join('runs', 'suite_logs', workdir[5:].replace('/', '_')))
  return workdir


def curves(rows: list[dict]) -> tuple[dict, dict, list[float]]:
  """(train step -> loss, eval step -> loss, logged tokens/s). A step logged
  twice (a resumed run repeats the steps after its last checkpoint) keeps
  the later value: the one the finished run continued from."""
  train, evals, rates = {}, {}, []
  for r in rows:
    if 'loss' in r:
      train[r['step']] = r['loss']
      if 'tokens_per_s' in r:
        rates.append(r['tokens_per_s'])
    if 'eval_loss' in r:
      evals[r['step']] = r['eval_loss']
  return train, evals, rates


def final_eval(cell) -> dict:
  n = cell.config.num_train_steps
  rows = [r for r in experiments.read_metrics(cell.workdir)
          if r.get('step') == n and 'eval_loss' in r]
  return rows[-1]


def _mean_std(values):
  values = [v for v in values if v is not None and math.isfinite(v)]
  if not values:
    return None, None
  mean = float(np.mean(values))
  return mean, (float(np.std(values, ddof=1)) if len(values) > 1 else None)


def _wall_times(workdir: str) -> dict:
  path = experiments._path(workdir) / 'suite_log.jsonl'
  walls = {}
  if path.exists():
    for line in path.read_text().splitlines():
      try:
        r = json.loads(line)
      except json.JSONDecodeError:
        continue
      walls[r['cell']] = walls.get(r['cell'], 0.0) + r['wall_s']
  return walls


def collect(suite, cells, facts: dict, workdir: str) -> tuple[list[dict], dict]:
  """(one row per run, curves per run: {'train': {step: mean loss}, 'eval': ...})."""
  walls = _wall_times(workdir)
  by_run = {}
  for cell in cells:
    by_run.setdefault(cell.name, []).append(cell)
  per_seed_ppl, rows, plotted = {}, [], {}
  for name, run_cells in by_run.items():
    finished = [c for c in run_cells if experiments.status(c)[0] == 'finished']
    per_seed_ppl[name] = {c.seed: final_eval(c)['eval_perplexity'] for c in finished}
    losses = [final_eval(c)['eval_loss'] for c in finished]
    shown = finished or run_cells
    seed_curves = [curves(experiments.read_metrics(c.workdir)) for c in shown]
    plotted[name] = {'train': _average([t for t, _, _ in seed_curves]),
                     'eval': _average([e for _, e, _ in seed_curves])}
    rates = [float(np.median(r)) for c, (_, _, r) in zip(shown, seed_curves)
             if r and c in finished]
    c0 = run_cells[0]
    m = c0.config.model
    loss_mean, loss_std = _mean_std(losses)
    ppl_mean, ppl_std = _mean_std(list(per_seed_ppl[name].values()))
    wall = [walls[c.key] for c in finished if c.key in walls]
    rows.append({
        'run': name, 'label': c0.run.get('label', name), 'attention': m.attention,
        'position': m.position,
        'num_kv_heads': '' if m.attention in ('mla', 'mla_qv') else m.num_kv_heads,
        'ctx_dim': m.qv_ka.ctx_dim if m.attention == 'qv_ka' else '',
        'baseline': suite.baseline(name) or '', **facts[name],
        'seeds_finished': len(finished), 'seeds': len(run_cells),
        'num_train_steps': c0.config.num_train_steps,
        'train_tokens': c0.config.num_train_steps * c0.config.global_batch_size
        * c0.config.seq_len,
        'eval_loss_mean': loss_mean, 'eval_loss_std': loss_std,
        'eval_ppl_mean': ppl_mean, 'eval_ppl_std': ppl_std,
        'tokens_per_s': float(np.mean(rates)) if rates else None,
        'wall_s': float(np.mean(wall)) if wall else None,
    })
  for row in rows:
    base = per_seed_ppl.get(row['baseline'], {})
    own = per_seed_ppl[row['run']]
    diffs = [100.0 * (own[s] / base[s] - 1.0) for s in sorted(own) if s in base]
    row['dppl_pct_mean'], row['dppl_pct_std'] = _mean_std(diffs)
  return rows, plotted


def _average(per_seed: list[dict]) -> dict:
  """step -> mean over the seeds that have that step."""
  steps = sorted(set().union(*per_seed)) if per_seed else []
  return {s: float(np.mean([d[s] for d in per_seed if s in d])) for s in steps}


# --- Writers ----------------------------------------------------------------


def write_csv(rows: list[dict]) -> str:
  out = io.StringIO()
  writer = csv.DictWriter(out, CSV_COLUMNS, lineterminator='\n')
  writer.writeheader()
  for row in rows:
    writer.writerow({k: ('' if row.get(k) is None else row[k]) for k in CSV_COLUMNS})
  return out.getvalue()


def _pm(mean, std, fmt: str, sign: bool = False) -> str:
  if mean is None:
    return '—'
  f = ('{:+' if sign else '{:') + fmt + '}'
  text = f.format(mean)
  return text + (' ± ' + ('{:' + fmt + '}').format(std) if std is not None else '')


def _si(x: float) -> str:
  for unit, scale in (('G', 1e9), ('M', 1e6), ('k', 1e3)):
    if x >= scale:
      return f'{x / scale:.2f}{unit}'
  return f'{x:.0f}'


def write_markdown(rows: list[dict], meta: dict, cells) -> str:
  seeds = meta['seeds']
  lines = [
      f'# Suite `{meta["suite"]}`, scale `{meta["scale"]}`', '',
      f'Command: `{meta["command"]}`', '',
      f'Seeds: {", ".join(str(s) for s in range(seeds))} (config.seed = seed index: the '
      'same init seed and data order for every run of a seed). '
      f'Each run: {rows[0]["num_train_steps"]} steps, {_si(rows[0]["train_tokens"])} '
      'training tokens.' if rows else '', '',
      'Eval loss and perplexity: the final evaluation, mean ± sample std over the finished '
      'seeds. Δppl: perplexity relative to the QKV (MHA) run with the same position '
      'scheme, paired by seed. FLOPs/token: forward, matmuls, at the training sequence '
      'length (training is 3x). Cache: KV-cache bytes per token over all layers. '
      'tokens/s: median training rate (this machine, while it ran).', '',
      '| run | paradigm | position | attn params | total params | FLOPs/token | cache B/token '
      '| eval loss | perplexity | Δppl vs QKV | tokens/s | seeds |',
      '|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|',
  ]
  for r in rows:
    tok_s = f'{r["tokens_per_s"]:,.0f}' if r['tokens_per_s'] is not None else '—'
    dppl = _pm(r['dppl_pct_mean'], r['dppl_pct_std'], '.2f', sign=True)
    if r['run'] == r['baseline']:
      dppl = 'baseline'
    elif r['dppl_pct_mean'] is not None:
      dppl += ' %'
    lines.append(
        f'| {r["run"]} | {r["label"]} | {r["position"]} | {r["params_attention"]:,} | '
        f'{_si(r["params_total"])} | {_si(r["flops_per_token"])} | '
        f'{r["cache_bytes_per_token"]:,} | {_pm(r["eval_loss_mean"], r["eval_loss_std"], ".4f")} | '
        f'{_pm(r["eval_ppl_mean"], r["eval_ppl_std"], ".2f")} | {dppl} | {tok_s} | '
        f'{r["seeds_finished"]}/{r["seeds"]} |')
  unfinished = []
  for cell in cells:
    state, step = experiments.status(cell)
    if state != 'finished':
      unfinished.append(f'- {cell.key}: {state}' + (f' (checkpoint at step {step})'
                                                    if state == 'partial' else ''))
  total_wall = sum(_wall_times(meta['workdir']).values())
  lines += ['', f'Wall time of the cells so far: {total_wall / 60:.1f} minutes '
            '(sum over cells and resumptions, DIR/suite_log.jsonl).', '']
  if unfinished:
    lines += ['Not finished (not in the statistics above; rerun the command to resume):', '',
              *unfinished, '']
  lines += ['![loss curves](loss_curves.png)', '']
  return '\n'.join(lines)


def plot(rows: list[dict], plotted: dict, cells) -> bytes:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  tokens_per_step = {c.name: c.config.global_batch_size * c.config.seq_len for c in cells}
  styles = {'rope': '-', 'agf': '--', 'sinusoidal': ':', 'alibi': '-.', 'none': (0, (1, 3))}
  family = lambda r: (r['attention'], r['num_kv_heads'], r['ctx_dim'])
  families = list(dict.fromkeys(family(r) for r in rows))
  cmap = plt.get_cmap('tab10' if len(families) <= 10 else 'tab20')
  color = {f: cmap(i % cmap.N) for i, f in enumerate(families)}
  fig, axes = plt.subplots(1, 3, figsize=(18, 5.5))
  total = max((max(plotted[r['run']]['train'], default=0) * tokens_per_step[r['run']]
               for r in rows), default=0)
  ys_full, ys_zoom = [], []
  for r in rows:
    style = dict(color=color[family(r)], linestyle=styles.get(r['position'], '-'),
                 linewidth=1.3, label=f'{r["run"]} ({r["position"]})')
    tps = tokens_per_step[r['run']]
    train, evals = plotted[r['run']]['train'], plotted[r['run']]['eval']
    if train:
      x = np.array(sorted(train)) * tps
      y = np.array([train[s] for s in sorted(train)])
      k = min(5, len(y))  # Moving average over 5 logged steps for the full view.
      smooth = np.convolve(np.pad(y, (k // 2, k - 1 - k // 2), mode='edge'),
                           np.ones(k) / k, mode='valid')
      axes[0].plot(x, smooth, **style)
      early = x <= 0.2 * total
      early[:3] = True  # At least a few points, even for very short runs.
      axes[2].plot(x[early], y[early], **style)
      ys_full.append(smooth[len(smooth) // 5:])
      ys_zoom.append(y[early])
    if evals:
      xe = np.array(sorted(evals)) * tps
      axes[1].plot(xe, [evals[s] for s in sorted(evals)], marker='o', markersize=3, **style)
  # Full views: from 20% of training on, where the runs differ (the zoom shows the start).
  if ys_full and any(len(y) for y in ys_full):
    lo = min(np.min(y) for y in ys_full if len(y))
    hi = max(np.max(y) for y in ys_full if len(y))
    pad = 0.05 * max(hi - lo, 1e-3)
    axes[0].set_ylim(lo - pad, hi + pad)
  titles = ('train loss (moving average of 5 logs)', 'eval loss',
            'train loss, first 20% of training')
  from matplotlib.ticker import FuncFormatter, MaxNLocator

  def tokens(x, _):
    for unit, scale in (('G', 1e9), ('M', 1e6), ('k', 1e3)):
      if abs(x) >= scale:
        return f'{x / scale:.4g}{unit}'
    return f'{x:.4g}'

  for ax, title in zip(axes, titles):
    ax.xaxis.set_major_locator(MaxNLocator(6))
    ax.xaxis.set_major_formatter(FuncFormatter(tokens))
    ax.set_title(title)
    ax.set_xlabel('training tokens')
    ax.set_ylabel('loss (nats/token)')
    ax.grid(alpha=0.3)
  handles, labels = axes[0].get_legend_handles_labels()
  if not handles:
    handles, labels = axes[1].get_legend_handles_labels()
  if handles:
    fig.legend(handles, labels, loc='center right', fontsize=8, frameon=False)
  fig.tight_layout(rect=(0, 0, 0.86, 1))
  out = io.BytesIO()
  fig.savefig(out, format='png', dpi=110)
  plt.close(fig)
  return out.getvalue()


def write(suite, cells, facts: dict, meta: dict) -> list[str]:
  """Writes results.csv, results.md and loss_curves.png; returns their paths."""
  workdir = meta['workdir']
  rows, plotted = collect(suite, cells, facts, workdir)
  d = experiments._path(workdir)
  d.mkdir(parents=True, exist_ok=True)
  (d / 'results.csv').write_text(write_csv(rows))
  (d / 'results.md').write_text(write_markdown(rows, meta, cells))
  (d / 'loss_curves.png').write_bytes(plot(rows, plotted, cells))
  return [str(d / name) for name in ('results.md', 'results.csv', 'loss_curves.png')]
