import os
import re

# Sharding tests need several devices; this must be set before jax starts its backend.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402,F401
import pytest  # noqa: E402

from . import impls  # noqa: E402

# The CUDA implementation is here: a CUDA device and the CUDA kernels in this build.
ON_GPU = "cuda" in impls.present()

_REQUIRE_GPU = pytest.StashKey[bool]()


def pytest_addoption(parser):
    parser.addoption(
        "--require-gpu", action="store_true", default=False,
        help="fail (do not skip) when there is no CUDA device or the build has no CUDA kernels; "
             f"the same as {impls.REQUIRE_GPU_ENV}=1")


def pytest_configure(config):
    try:
        required = impls.require_gpu(config.getoption("--require-gpu"))
    except ValueError as e:
        raise pytest.UsageError(str(e)) from None
    config.stash[_REQUIRE_GPU] = required
    if required and not ON_GPU:
        # Fail the session before anything runs: a GPU run must not pass by skipping.
        raise pytest.UsageError(
            f"--require-gpu / {impls.REQUIRE_GPU_ENV}=1, but the CUDA implementation is "
            f"missing: {impls.missing_reason('cuda')}")


def pytest_report_header(config):
    names = ", ".join(f"{i.name} ({i.device})" for i in impls.present().values())
    return f"jax_router implementations: {names}; require GPU: {config.stash[_REQUIRE_GPU]}"


def pytest_generate_tests(metafunc):
    """Parametrizes `impl` over the present implementations and `kernel_impl` over the present
    kernels. Under --require-gpu every one is listed, so a missing one errors, never drops out."""
    required = metafunc.config.stash[_REQUIRE_GPU]
    # a test that parametrizes an argument of that name itself means something else by it
    own = {name.strip() for m in metafunc.definition.iter_markers("parametrize")
           for name in (m.args[0].split(",") if isinstance(m.args[0], str) else m.args[0])}
    for fixture, names in (("impl", impls.NAMES), ("kernel_impl", impls.KERNEL_NAMES)):
        if fixture in metafunc.fixturenames and fixture not in own:
            names = [n for n in names if required or n in impls.present()]
            metafunc.parametrize(fixture, names, indirect=True, ids=names)


def _activate(request):
    found = impls.get(request.param)
    if found is None:
        pytest.fail(f"implementation {request.param!r} is missing: "
                    f"{impls.missing_reason(request.param)}", pytrace=False)
    # The whole test runs with this implementation's device as JAX's default device: arrays
    # the body creates live there, and everything it computes (the reference too) runs there.
    with found.on_device():
        yield found


@pytest.fixture
def impl(request):
    """Each present implementation in turn (tests/impls.py): xla, cpu, cuda."""
    yield from _activate(request)


@pytest.fixture
def kernel_impl(request):
    """Each present kernel implementation in turn: cpu, cuda (for properties of the kernels
    alone, such as bitwise repeatability)."""
    yield from _activate(request)


def pytest_collection_modifyitems(config, items):
    if ON_GPU or config.stash[_REQUIRE_GPU]:
        return  # (with --require-gpu and no GPU the session has already failed)
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under --require-gpu, a test that skips itself for lack of a GPU fails instead."""
    outcome = yield
    report = outcome.get_result()
    if not (report.skipped and item.config.stash[_REQUIRE_GPU]) or hasattr(report, "wasxfail"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if re.search(r"\b(GPU|CUDA|cuda)\b", reason):
        report.outcome = "failed"
        report.longrepr = f"skipped for lack of a GPU under --require-gpu: {reason}"
