"""Fixtures and hooks of the bench suite: peak memory, machine details in the JSON, a ratio summary at the end."""

from __future__ import annotations

import json
import os

import pytest
import torch
from _peak_memory import cuda_peak, measure_cpu

_SUMMARY = pytest.StashKey[list]()
_LOAD = pytest.StashKey[tuple]()


def pytest_sessionstart(session):
    # The load average before and after the run goes into the JSON: timings from a busy shared machine show it.
    session.config.stash[_LOAD] = os.getloadavg()


@pytest.fixture(scope="session")
def peak_memory():
    """measure(case, name, impl) -> bytes for one mode. On CPU one subprocess per (kernel, implementation, shape)
    measures every mode of the kernel at once and is remembered for the session; on CUDA it runs in this process."""
    cache = {}

    def measure(case, name, impl) -> int:
        if case.device == "cuda":
            return cuda_peak(impl, case.mode, case.device)
        key = (case.kernel, name, json.dumps(case.shape, sort_keys=True))
        if key not in cache:
            cache[key] = measure_cpu(case.kernel, name, case.shape, case.suite.modes)
        return cache[key][case.mode]

    return measure


@pytest.fixture
def summary(request):
    """Where a test leaves one line for the ratio summary printed after pytest-benchmark's tables."""
    return request.config.stash.setdefault(_SUMMARY, [])


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    lines = config.stash.get(_SUMMARY, [])
    if lines:
        terminalreporter.section("same-run ratios (minimum times; x floor = time / the GEMMs of the mode)")
        for line in lines:
            terminalreporter.write_line(line)


def pytest_benchmark_update_json(config, benchmarks, output_json):
    # Beside machine_info, not in it: --benchmark-compare warns whenever two runs' machine_info differ. The end
    # value counts the run's own threads.
    output_json["load_average_1_5_15_min"] = {"start": config.stash.get(_LOAD, None), "end": os.getloadavg()}


def pytest_benchmark_update_machine_info(config, machine_info):
    from importlib.metadata import PackageNotFoundError, version

    from _common import device_name

    versions = {}
    for package in ("torch", "triton", "liger-kernel", "pytest-benchmark"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    machine_info["packages"] = versions
    machine_info["cpu_device"] = device_name(torch.device("cpu"))
    if torch.cuda.is_available():
        machine_info["cuda_device"] = device_name(torch.device("cuda"))
