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


# --- examples/moe_ep.py: expert parallelism over the ep axis -----------------------------------


@pytest.fixture(scope="module")
def moe_ep():
    return _load("moe_ep")


def test_moe_ep_script_matches_one_device_on_8_cpu_devices():
    # The script as a user runs it: its own process, forced onto the host's 8 XLA devices.
    import subprocess

    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = subprocess.run([sys.executable, os.path.join(EXAMPLES, "moe_ep.py"), "--devices", "8"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "exchange: padded" in proc.stdout  # auto on CPU
    assert "OK: expert-parallel losses and gradients equal the one-device layer's (10 steps, " \
           "8 devices, padded exchange" in proc.stdout, proc.stdout


def _emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
                                recv_sizes, *, axis_name, axis_index_groups=None):
    """jax.lax.ragged_all_to_all's documented semantics from all_gather and a scatter, for
    XLA:CPU, which cannot compile the real one; differentiable like any gather / scatter."""
    assert axis_index_groups is None
    n, me = jax.lax.axis_size(axis_name), jax.lax.axis_index(axis_name)
    per = input_offsets.shape[0] // n  # slices each device sends to each device
    ops, starts, sizes, dests = (jax.lax.all_gather(a, axis_name)
                                 for a in (operand, input_offsets, send_sizes, output_offsets))
    mine = me * per + jnp.arange(per)  # the slices of every sender addressed to this device
    r = jnp.arange(operand.shape[0])
    src = jnp.minimum(starts[:, mine, None] + r, operand.shape[0] - 1)  # [n, per, rows]
    dst = jnp.where(r < sizes[:, mine, None], dests[:, mine, None] + r, output.shape[0])
    # The receiver's recv_sizes must be what the senders say they send.
    got = sizes[:, mine].reshape(-1)
    output = output + jnp.where(jnp.all(got == recv_sizes), 0.0, jnp.nan).astype(output.dtype)
    vals = ops[jnp.arange(n)[:, None, None], src]
    return output.at[dst.reshape(-1)].set(vals.reshape(-1, operand.shape[-1]), mode="drop")


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_moe_ep_ragged_exchange_matches_one_device(moe_ep, monkeypatch, capacity_factor):
    # The ragged path's offsets and sizes, checked on CPU through an emulated collective
    # (on a GPU the real one runs); with capacity factor 1 pairs drop and must drop alike.
    n = 8 if jax.device_count() >= 8 else 2
    if jax.device_count() < n:
        pytest.skip("needs 2 devices")
    if jax.devices()[0].platform == "cpu":
        monkeypatch.setattr(jax.lax, "ragged_all_to_all", _emulated_ragged_all_to_all)
    cfg = dataclasses.replace(moe_ep.PRESETS["cpu"], steps=3, capacity_factor=capacity_factor)
    result = moe_ep.run(cfg, jax.devices()[:n], "ragged", log=lambda *a: None)
    assert result.exchange == "ragged"
    assert result.ok, result.problems
    assert (sum(result.dropped) > 0) == (capacity_factor is not None)


def test_moe_ep_ragged_step_lowers_with_the_real_collective(moe_ep):
    # XLA:CPU cannot compile ragged-all-to-all, but tracing and lowering (shapes, the
    # shard_map varying-axis rules, the transpose in the gradient) need no backend support.
    if jax.device_count() < 2:
        pytest.skip("needs 2 devices")
    from jax.sharding import NamedSharding, PartitionSpec as P

    cfg = dataclasses.replace(moe_ep.PRESETS["cpu"], capacity_factor=1.0)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), (moe_ep.AXIS,))
    step = moe_ep.sgd_step(moe_ep.expert_parallel_layer(cfg, mesh, "ragged"), cfg.lr)
    params = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=NamedSharding(
                  mesh, P() if k == "gate" else P(moe_ep.AXIS)))
              for k, v in moe_ep.init_params(cfg, np.random.default_rng(0)).items()}
    x = jax.ShapeDtypeStruct((2 * cfg.tokens, cfg.dim), jnp.float32,
                             sharding=NamedSharding(mesh, P(moe_ep.AXIS)))
    text = step.lower(params, x, x).as_text()
    # out and back, and back's transpose (the first exchange carries no parameter's gradient)
    assert text.count("ragged_all_to_all") == 3


def test_moe_ep_emulated_ragged_all_to_all_follows_the_docstring_example(moe_ep):
    # jax.lax.ragged_all_to_all's own example (2 devices): the emulation the test above
    # relies on must give its documented result.
    if jax.device_count() < 2:
        pytest.skip("needs 2 devices")
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("x",))
    args = [np.array(a, np.int32) for a in (
        [[1, 2, 2], [3, 4, 0]], [[0, 0, 0, 0]] * 2, [[0, 1]] * 2, [[1, 2], [1, 1]],
        [[0, 0], [1, 2]], [[1, 1], [2, 1]])]
    f = jax.shard_map(lambda *a: _emulated_ragged_all_to_all(
        *(v[0] for v in a), axis_name="x")[None], mesh=mesh,
        in_specs=(jax.sharding.PartitionSpec("x"),) * 6, out_specs=jax.sharding.PartitionSpec("x"))
    args[:2] = [a[..., None].astype(np.float32) for a in args[:2]]  # rows of width 1
    out = np.asarray(f(*args))[..., 0]
    assert out.tolist() == [[1, 3, 0, 0], [2, 2, 4, 0]]


def test_moe_ep_check_catches_a_difference(moe_ep):
    assert moe_ep.mismatches(1.0, 1.0, 1e-9, 1.0, 3, 3) == []
    assert moe_ep.mismatches(1.0 + 1e-3, 1.0, 1e-9, 1.0, 3, 3)
    assert moe_ep.mismatches(1.0, 1.0, 1e-2, 1.0, 3, 3)
    assert moe_ep.mismatches(1.0, 1.0, 1e-9, 1.0, 3, 4)
    assert moe_ep.mismatches(float("nan"), float("nan"), 0.0, 1.0, 0, 0)


def test_moe_ep_capacity(moe_ep):
    cfg = moe_ep.PRESETS["cpu"]
    assert cfg.capacity() == cfg.tokens  # dropless default
    c = dataclasses.replace(cfg, tokens=32, topk=2, experts=16, capacity_factor=1.0)
    assert c.capacity() == 4  # ceil(1.0 * 32 * 2 / 16)
    assert dataclasses.replace(c, capacity_factor=100.0).capacity() == 32  # at most tokens


@pytest.mark.parametrize("argv, message", [
    (["--experts", "3", "--devices", "2"], "multiple of --devices"),
    (["--topk", "20"], "--topk (20) must be <= --experts"),
    (["--capacity-factor", "0"], "--capacity-factor must be > 0"),
    (["--experts", "1000", "--devices", "1000"], "--devices must be in"),
    (["--exchange", "bogus"], "invalid choice"),
])
def test_moe_ep_rejects_bad_arguments(moe_ep, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        moe_ep.parse_args(["--preset", "cpu", *argv])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_moe_ep_auto_exchange(moe_ep):
    assert moe_ep.resolve_exchange("auto", "cpu") == "padded"
    assert moe_ep.resolve_exchange("auto", "gpu") == "ragged"
    assert moe_ep.resolve_exchange("padded", "gpu") == "padded"
    with pytest.raises(ValueError, match="exchange must be one of"):
        moe_ep.resolve_exchange("nccl", "gpu")
