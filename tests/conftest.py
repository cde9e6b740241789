import os
import socket
import sys
import tempfile
from pathlib import Path

# Before torch is imported anywhere: one CPU thread (two made tiny steps 10-80x noisier), nothing from the hub,
# and every cache inside a temp dir.
_TMP = Path(tempfile.mkdtemp(prefix="tinyvla-tests-"))
os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                  TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", MUJOCO_GL="egl", HF_HOME=str(_TMP / "hf"),
                  MPLCONFIGDIR=str(_TMP / "mpl"), MESA_SHADER_CACHE_DIR=str(_TMP / "mesa"),
                  LIBERO_CONFIG_PATH=str(_TMP / "libero"), WANDB_MODE="disabled")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest  # noqa: E402

import tiny  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "assets"
QWEN_DIR = SHARED / "qwen2.5-vl-3b-instruct"
needs_shared = pytest.mark.skipif(not QWEN_DIR.exists(), reason="../shared/assets/qwen2.5-vl-3b-instruct not present")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return tiny.make_model_dir(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="session")
def dataset_v2(tmp_path_factory):
    return tiny.make_dataset(tmp_path_factory.mktemp("libero_v2"), "v2.1")


@pytest.fixture(scope="session")
def dataset_v3(tmp_path_factory):
    return tiny.make_dataset(tmp_path_factory.mktemp("libero_v3"), "v3.0")


def train_args(model, data, out, *extra):
    """CLI flags for a few-step CPU training run of the tiny model."""
    return ["--model_id", str(model), "--repo_id", str(data), "--output_dir", str(out), "--dtype", "float32",
            "--use_cpu", "true", "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "2",
            "--max_steps", "4", "--logging_steps", "1", "--gen_eval_samples", "2", "--dataloader_num_workers", "0",
            *map(str, extra)]


@pytest.fixture(scope="session")
def trained_run(tiny_model, dataset_v2, tmp_path_factory):
    """One in-process training run shared by the inference and eval tests."""
    import tinyvla
    out = tmp_path_factory.mktemp("run")
    trainer = tinyvla.train(*tinyvla.parse_args(train_args(tiny_model, dataset_v2, out, "--eval_strategy", "steps",
                                                           "--eval_steps", "2", "--save_steps", "2",
                                                           "--save_strategy", "steps")))
    return out, trainer


@pytest.fixture(scope="module")
def policy(trained_run):
    """The trained tiny checkpoint as a Policy, on CPU."""
    import tinyvla
    return tinyvla.Policy(trained_run[0] / "final", device="cpu")


def observations(n, seed=0):
    """n random observations: [agent view, wrist] 256x256 RGB frames each."""
    import numpy as np
    rng = np.random.default_rng(seed)
    return [[rng.integers(0, 255, (256, 256, 3), np.uint8) for _ in range(2)] for _ in range(n)]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
