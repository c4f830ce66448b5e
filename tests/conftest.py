import os
from pathlib import Path

# Hugging Face code reads these at import time; without them an offline hub call retries for ~50 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Every test model is tiny: its ops gain nothing from intra-op threads, and on a busy 2-core
    machine a second thread makes training runs several times slower. One thread also keeps float
    sums (and so the bit-identity checks of resumed runs) the same in-process and in the
    subprocesses the resume tests start with OMP_NUM_THREADS=1."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """A backbone cache shared by one test module (a pretrained backbone is built once per module)."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def vit_b16():
    """CLIP ViT-B/16 built from its open_clip config with random weights (no download), for
    parameter counts at the published sizes. Shared by the whole session: do not modify it (a
    test that injects modules, like peft, works on a copy)."""
    import logging

    from benchmark.backbone import load_backbone

    logger = logging.getLogger("benchmark.backbone.resolve")  # "random weights" is the point here
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield load_backbone("ViT-B-16")
    finally:
        logger.setLevel(level)
