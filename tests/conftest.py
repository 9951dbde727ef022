import pytest
import torch

# The float32 references are compared at float32 accuracy: cuDNN's TF32 convolutions (on by
# default) and TF32 matmuls (a user setting) round inputs to 10 mantissa bits, ~1e-3 relative.
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False


def _cuda_ready() -> bool:
    if not torch.cuda.is_available():
        return False
    import peft_kernels as pk

    return bool(pk.build_info()["cuda"])


def pytest_collection_modifyitems(config, items):
    # Queried here, at collection time, never at import time of the package.
    if any("cuda" in item.keywords for item in items) and not _cuda_ready():
        skip = pytest.mark.skip(reason="needs a CUDA device and a CUDA build of peft_kernels")
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(skip)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param
