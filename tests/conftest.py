"""Test setup. TRITON_INTERPRET=1 must be set before any Triton kernel is defined, so it is set
here, before bmssl (or triton) is imported. On a GPU machine, BMSSL_TEST_TRITON_GPU=1 leaves it
unset so the Triton kernels compile for the GPU."""
import os

import pytest
import torch

if not torch.cuda.is_available() or os.environ.get("BMSSL_TEST_TRITON_GPU") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("ci", derandomize=True, deadline=None, max_examples=25, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", deadline=None, max_examples=40,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none is visible to torch on this machine")
    for item in items:
        if "gpu" in item.keywords and not CUDA:
            item.add_marker(skip_gpu)


def pytest_report_header(config):
    import bmssl

    return [f"bmssl backends: {bmssl.ops.status()}",
            f"hypothesis profile: {settings._current_profile}"]
