"""Looking inside a trained model.

    python -m qvjax.inspect attention --workdir=runs/qv_small --text="There is a beautiful girl."

Restores the workdir's latest checkpoint (params only, one device; the model
config comes from the checkpoint itself, the tokenizer from the workdir),
runs the text as training sees a document ([bos] + pieces, positions from
0), and for every layer and head:
  - renders the attention probabilities as a heat map, one PNG per layer
    (OUT/layer<l>.png, rows = query tokens, columns = attended tokens), and
    all layers in one figure when there are at most 64 maps (OUT/all_layers.png);
  - prints, for each query token, the tokens it attends to most (also in
    OUT/top_tokens.txt); OUT/probs.npz holds the numbers (L, H, T, T).
OUT defaults to <workdir>/inspect/attention_step<N>. The probabilities are
the ones the forward pass uses (`attention_probs` of each paradigm: the same
queries, keys, scale, position bias and mask), so QKV, QV, QV-Ka and MLA can
be put side by side: run it on two workdirs and compare.
"""

import argparse
import json
import os
import sys

import numpy as np


def attention_maps(model, tokens_BT, positions_BT=None, segment_ids_BT=None) -> list:
  """Each layer's attention probabilities (B, H, T, T), running the decoder's
  own blocks in order."""
  import jax.numpy as jnp
  if positions_BT is None:
    positions_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)
  if segment_ids_BT is None:
    segment_ids_BT = jnp.ones_like(tokens_BT)
  x_BTD = model.embed(tokens_BT, positions_BT)
  maps = []
  for block in model.blocks:
    maps.append(block.attn.attention_probs(block.attn_norm(x_BTD), positions_BT,
                                           segment_ids_BT))
    x_BTD = block(x_BTD, positions_BT, segment_ids_BT)
  return maps


def load(workdir: str, step: int | None = None):
  """(model, tokenizer, step) from the workdir's checkpoint (latest by default)."""
  import jax
  import ml_collections
  from flax import nnx
  from flax.core import spmd

  from qvjax import checkpoint, config as config_lib, sharding
  from qvjax.data import tokenizer as tokenizer_lib
  from qvjax.model import Decoder

  manager = checkpoint.make_manager(workdir, None, read_only=True)
  steps = manager.all_steps()
  if not steps:
    raise config_lib.ConfigError(f'--workdir={workdir} is invalid: no checkpoint in '
                                 f'{checkpoint.checkpoint_dir(workdir)}')
  if step is None:
    step = max(steps)
  elif step not in steps:
    raise config_lib.ConfigError(f'--step={step} is invalid: checkpoints exist for steps '
                                 f'{sorted(steps)}')
  meta = checkpoint.restore_meta(manager, step)
  m = ml_collections.ConfigDict(meta['model'])
  config_lib.validate_model(m)
  tokenizer_path = os.path.join(workdir, 'tokenizer', 'spm.model')
  record = os.path.join(workdir, 'run.json')
  if os.path.exists(record):
    with open(record) as f:
      tokenizer_path = json.load(f).get('tokenizer', {}).get('path') or tokenizer_path
  if not os.path.exists(tokenizer_path) and not tokenizer_path.startswith('gs://'):
    raise config_lib.ConfigError(f'--workdir={workdir} is invalid: no tokenizer at '
                                 f'{tokenizer_path}')
  tokenizer = tokenizer_lib.load(tokenizer_path)
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  with jax.set_mesh(mesh), spmd.logical_axis_rules(sharding.logical_rules(m, mesh)):
    abstract = nnx.eval_shape(lambda: Decoder(m, nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    checkpoint.check_shapes(manager, step, abstract_state)
    state, _ = checkpoint.restore_params(manager, step, abstract_state,
                                         sharding.state_shardings(abstract_state, mesh))
  manager.close()
  return nnx.merge(graphdef, state), tokenizer, step


def token_labels(tokenizer, ids) -> list[str]:
  sp = tokenizer.processor
  labels = []
  for i in ids:
    if i == tokenizer.bos_id:
      labels.append('<s>')
    else:
      labels.append(repr(sp.id_to_piece(int(i)).replace('\u2581', ' '))[1:-1])
  return labels


def top_tokens(probs_LHTT: np.ndarray, labels: list[str], k: int) -> list[str]:
  """Per layer, head and query token: the k most attended tokens."""
  L, H, T, _ = probs_LHTT.shape
  lines = []
  for l in range(L):
    for h in range(H):
      lines.append(f'layer {l} head {h}:')
      for t in range(T):
        row = probs_LHTT[l, h, t, :t + 1]
        order = np.argsort(-row, kind='stable')[:k]
        tops = ', '.join(f"'{labels[s]}' {row[s]:.2f}" for s in order)
        lines.append(f"  {t:>3} '{labels[t]}' -> {tops}")
  return lines


def render(probs_LHTT: np.ndarray, labels: list[str], out: str, title: str) -> list[str]:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  L, H, T, _ = probs_LHTT.shape
  size = max(2.2, 0.22 * T + 1.0)
  paths = []

  def draw(ax, probs, name):
    ax.imshow(probs, cmap='viridis', vmin=0.0, vmax=1.0, interpolation='nearest')
    ax.set_title(name, fontsize=9)
    ax.set_xticks(range(T), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(T), labels, fontsize=7)

  cols = min(H, 4)
  rows = -(-H // cols)
  for l in range(L):
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, size * rows), squeeze=False)
    for h in range(rows * cols):
      ax = axes[h // cols, h % cols]
      if h < H:
        draw(ax, probs_LHTT[l, h], f'head {h}')
      else:
        ax.axis('off')
    fig.suptitle(f'{title}, layer {l} (row: query token, column: attended token)', fontsize=10)
    fig.tight_layout()
    path = os.path.join(out, f'layer{l}.png')
    fig.savefig(path, dpi=100)
    plt.close(fig)
    paths.append(path)
  if L * H <= 64:
    fig, axes = plt.subplots(L, H, figsize=(size * H, size * L), squeeze=False)
    for l in range(L):
      for h in range(H):
        draw(axes[l, h], probs_LHTT[l, h], f'layer {l} head {h}')
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path = os.path.join(out, 'all_layers.png')
    fig.savefig(path, dpi=90)
    plt.close(fig)
    paths.append(path)
  return paths


def run_attention(workdir: str, text: str, out: str | None = None, step: int | None = None,
                  top: int = 3) -> dict:
  """Everything `attention` does; returns {'probs', 'labels', 'pngs', 'text'}."""
  import jax.numpy as jnp
  model, tokenizer, step = load(workdir, step)
  m = model.cfg
  ids = [tokenizer.bos_id] + tokenizer.encode(text)
  # Positions beyond training's sequence length were never trained.
  seq_len = None
  record = os.path.join(workdir, 'run.json')
  if os.path.exists(record):
    with open(record) as f:
      seq_len = json.load(f).get('seq_len')
  if seq_len and len(ids) > seq_len:
    print(f'note: the text is {len(ids)} tokens; keeping the first {seq_len} (the training '
          'sequence length)', file=sys.stderr)
    ids = ids[:seq_len]
  maps = attention_maps(model, jnp.asarray([ids], jnp.int32))
  probs_LHTT = np.stack([np.asarray(p[0], np.float32) for p in maps])
  labels = token_labels(tokenizer, ids)
  out = out or os.path.join(workdir, 'inspect', f'attention_step{step}')
  os.makedirs(out, exist_ok=True)
  kv = '' if m.attention in ('mla', 'mla_qv') else f', {m.num_kv_heads} KV heads'
  title = f'{m.attention} ({m.position}{kv}), step {step}'
  pngs = render(probs_LHTT, labels, out, title)
  lines = [f'{title}: {len(ids)} tokens: ' + ' '.join(f"'{t}'" for t in labels),
           f'top {top} attended tokens per query token (probability):',
           *top_tokens(probs_LHTT, labels, top)]
  report = '\n'.join(lines) + '\n'
  with open(os.path.join(out, 'top_tokens.txt'), 'w') as f:
    f.write(report)
  np.savez_compressed(os.path.join(out, 'probs.npz'), probs=probs_LHTT,
                      tokens=np.asarray(ids), labels=np.asarray(labels))
  return {'probs': probs_LHTT, 'labels': labels, 'pngs': pngs, 'text': report, 'out': out}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog='python -m qvjax.inspect',
                              description=__doc__.split('\n\n')[0])
  sub = p.add_subparsers(dest='what', required=True)
  a = sub.add_parser('attention', help='attention maps and top attended tokens')
  a.add_argument('--workdir', required=True, help='a training workdir (with checkpoints/)')
  a.add_argument('--text', default='There is a beautiful girl.', help='the text to run')
  a.add_argument('--out', default=None,
                 help='where the PNGs go (default <workdir>/inspect/attention_step<N>)')
  a.add_argument('--step', type=int, default=None, help='checkpoint step (default: latest)')
  a.add_argument('--top', type=int, default=3, help='attended tokens listed per query token')
  args = p.parse_args(argv)
  from absl import logging
  logging.set_verbosity(logging.ERROR)  # Orbax's note on read-only checkpoint directories.
  from qvjax.config import ConfigError
  try:
    result = run_attention(args.workdir, args.text, args.out, args.step, args.top)
  except ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(result['text'], end='')
  print('PNGs: ' + ', '.join(result['pngs']))
  return 0


if __name__ == '__main__':
  sys.exit(main())
