"""Presets: named overlays of documented keys, applied before the command line's overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from trainer.config import PRESET_KEYS, ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "agent-sft.yaml"


def test_a_preset_sets_its_keys_and_the_command_line_wins():
    base = load_config(CONFIG)
    fast = load_config(CONFIG, ["preset=fast"])
    overlay = yaml.safe_load((ROOT / "configs/presets/fast.yaml").read_text())
    assert fast.preset == "fast" and base.preset is None
    assert fast.eval.every == overlay["eval.every"] != base.eval.every
    assert fast.tensorboard is False
    assert fast.agent is not None and fast.agent["eval_max_episodes"] == 100
    # what the preset does not name is the config's own
    assert fast.stages[0].to_dict() == base.stages[0].to_dict()
    assert fast.model == base.model
    both = load_config(CONFIG, ["eval.every=7", "preset=fast"])
    assert both.eval.every == 7, "an explicit override beats the preset, whatever the order"


@pytest.mark.parametrize("path", sorted((ROOT / "configs/presets").glob("*.yaml")), ids=str)
def test_shipped_presets_name_only_documented_keys(path):
    overlay = yaml.safe_load(path.read_text())
    assert overlay and set(overlay) <= set(PRESET_KEYS)
    for config in sorted((ROOT / "configs").glob("*.yaml")):
        load_config(config, [f"preset={path.stem}"])  # every shipped config takes every preset


def test_a_preset_may_not_change_what_is_trained(tmp_path):
    (tmp_path / "presets").mkdir()
    (tmp_path / "presets" / "sneaky.yaml").write_text("stages.*.lr: 1.0\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(CONFIG.read_text())
    with pytest.raises(ConfigError, match=r"stages\.\*\.lr: a preset may only set") as e:
        load_config(cfg, ["preset=sneaky"])
    assert "\n" not in str(e.value)


def test_stage_wildcards_reach_every_stage(tmp_path):
    (tmp_path / "presets").mkdir()
    (tmp_path / "presets" / "acc.yaml").write_text("stages.*.grad_accumulation: 4\n")
    raw = yaml.safe_load(CONFIG.read_text())
    raw["stages"].append({**raw["stages"][0], "name": "sft2", "init": "sft"})
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    got = load_config(cfg, ["preset=acc"])
    assert [s.params["grad_accumulation"] for s in got.stages] == [4, 4]


def test_an_unknown_preset_names_where_presets_live():
    with pytest.raises(ConfigError, match="no preset 'fastest'.*configs/presets/NAME.yaml"):
        load_config(CONFIG, ["preset=fastest"])
