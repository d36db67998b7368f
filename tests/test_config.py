"""The validator: every bad knob is refused in one line naming the key, the
value and what is valid (in-process, no JAX: fast)."""

import pytest

from configs import default, tiny
from qvjax import config as config_lib

# (override dict, the key the message must name). Dotted keys under config.
BAD = [
    ({'name': ''}, 'name'), ({'name': 'a/b'}, 'name'), ({'seed': -1}, 'seed'),
    ({'model.attention': 'kqv'}, 'model.attention'), ({'model.num_layers': 0}, 'model.num_layers'),
    ({'model.emb_dim': -8}, 'model.emb_dim'), ({'model.num_heads': 0}, 'model.num_heads'),
    ({'model.num_kv_heads': 3}, 'model.num_kv_heads'), ({'model.num_kv_heads': 0},
                                                          'model.num_kv_heads'),
    ({'model.head_dim': 7}, 'model.head_dim'), ({'model.mlp_dim': 0}, 'model.mlp_dim'),
    ({'model.vocab_size': 0}, 'model.vocab_size'), ({'model.position': 'learned'},
                                                    'model.position'),
    ({'model.rope_theta': 0.0}, 'model.rope_theta'), ({'model.dtype': 'float16'}, 'model.dtype'),
    ({'model.init_std': 0.0}, 'model.init_std'), ({'model.norm_eps': 0.0}, 'model.norm_eps'),
    ({'model.qv_ka.ctx_dim': -1}, 'model.qv_ka.ctx_dim'),
    ({'model.attention': 'mla_qv', 'model.mla.v_head_dim': 8, 'model.mla.qk_nope_head_dim': 4},
     'model.mla.qk_nope_head_dim'),
    ({'model.attention': 'mla', 'model.mla.kv_lora_rank': 0}, 'model.mla.kv_lora_rank'),
    ({'model.attention': 'mla', 'model.mla.qk_rope_head_dim': 3}, 'model.mla.qk_rope_head_dim'),
    ({'model.position': 'agf', 'model.agf.init_min': 0.0}, 'model.agf'),
    ({'seq_len': 0}, 'seq_len'), ({'num_train_steps': 0}, 'num_train_steps'),
    ({'log_every_steps': 0}, 'log_every_steps'), ({'eval_every_steps': -1}, 'eval_every_steps'),
    ({'eval_batches': 0}, 'eval_batches'), ({'checkpoint_every_steps': 0},
                                            'checkpoint_every_steps'),
    ({'max_checkpoints_to_keep': 0}, 'max_checkpoints_to_keep'),
    ({'warmup_steps': -1}, 'warmup_steps'), ({'global_batch_size': -1}, 'global_batch_size'),
    ({'per_device_batch_size': 4}, 'global_batch_size'), ({'learning_rate': 0.0},
                                                          'learning_rate'),
    ({'grad_clip_norm': -1.0}, 'grad_clip_norm'), ({'end_learning_rate_ratio': 2.0},
                                                   'end_learning_rate_ratio'),
    ({'weight_decay': -0.1}, 'weight_decay'), ({'adam_b1': 1.0}, 'adam_b1'),
    ({'adam_b2': -0.5}, 'adam_b2'), ({'nonfinite_policy': 'ignore'}, 'nonfinite_policy'),
    ({'max_consecutive_nonfinite': 0}, 'max_consecutive_nonfinite'),
    ({'tokenizer.model_type': 'wordpiece'}, 'tokenizer.model_type'),
    ({'tokenizer.vocab_size': 300}, 'tokenizer.vocab_size'),
    ({'sample.temperature': -1.0}, 'sample.temperature'), ({'sample.top_k': -1}, 'sample.top_k'),
    ({'sample.max_new_tokens': -1}, 'sample.max_new_tokens'),
]
# Checks that need the device and process counts: (override, devices, processes, key).
BAD_FOR_DEVICES = [
    ({'mesh.data': 3}, 8, 1, 'mesh'), ({'mesh.tensor': 0}, 8, 1, 'mesh.tensor'),
    ({'mesh.data': -1, 'mesh.fsdp': -1}, 8, 1, 'mesh'), ({'mesh.data': 16}, 8, 1, 'mesh'),
    ({'mesh.tensor': 8, 'mesh.data': 1}, 8, 1, 'model.num_heads'),
    ({'mesh.fsdp': 8, 'mesh.data': 1, 'model.emb_dim': 36, 'model.num_heads': 4}, 8, 1,
     'model.emb_dim'),
    ({'global_batch_size': 12}, 8, 1, 'global_batch_size'),
    ({'global_batch_size': 6, 'mesh.data': 2, 'mesh.fsdp': 1, 'mesh.tensor': 1}, 2, 4,
     'global_batch_size'),
    ({'dcn_mesh.data': 3}, 8, 2, 'dcn_mesh'), ({'dcn_mesh.fsdp': 0}, 8, 1, 'dcn_mesh.fsdp'),
]


def with_overrides(overrides):
  c = tiny.get_config()
  for dotted, value in overrides.items():
    *path, key = dotted.split('.')
    node = c
    for part in path:
      node = node[part]
    node[key] = value
  return c


def test_the_shipped_configs_are_valid():
  config_lib.validate(default.get_config(), num_devices=1)
  config_lib.validate(tiny.get_config(), num_devices=8)


@pytest.mark.parametrize('overrides,key', BAD, ids=[str(b[0]) for b in BAD])
def test_bad_knob_is_refused_naming_it(overrides, key):
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate_static(with_overrides(overrides))
  message = str(e.value)
  assert message.startswith(f'config.{key}=') and 'is invalid' in message
  assert '\n' not in message


@pytest.mark.parametrize('overrides,devices,processes,key', BAD_FOR_DEVICES,
                         ids=[str(b[0]) for b in BAD_FOR_DEVICES])
def test_bad_knob_for_the_devices_is_refused_naming_it(overrides, devices, processes, key):
  c = with_overrides(overrides)
  config_lib.validate_static(c)
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate_for_devices(c, devices, processes)
  assert str(e.value).startswith(f'config.{key}=') and '\n' not in str(e.value)


def test_an_unwritable_workdir_is_refused(tmp_path):
  locked = tmp_path / 'locked'
  locked.mkdir()
  (locked / 'file').write_text('x')
  with pytest.raises(config_lib.ConfigError, match='--workdir=.* is not a writable directory'):
    config_lib.validate_static(tiny.get_config(), workdir=str(locked / 'file' / 'run'))
