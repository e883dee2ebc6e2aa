"""The examples: the NNX MoE training run (loss falls, load balances) and the demo's pieces.

The NNX example trains in-process on the devices conftest.py sets up (8 host devices on CPU),
so its data parallelism and the router's sharding rule are exercised, not just one device.
"""

import dataclasses
import importlib.util
import io
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples")


def _load(name):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def moe_nnx():
    pytest.importorskip("flax")
    pytest.importorskip("optax")
    return _load("moe_nnx")


@pytest.fixture(scope="module")
def demo():
    return _load("demo")


@pytest.fixture(scope="module")
def nnx_history(moe_nnx):
    cfg = dataclasses.replace(moe_nnx.PRESETS["cpu"], log_every=10**9)
    return moe_nnx.train(cfg, log=lambda *a: None)


def test_moe_nnx_loss_falls(nnx_history):
    h = nnx_history
    assert np.isfinite(h.loss).all()
    first, last = h.loss[:20].mean(), h.loss[-20:].mean()
    assert last < 0.2 * first, (first, last)


def test_moe_nnx_bias_balances_expert_load(nnx_history):
    # Without the bias rule (--bias-rate 0) this run collapses onto a few experts: max/mean
    # load ~3.3, min/mean 0, a quarter of the pairs dropped. With it the load evens out.
    h = nnx_history
    assert h.imbalance[0] > 2.0  # the skewed start the rule has to undo
    assert h.imbalance[-20:].mean() < 1.6, h.imbalance[-20:]
    assert h.imbalance[-20:].mean() < 0.7 * h.imbalance[0]
    assert h.min_ratio[-20:].mean() > 0.5, h.min_ratio[-20:]
    assert h.dropped[-20:].mean() < 0.01
    assert np.abs(h.bias).max() > 0
    assert h.load.sum(-1) == pytest.approx(h.load.sum(-1)[0])  # every step routes T * k pairs


def test_moe_nnx_bias_is_outside_the_gradient(moe_nnx):
    from flax import nnx

    assert not issubclass(moe_nnx.ExpertBias, nnx.Param)
    cfg = moe_nnx.PRESETS["cpu"]
    model = moe_nnx.MoE(cfg, moe_nnx.make_mesh(), rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    assert "expert_bias" not in params
    assert "expert_bias" in nnx.state(model, moe_nnx.ExpertBias)


def test_moe_nnx_flags_override_the_preset(moe_nnx):
    cfg, args = moe_nnx.parse_args(["--preset", "cpu", "--steps", "7", "--bias-rate", "0",
                                    "--plot"])
    assert cfg.steps == 7 and cfg.bias_rate == 0.0 and cfg.dim == moe_nnx.PRESETS["cpu"].dim
    assert args.plot == "auto"


@pytest.mark.parametrize("mode", ["compact", "dense", "grad"])
def test_demo_row_matches_reference(demo, mode):
    row = demo.run_row(demo.get("mixtral"), mode, 256, budget_s=0.0)
    assert row.problems == []
    assert row.fused_ms > 0 and row.ref_ms > 0


def test_demo_check_grad_catches_a_difference(demo):
    g = np.ones((4, 8), np.float32)
    ok = np.ones(4, bool)
    assert demo.check_grad(g, g, ok) == []
    assert demo.check_grad(g, g * 1.01, ok)
    assert demo.check_grad(g, g * 1.01, ~ok) == []  # rows excluded as near-tie flips


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_demo_progress_silent_without_a_tty(demo, capsys):
    stream = io.StringIO()
    p = demo.Progress(3, stream=stream)
    p.set("a")
    p.advance()
    p.print("row")
    p.close()
    assert stream.getvalue() == ""
    assert capsys.readouterr().out == "row\n"


def test_demo_progress_draws_on_a_tty(demo, monkeypatch):
    monkeypatch.setenv("TERM", "xterm")
    stream = _Tty()
    p = demo.Progress(2, stream=stream)
    p.set("first")
    p.advance()
    p.close()
    out = stream.getvalue()
    assert "\r[" in out and "1/2" in out and "first" in out
    assert out.endswith("\r")  # cleared: the shell prompt does not land on the bar


def _rows(demo):
    rows = [demo.Row(c, "", m, 4096, 1.0 + i, 3.0 + i, [])
            for i, (c, m) in enumerate((c, m) for c in ("a", "b") for m in demo.MODES)]
    sweep = [demo.Row("deepseek-v3", "", m, t, t / 1e3, t / 2e2, [])
             for t in (1024, 4096) for m in ("compact", "grad")]
    return rows, sweep


def test_demo_plot_writes_png(demo, tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "demo_test.png"
    assert demo.plot(*_rows(demo), str(path), "test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_plot_skipped_without_matplotlib(demo, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    path = tmp_path / "demo_test.png"
    assert not demo.plot(*_rows(demo), str(path), "test")
    assert not path.exists()
    assert "matplotlib" in capsys.readouterr().out
