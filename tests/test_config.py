"""The batch settings (a global batch per step, split into micro-steps per device), named configs
on 1 to 256 devices, and configs saved before today's batch settings."""

import dataclasses

import pytest

from gptjax import config as config_lib
from gptjax.errors import UserError

# What each named config's header states: tokens per optimizer step, on any device count.
STATED_TOKENS = {"gpt2_124m": 491_520, "smollm2_135m": 524_288, "llama3_2_1b": 524_288, "qwen3_0_6b": 524_288,
                 "qwen3_30b_a3b": 1_048_576, "finetune_shakespeare": 32 * 1024}


def _train(**fields) -> config_lib.TrainConfig:
  return dataclasses.replace(config_lib.TrainConfig(), **fields)


@pytest.mark.parametrize("name", sorted(STATED_TOKENS))
@pytest.mark.parametrize("devices", [1, 2, 4, 8])
def test_named_configs_split_their_batch_on_1_to_8_devices_with_the_same_tokens_per_step(name, devices):
  cfg = config_lib.load_config(name)
  micro, accum = cfg.train.micro_batches(devices)
  assert micro * accum == cfg.train.batch_size and micro % devices == 0
  assert cfg.tokens_per_step == STATED_TOKENS[name]
  assert micro // devices == cfg.train.device_batch_size  # each device's micro-batch is the config's


def test_gpt2_124m_is_nanogpts_batch_of_12_per_device_accumulated_to_480():
  t = config_lib.load_config("gpt2_124m").train
  assert [t.micro_batches(n) for n in (1, 2, 4, 8)] == [(12, 40), (24, 20), (48, 10), (96, 5)]


def test_either_setting_works_out_the_other():
  assert _train(batch_size=64).micro_batches(8) == (64, 1)  # neither: the whole batch at once
  assert _train(batch_size=64, device_batch_size=2).micro_batches(8) == (16, 4)
  assert _train(batch_size=64, grad_accum_steps=2).micro_batches(8) == (32, 2)
  assert _train(batch_size=64, device_batch_size=4, grad_accum_steps=2).micro_batches(8) == (32, 2)


def test_batches_that_do_not_split_are_one_line_errors_that_name_a_fix():
  with pytest.raises(UserError, match=r"train.batch_size=12 is not divisible by data\*fsdp\*expert=8 devices: set a multiple of 8"):
    _train(batch_size=12).micro_batches(8)
  with pytest.raises(UserError, match=r"480 over 16 devices is 30 sequences per device, not a multiple of "
                                      r"train.device_batch_size=12: .* a divisor of 30 \(e.g. 10\), or "
                                      r"train.batch_size to a multiple of 192"):
    config_lib.load_config("gpt2_124m").train.micro_batches(16)
  with pytest.raises(UserError, match=r"device_batch_size=4 x grad_accum_steps=4 is not .* = 8: set one of the two"):
    _train(batch_size=64, device_batch_size=4, grad_accum_steps=4).micro_batches(8)
  with pytest.raises(UserError, match="must be >= 0"):
    config_lib.load_config(None, ["train.device_batch_size=-1"])


def test_a_config_saved_before_device_batch_size_reads_as_the_same_batch_per_step():
  saved = config_lib.to_dict(config_lib.load_config("gpt2_124m"))
  del saved["train"]["device_batch_size"]
  saved["train"].update(batch_size=12, grad_accum_steps=40)  # then: a micro-batch of 12, 40 of them
  old = config_lib.from_dict(saved)
  assert old.train.batch_size == 480 and old.tokens_per_step == 491_520 and old.train.micro_batches(1) == (12, 40)


def test_block_size_is_at_most_the_models_positions():
  assert config_lib.load_config(None, ["model.max_positions=2048", "model.block_size=512"]).model.position_limit == 2048
  with pytest.raises(UserError, match=r"model.block_size=4096 is longer than the model's 2048 positions"):
    config_lib.load_config(None, ["model.max_positions=2048", "model.block_size=4096"])


def test_scan_layers_takes_auto_true_or_false():
  assert config_lib.load_config(None).model.scan_layers == "auto"
  assert config_lib.load_config(None, ["model.scan_layers=true"]).model.scan_layers == "true"
  with pytest.raises(UserError, match="model.scan_layers='sometimes' is not auto, true or false"):
    config_lib.load_config(None, ["model.scan_layers=sometimes"])
