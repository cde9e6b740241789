"""Config precedence (defaults < yaml < CLI), rejection of unknown keys and bad types, one-line errors."""
import subprocess
import sys

import pytest
import yaml
from conftest import ROOT

import tinyvla


def test_precedence_default_yaml_cli(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"horizon": 10, "learning_rate": 1e-4, "use_lora": True, "lora_r": 8}))
    m, d, e, t = tinyvla.parse_args([])
    assert (d.horizon, m.use_lora, t.output_dir) == (8, False, "runs/tinyvla")  # defaults
    m, d, e, t = tinyvla.parse_args(["--config", str(cfg)])
    assert (d.horizon, t.learning_rate, m.use_lora, m.lora_r) == (10, 1e-4, True, 8)  # yaml over defaults
    m, d, e, t = tinyvla.parse_args(["--config", str(cfg), "--horizon", "4", "--learning_rate", "3e-5"])
    assert (d.horizon, t.learning_rate, m.lora_r) == (4, 3e-5, 8)  # CLI over yaml
    # SFTConfig settings TinyVLA needs are in place
    assert t.remove_unused_columns is False and t.dataset_kwargs == {"skip_prepare_dataset": True}
    assert t.max_length is None


def test_repo_config_yaml_parses():
    m, d, e, t = tinyvla.parse_args(["--config", str(ROOT / "config.yaml")])
    assert m.model_id == "Qwen/Qwen2.5-VL-3B-Instruct" and d.horizon == 8 and d.tile_images


@pytest.mark.parametrize("content, message", [
    ({"horizn": 8}, "horizn"),
    ({"lora_r": 3.5}, "lora_r must be int"),
    ({"tile_images": 3}, "tile_images must be bool"),
    ({"horizon": True}, "horizon must be int"),
    ({"crop_ratio": [0.9]}, "crop_ratio must be float"),
    ({"image_keys": "image"}, "image_keys must be list"),
    ({"action_norm": "per_episode"}, "action_norm must be one of"),
    ({"learning_rate": "fast"}, "learning_rate"),
])
def test_bad_yaml_fails(tmp_path, content, message):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(content))
    with pytest.raises(tinyvla.TinyVLAError, match=message):
        tinyvla.parse_args(["--config", str(cfg)])


def test_yaml_int_is_a_fine_float(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"crop_ratio": 1, "val_ratio": 0}))
    d = tinyvla.parse_args(["--config", str(cfg)])[1]
    assert d.crop_ratio == 1 and d.val_ratio == 0


def test_bad_flag_fails_without_abbreviation():
    with pytest.raises(tinyvla.TinyVLAError, match="not used.*--lr"):
        tinyvla.parse_args(["--lr", "1e-4"])  # no silent prefix match to --lr_scheduler_type
    with pytest.raises(tinyvla.TinyVLAError, match="--suite: invalid choice: .libero_100."):
        tinyvla.parse_args(["--suite", "libero_100"])


def test_cli_error_is_one_line_nonzero_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    for argv in (["--horizn", "8"], ["--output_dir", str(out), "--repo_id", str(tmp_path / "missing")],
                 ["--eval", str(tmp_path)]):
        r = subprocess.run([sys.executable, str(ROOT / "tinyvla.py"), *argv], capture_output=True, text=True,
                           cwd=tmp_path, timeout=300)
        lines = [line for line in r.stderr.splitlines() if line.startswith("tinyvla: error")]
        assert r.returncode != 0 and len(lines) == 1, r.stderr[-2000:]
        assert "Traceback" not in r.stderr
    assert not out.exists()
