import os

import pytest
import torch

# Two cores on CI: keep torch from oversubscribing them.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny ops: faster, and immune to OpenMP contention when
    the machine is loaded (use with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# transformers imports torchvision whenever it is installed, and PyPI's torchvision for torch 2.13
# fails to import against a CPU-only torch; define the op schemas it needs before any test imports
# transformers (tests/thirdparty/torchvision_shim.py says why; a no-op where torchvision works).
from thirdparty.torchvision_shim import install as _install_torchvision_shim  # noqa: E402

_install_torchvision_shim()
