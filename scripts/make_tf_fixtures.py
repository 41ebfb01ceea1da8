"""Generate TensorFlow reference fixtures for distjac's test suite.

Run with a Python that has TensorFlow (TF is never a dependency of distjac):

    /work/tfenv/bin/python scripts/make_tf_fixtures.py [--out tests/fixtures/tf_reference.npz]

Everything is written in PyTorch layout, so tests need no TF knowledge:

* conv inputs NCHW, conv kernels (out, in, kh, kw);
* dense weights as ``torch.nn.Linear`` (out, in) plus bias (out,);
* LSTM weights as ``torch.nn.LSTM(batch_first=True)``: weight_ih_l0 (4H, F),
  weight_hh_l0 (4H, H), bias_ih_l0 = keras bias, bias_hh_l0 = 0;
* Jacobians are (B, *out_torch, *in_torch).

The layout change is done *inside* the recorded computation: the tape watches
the torch-layout tensor and the TF code transposes it to TF's layout (NHWC,
HWIO ...) and the result back to torch layout, so TF's own Jacobian is already
in torch layout and needs no transposition afterwards.

Keys are ``<case>/<array>``; see tests/fixtures/README.md. Values are
deterministic (numpy seeded, TF ops on one CPU thread); the .npz bytes are too
(fixed zip timestamps, sorted keys). Strings are stored as numpy unicode
arrays, flags as int8 scalars, so ``np.load(path)`` works with
``allow_pickle=False``.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import sys
import zipfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

tf.config.threading.set_intra_op_parallelism_threads(1)
tf.config.threading.set_inter_op_parallelism_threads(1)

UG = tf.UnconnectedGradients
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT: dict[str, np.ndarray] = {}


def put(key: str, value) -> None:
    if key in OUT:
        raise KeyError(f"duplicate fixture key {key}")
    if isinstance(value, tf.Tensor):
        value = value.numpy()
    if isinstance(value, str):
        value = np.array(value.replace(REPO_ROOT + os.sep, ""))
    value = np.asarray(value)
    if value.dtype == object:
        raise TypeError(f"{key}: object arrays are not allowed")
    OUT[key] = value


def flag(key: str, value: bool) -> None:
    put(key, np.array(int(bool(value)), dtype=np.int8))


def record(prefix: str, fn) -> None:
    """Call fn(); store its result (array / None flag) or its error."""
    try:
        res = fn()
    except Exception as err:  # noqa: BLE001 - we record whatever TF raises
        put(prefix + "_error", f"{type(err).__name__}: {err}")
        put(prefix + "_error_type", type(err).__name__)
        if err.__cause__ is not None:
            cause = err.__cause__
            put(prefix + "_error_cause", f"{type(cause).__name__}: {cause}")
        return
    flag(prefix + "_is_none", res is None)
    if res is not None:
        put(prefix, res)
        put(prefix + "_dtype", res.dtype.name)
        put(prefix + "_shape", np.array(res.shape.as_list(), dtype=np.int64))


def error_of(fn) -> tuple[str, str, str | None]:
    try:
        fn()
    except Exception as err:  # noqa: BLE001
        cause = err.__cause__
        cause_msg = None if cause is None else f"{type(cause).__name__}: {cause}"
        return type(err).__name__, str(err), cause_msg
    return "", "<no error>", None


def put_error(key: str, fn) -> None:
    """errors/<key>: str(exception); <key>_type: class name; <key>_cause."""
    etype, msg, cause = error_of(fn)
    put(f"errors/{key}", msg)
    put(f"errors/{key}_type", etype)
    if cause is not None:
        put(f"errors/{key}_cause", cause)


def save_npz(path: str, arrays: dict[str, np.ndarray]) -> None:
    """Like np.savez_compressed, but byte-for-byte reproducible."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key in sorted(arrays):
            info = zipfile.ZipInfo(key + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            buf = io.BytesIO()
            arr = np.array(arrays[key], order="C", copy=True)  # keeps 0-d as 0-d
            np.lib.format.write_array(buf, arr, allow_pickle=False)
            zf.writestr(info, buf.getvalue())
    os.replace(tmp, path)


# --------------------------------------------------------------------------
# cases
# --------------------------------------------------------------------------


def case_seed(dtype, suffix: str) -> None:
    x_np = np.array([[4.0, 2.0], [1.0, 3.0]], dtype=dtype)
    x = tf.constant(x_np)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = x * x * x
    jac = tape.batch_jacobian(y, x)
    put(f"seed_first{suffix}/x", x_np)
    put(f"seed_first{suffix}/y", y)
    put(f"seed_first{suffix}/jac", jac)
    expected = np.array([[[48, 0], [0, 12]], [[3, 0], [0, 27]]], dtype=dtype)
    np.testing.assert_array_equal(jac.numpy(), expected)

    with tf.GradientTape() as outer:
        outer.watch(x)
        with tf.GradientTape() as inner:
            inner.watch(x)
            y = x * x * x
        jac1 = inner.batch_jacobian(y, x)
    jac2 = outer.batch_jacobian(jac1, x)
    put(f"seed_second{suffix}/x", x_np)
    put(f"seed_second{suffix}/jac1", jac1)
    put(f"seed_second{suffix}/jac", jac2)
    expected2 = np.array(
        [[[[24, 0], [0, 0]], [[0, 0], [0, 12]]],
         [[[6, 0], [0, 0]], [[0, 0], [0, 18]]]], dtype=dtype)
    np.testing.assert_array_equal(jac2.numpy(), expected2)


def mlp_params(rng, dtype):
    # torch.nn.Linear layout: weight (out, in), bias (out,)
    w1 = rng.normal(0.0, 0.6, size=(7, 5)).astype(dtype)
    b1 = rng.normal(0.0, 0.3, size=(7,)).astype(dtype)
    w2 = rng.normal(0.0, 0.6, size=(3, 7)).astype(dtype)
    b2 = rng.normal(0.0, 0.3, size=(3,)).astype(dtype)
    x = rng.normal(0.0, 1.0, size=(4, 5)).astype(dtype)
    return x, w1, b1, w2, b2


def mlp_fn(w1, b1, w2, b2):
    w1, b1, w2, b2 = (tf.constant(a) for a in (w1, b1, w2, b2))

    def f(x):
        h = tf.tanh(tf.matmul(x, w1, transpose_b=True) + b1)
        return tf.matmul(h, w2, transpose_b=True) + b2

    return f


def case_mlp(rng, dtype, suffix: str) -> None:
    x_np, w1, b1, w2, b2 = mlp_params(rng, dtype)
    f = mlp_fn(w1, b1, w2, b2)
    x = tf.constant(x_np)
    with tf.GradientTape() as outer:
        outer.watch(x)
        with tf.GradientTape() as inner:
            inner.watch(x)
            y = f(x)
        jac = inner.batch_jacobian(y, x)
    jac2 = outer.batch_jacobian(jac, x)
    p = f"mlp{suffix}/"
    put(p + "x", x_np)
    put(p + "w1", w1)
    put(p + "b1", b1)
    put(p + "w2", w2)
    put(p + "b2", b2)
    put(p + "y", y)
    put(p + "jac", jac)
    put(p + "jac2", jac2)
    assert jac.shape == (4, 3, 5) and jac2.shape == (4, 3, 5, 5)

    if suffix == "":
        # pfor vs while_loop, parallel_iterations 2 vs 3 (and None)
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(x)
            y = f(x)
        for use_pfor, tag in ((True, "pfor"), (False, "while")):
            for pi in (None, 2, 3):
                jv = tape.batch_jacobian(y, x, parallel_iterations=pi,
                                         experimental_use_pfor=use_pfor)
                put(f"mlp_variants/{tag}_pi{pi if pi else 'none'}", jv)
        put("mlp_variants/x", x_np)
        del tape


def case_matrix(rng) -> None:
    x_np = rng.normal(0.0, 1.0, size=(3, 2, 4)).astype(np.float32)
    a_np = rng.normal(0.0, 0.5, size=(4, 5)).astype(np.float32)
    x = tf.constant(x_np)
    a = tf.constant(a_np)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = tf.tanh(tf.matmul(x, a))  # (3,2,4) @ (4,5) -> (3,2,5)
    jac = tape.batch_jacobian(y, x)
    put("matrix/x", x_np)
    put("matrix/a", a_np)
    put("matrix/y", y)
    put("matrix/jac", jac)
    assert jac.shape == (3, 2, 5, 2, 4)


def case_conv(rng) -> None:
    x_np = rng.normal(0.0, 1.0, size=(2, 1, 6, 6)).astype(np.float32)  # NCHW
    cw = rng.normal(0.0, 0.4, size=(3, 1, 3, 3)).astype(np.float32)    # OIHW
    cb = rng.normal(0.0, 0.2, size=(3,)).astype(np.float32)
    fw = rng.normal(0.0, 0.2, size=(4, 3 * 4 * 4)).astype(np.float32)  # Linear
    fb = rng.normal(0.0, 0.2, size=(4,)).astype(np.float32)
    x = tf.constant(x_np)
    kernel = tf.constant(np.transpose(cw, (2, 3, 1, 0)))  # OIHW -> HWIO

    def f(x_nchw):
        x_nhwc = tf.transpose(x_nchw, (0, 2, 3, 1))
        h = tf.nn.conv2d(x_nhwc, kernel, strides=1, padding="VALID") + cb
        h = tf.tanh(h)
        h = tf.transpose(h, (0, 3, 1, 2))  # back to NCHW for torch flatten order
        h = tf.reshape(h, (tf.shape(h)[0], -1))
        return tf.matmul(h, fw, transpose_b=True) + fb

    with tf.GradientTape() as tape:
        tape.watch(x)
        y = f(x)
    jac = tape.batch_jacobian(y, x)
    put("conv/x", x_np)
    put("conv/conv_weight", cw)
    put("conv/conv_bias", cb)
    put("conv/fc_weight", fw)
    put("conv/fc_bias", fb)
    put("conv/y", y)
    put("conv/jac", jac)
    assert jac.shape == (2, 4, 1, 6, 6)

    # layout self-check: numpy NCHW cross-correlation
    conv = np.zeros((2, 3, 4, 4), np.float64)
    for o in range(3):
        for i in range(4):
            for j in range(4):
                conv[:, o, i, j] = (x_np[:, :, i:i + 3, j:j + 3] * cw[o]).sum(axis=(1, 2, 3))
    ref = np.tanh(conv + cb[None, :, None, None]).reshape(2, -1) @ fw.T + fb
    np.testing.assert_allclose(y.numpy(), ref, rtol=1e-5, atol=1e-5)


def case_lstm(rng) -> None:
    import keras

    nb, nt, nf, nh = 2, 3, 4, 5  # batch, steps, features, hidden
    x_np = rng.normal(0.0, 1.0, size=(nb, nt, nf)).astype(np.float32)
    w_ih = rng.normal(0.0, 0.4, size=(4 * nh, nf)).astype(np.float32)
    w_hh = rng.normal(0.0, 0.4, size=(4 * nh, nh)).astype(np.float32)
    b_ih = rng.normal(0.0, 0.2, size=(4 * nh,)).astype(np.float32)
    b_hh = np.zeros((4 * nh,), np.float32)

    layer = keras.layers.LSTM(nh, activation="tanh", recurrent_activation="sigmoid",
                              use_bias=True, return_sequences=True)
    layer.build((None, nt, nf))
    # keras: kernel (F, 4H), recurrent_kernel (H, 4H), bias (4H,); gates i,f,c,o
    layer.set_weights([w_ih.T.copy(), w_hh.T.copy(), b_ih + b_hh])

    x = tf.constant(x_np)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x)
    jac = tape.batch_jacobian(y, x)
    put("lstm/x", x_np)
    put("lstm/weight_ih_l0", w_ih)
    put("lstm/weight_hh_l0", w_hh)
    put("lstm/bias_ih_l0", b_ih)
    put("lstm/bias_hh_l0", b_hh)
    put("lstm/y", y)
    put("lstm/jac", jac)
    assert jac.shape == (nb, nt, nh, nt, nf)

    # layout self-check: torch.nn.LSTM equations, gate order i, f, g, o
    def sig(v):
        return 1.0 / (1.0 + np.exp(-v))

    h = np.zeros((nb, nh))
    c = np.zeros((nb, nh))
    outs = []
    for t in range(nt):
        g = x_np[:, t] @ w_ih.T + b_ih + h @ w_hh.T + b_hh
        i_, f_, g_, o_ = np.split(g, 4, axis=1)
        c = sig(f_) * c + sig(i_) * np.tanh(g_)
        h = sig(o_) * np.tanh(c)
        outs.append(h)
    np.testing.assert_allclose(y.numpy(), np.stack(outs, 1), rtol=1e-5, atol=1e-5)


def case_unconnected() -> None:
    x_np = np.arange(6, dtype=np.float32).reshape(2, 3) + 1.0
    z_np = np.arange(8, dtype=np.float32).reshape(2, 4) - 3.0
    x = tf.constant(x_np)
    z = tf.constant(z_np)
    put("unconnected/x", x_np)
    put("unconnected/z", z_np)

    def run(method, ug, use_pfor=True):
        def fn():
            with tf.GradientTape(persistent=True) as tape:
                tape.watch(x)
                tape.watch(z)
                y = z * 2.0
            if method == "gradient":
                return tape.gradient(y, x, unconnected_gradients=ug)
            kwargs = dict(unconnected_gradients=ug, experimental_use_pfor=use_pfor)
            return getattr(tape, method)(y, x, **kwargs)
        return fn

    for ug, tag in ((UG.NONE, "none"), (UG.ZERO, "zero")):
        record(f"unconnected/batch_jacobian_{tag}", run("batch_jacobian", ug))
        record(f"unconnected/batch_jacobian_while_{tag}",
               run("batch_jacobian", ug, use_pfor=False))
        record(f"unconnected/jacobian_{tag}", run("jacobian", ug))
        record(f"unconnected/jacobian_while_{tag}", run("jacobian", ug, use_pfor=False))
        record(f"unconnected/gradient_{tag}", run("gradient", ug))

    # string spellings accepted by TF
    record("unconnected/batch_jacobian_str_zero", run("batch_jacobian", "zero"))
    record("unconnected/jacobian_str_zero", run("jacobian", "zero"))


def case_zeros_dtype() -> None:
    """Dtype/shape of the zeros TF returns for an unconnected target."""
    variants = {
        # target dtype == source dtype == float64 (TF's test_zeros_type_correct)
        "f64": (tf.float64, tf.float64),
        # mixed: source float64, target float32 (TF uses target.dtype)
        "src64_tgt32": (tf.float64, tf.float32),
        "src32_tgt64": (tf.float32, tf.float64),
    }
    for name, (sdt, tdt) in variants.items():
        for use_pfor, ptag in ((True, "pfor"), (False, "while")):
            for ug, utag in ((UG.NONE, "none"), (UG.ZERO, "zero")):
                def fn(sdt=sdt, tdt=tdt, use_pfor=use_pfor, ug=ug):
                    x = tf.constant([[2.0, 3.0]], dtype=sdt)
                    z = tf.constant([[1.0, 4.0, 5.0]], dtype=tdt)
                    with tf.GradientTape(persistent=True) as tape:
                        tape.watch(x)
                        tape.watch(z)
                        y = z * 2
                    return tape.batch_jacobian(y, x, unconnected_gradients=ug,
                                               experimental_use_pfor=use_pfor)
                record(f"zeros_dtype/{name}_{ptag}_{utag}", fn)


def case_degenerate() -> None:
    def make(src_shape, target_kind, use_pfor, use_function=False):
        def f(x):
            with tf.GradientTape(persistent=True) as tape:
                tape.watch(x)
                if target_kind == "square":
                    y = x ** 2
                elif target_kind == "to_12":  # (1, 0) -> (1, 2)
                    y = tf.reduce_sum(x, axis=1, keepdims=True) + tf.constant([[1.0, 2.0]])
                elif target_kind == "to_10":  # (1, 2) -> (1, 0)
                    y = x[:, :0] * 3.0
                else:
                    raise AssertionError(target_kind)
            return tape.batch_jacobian(y, x, experimental_use_pfor=use_pfor)

        if use_function:
            f = tf.function(f)
        return lambda: f(tf.zeros(src_shape))

    specs = {
        "square_10": ((1, 0), "square"),   # TF test_degenerate_shape -> (1, 0, 0)
        "src10_tgt12": ((1, 0), "to_12"),
        "src12_tgt10": ((1, 2), "to_10"),
        "square_00": ((0, 3), "square"),   # empty batch
    }
    for name, (shape, kind) in specs.items():
        for use_pfor, ptag in ((True, "pfor"), (False, "while")):
            record(f"degenerate/{name}_{ptag}", make(shape, kind, use_pfor))
        record(f"degenerate/{name}_pfor_function", make(shape, kind, True, True))


def case_full_jacobian(rng) -> None:
    x_np = rng.normal(0.0, 1.0, size=(2, 3)).astype(np.float32)
    b_np = rng.normal(0.0, 1.0, size=(3, 2)).astype(np.float32)
    g_np = rng.normal(0.0, 1.0, size=(2, 2)).astype(np.float32)
    x = tf.constant(x_np)
    b = tf.constant(b_np)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        tape.watch(b)
        y = tf.matmul(tf.sin(x), b)
        s = tf.reduce_sum(y)
    put("full_jacobian/x", x_np)
    put("full_jacobian/b", b_np)
    put("full_jacobian/y", y)
    put("full_jacobian/jac", tape.jacobian(y, x))
    put("full_jacobian/jac_while", tape.jacobian(y, x, experimental_use_pfor=False))
    put("full_jacobian/jac_pi2", tape.jacobian(y, x, parallel_iterations=2))
    put("full_jacobian/grad_sum", tape.gradient(s, x))
    put("full_jacobian/grad_y", tape.gradient(y, x))  # implicit ones output grads
    put("full_jacobian/output_gradients", g_np)
    put("full_jacobian/grad_with_output_gradients",
        tape.gradient(y, x, output_gradients=tf.constant(g_np)))
    # list of sources: jacobian returns a list (here [dy/dx, dy/db])
    jx, jb = tape.jacobian(y, [x, b])
    put("full_jacobian/list_jac_x", jx)
    put("full_jacobian/list_jac_b", jb)
    del tape


def case_tf_tests() -> None:
    """Values from TF's own tests (backprop_test.py), computed by TF 2.x eager."""
    # BatchJacobianTest._batch_jacobian
    x = tf.constant([[1.0, 2.0], [3.0, 4.0]])
    yv = tf.constant([[3.0, 4.0], [5.0, 6.0]])
    with tf.GradientTape(persistent=True) as g:
        g.watch(x)
        z = x * x * yv
    put("tf_tests/bj_x", x)
    put("tf_tests/bj_y", yv)
    put("tf_tests/bj_pfor", g.batch_jacobian(z, x))
    put("tf_tests/bj_while", g.batch_jacobian(z, x, experimental_use_pfor=False))
    # BatchJacobianTest.test_parallel_iterations
    w = tf.constant([[1.0, 2, 3, 4], [5, 6, 7, 8]])
    with tf.GradientTape(persistent=True) as g:
        g.watch(x)
        y = tf.matmul(x, w)
    put("tf_tests/bj_pi_w", w)
    put("tf_tests/bj_pi2", g.batch_jacobian(y, x, parallel_iterations=2))
    put("tf_tests/bj_pi3", g.batch_jacobian(y, x, parallel_iterations=3))
    # JacobianTest._jacobian: two sources
    x1 = tf.constant([1.0, 2.0])
    y1 = tf.constant([3.0, 4.0])
    with tf.GradientTape(persistent=True) as g:
        g.watch(x1)
        g.watch(y1)
        z = x1 * x1 * y1
    jx, jy = g.jacobian(z, [x1, y1])
    put("tf_tests/j_x", x1)
    put("tf_tests/j_y", y1)
    put("tf_tests/j_dx", jx)
    put("tf_tests/j_dy", jy)
    # JacobianTest.test_parallel_iterations: y = x @ x
    with tf.GradientTape(persistent=True) as g:
        g.watch(x)
        y = tf.matmul(x, x)
    put("tf_tests/j_pi2", g.jacobian(y, x, parallel_iterations=2))
    put("tf_tests/j_pi3", g.jacobian(y, x, parallel_iterations=3))

    # JacobianTest.test_nested_jacobian (TF skips it eagerly; try anyway)
    def nested():
        xo = tf.ones((10, 2))
        with tf.GradientTape() as g:
            g.watch(xo)
            with tf.GradientTape() as gg:
                gg.watch(xo)
                s = tf.reduce_sum(tf.square(xo))
            dy_x = gg.jacobian(s, xo)
        return g.batch_jacobian(dy_x, xo)

    record("tf_tests/nested_jacobian", nested)

    # parallel_for/gradients_test.py test_batch_jacobian_fixed_shape, on a
    # stored input: x (2,3,5), y = x*x -> (2,3,5,3,5) = diag(2x) per example
    rng = np.random.RandomState(7)
    xf = tf.constant(rng.uniform(size=(2, 3, 5)).astype(np.float32))
    with tf.GradientTape(persistent=True) as g:
        g.watch(xf)
        y = xf * xf
    put("tf_tests/fixed_shape_x", xf)
    put("tf_tests/fixed_shape_jac", g.batch_jacobian(y, xf))
    # jacobian with x (2,2), y = x^T x (test_jacobian_fixed_shape)
    xj = tf.constant(rng.uniform(size=(2, 2)).astype(np.float32))
    with tf.GradientTape(persistent=True) as g:
        g.watch(xj)
        y = tf.matmul(xj, xj, transpose_a=True)
    put("tf_tests/jac_fixed_x", xj)
    put("tf_tests/jac_fixed_jac", g.jacobian(y, xj))


def case_errors() -> None:
    def rank_source():
        x = tf.random.uniform([2])
        with tf.GradientTape() as g:
            g.watch(x)
            y = tf.random.uniform([2, 2])
        g.batch_jacobian(y, x)

    def rank_target():
        x = tf.random.uniform([2, 2])
        with tf.GradientTape() as g:
            g.watch(x)
            y = tf.random.uniform([2])
        g.batch_jacobian(y, x)

    def batch_mismatch():  # TF testBadShape
        x = tf.random.uniform([2, 3])
        with tf.GradientTape() as g:
            g.watch(x)
            y = tf.concat([x, x], axis=0)
        g.batch_jacobian(y, x)

    def twice(first, second):
        def fn():
            x = tf.constant([[1.0, 2.0]])
            with tf.GradientTape() as g:
                g.watch(x)
                y = x * x
            getattr(g, first)(y, x)
            getattr(g, second)(y, x)
        return fn

    def nonpersistent_while(method):
        def fn():
            x = tf.constant([[1.0, 2.0]])
            with tf.GradientTape() as g:
                g.watch(x)
                y = x * x
            getattr(g, method)(y, x, experimental_use_pfor=False)
        return fn

    def nonpersistent_parallel_iterations(pi):
        def fn():
            # 4 target rows, chunks of `pi`: a non-persistent tape is reused
            x = tf.constant([[1.0, 2.0, 3.0, 4.0]])
            with tf.GradientTape() as g:
                g.watch(x)
                y = x * x
            return g.batch_jacobian(y, x, parallel_iterations=pi)
        return fn

    def int_source():
        x = tf.constant([[1, 2]], dtype=tf.int32)
        with tf.GradientTape(persistent=True) as g:
            g.watch(x)
            y = x * x
        return g.batch_jacobian(y, x)

    def bad_unconnected_value():
        x = tf.constant([[1.0, 2.0]])
        with tf.GradientTape() as g:
            g.watch(x)
            y = x * x
        return g.gradient(y, x, unconnected_gradients="bogus")

    def inside_context():
        x = tf.constant([[1.0, 2.0]])
        with tf.GradientTape() as g:
            g.watch(x)
            y = x * x
            g.batch_jacobian(y, x)
            g.batch_jacobian(y, x)

    put_error("rank_source", rank_source)
    put_error("rank_target", rank_target)
    put_error("batch_mismatch", batch_mismatch)
    put_error("nonpersistent_twice_gradient", twice("gradient", "gradient"))
    put_error("nonpersistent_twice_jacobian", twice("gradient", "jacobian"))
    put_error("nonpersistent_twice_batch_jacobian", twice("gradient", "batch_jacobian"))
    put_error("nonpersistent_batch_jacobian_then_gradient",
              twice("batch_jacobian", "gradient"))
    put_error("nonpersistent_while_batch_jacobian", nonpersistent_while("batch_jacobian"))
    put_error("nonpersistent_while_jacobian", nonpersistent_while("jacobian"))
    put_error("nonpersistent_parallel_iterations",
              nonpersistent_parallel_iterations(2))
    put_error("parallel_iterations_1", nonpersistent_parallel_iterations(1))
    put_error("int_source", int_source)
    put_error("bad_unconnected_value", bad_unconnected_value)
    put_error("inside_context_twice", inside_context)
    # the int case may not raise: record its value too
    record("errors/int_source_result", int_source)


def case_tape_sources() -> None:
    """tape/*: what a tape differentiates besides watched tensors: a tensor it computed
    (an intermediate), a target that is its own source, output_gradients with None in
    it, a tensor computed before the block. Fixed values, no random draws."""
    a0 = np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float32)
    w1 = np.array([[0.5, -1.0, 0.25], [1.5, 0.75, -0.5]], dtype=np.float32)  # (2, 3)
    w2 = np.array([[0.2], [-0.4], [0.6]], dtype=np.float32)  # (3, 1)
    put("tape/a", a0)
    put("tape/w1", w1)
    put("tape/w2", w2)

    def recorded():
        a = tf.constant(a0)
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(a)
            h = a * 3.0
            y = tf.sin(h)
        return tape, a, h, y

    def intermediate(method):
        def fn():
            tape, _, h, y = recorded()
            return getattr(tape, method)(y, h)
        return fn

    for method in ("gradient", "jacobian", "batch_jacobian"):
        record(f"tape/intermediate_{method}", intermediate(method))

    def features():  # Grad-CAM's shape: the gradient w.r.t. a layer's activations
        v1, v2 = tf.Variable(w1), tf.Variable(w2)
        with tf.GradientTape() as tape:
            feat = tf.tanh(tf.constant(a0) @ v1)
            out = feat @ v2
        return tape.gradient(out, feat)

    record("tape/features_gradient", features)

    def itself(method):
        def fn():
            tape, a, _, _ = recorded()
            return getattr(tape, method)(a, a)
        return fn

    for method in ("gradient", "jacobian", "batch_jacobian"):
        record(f"tape/self_{method}", itself(method))

    def none_weight():
        a = tf.constant(a0)
        with tf.GradientTape() as tape:
            tape.watch(a)
            y1, y2 = a * a, a * 3.0
        return tape.gradient([y1, y2], a, output_gradients=[None, tf.eye(2)])

    record("tape/output_gradients_none", none_weight)

    def before_block():
        a = tf.constant(a0)
        with tf.GradientTape(persistent=True) as outer:
            outer.watch(a)
            pre = a * 2.0
        with tf.GradientTape() as tape:
            tape.watch(a)
            z = pre * 5.0
        return tape.gradient(z, pre)

    record("tape/before_block_gradient", before_block)

    def unwatched_variable():  # watch_accessed_variables=False: h = v * 3 is not recorded
        v = tf.Variable(a0)
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            h = v * 3.0
            y = tf.reduce_sum(h * h)
        return tape.gradient(y, h)

    record("tape/unwatched_variable_intermediate_gradient", unwatched_variable)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures",
        "tf_reference.npz"))
    args = ap.parse_args(argv)

    import keras

    put("meta/tf_version", tf.__version__)
    put("meta/keras_version", keras.__version__)
    put("meta/numpy_version", np.__version__)
    put("meta/python_version", platform.python_version())
    put("meta/generator", "scripts/make_tf_fixtures.py")

    rng = np.random.RandomState(20240601)
    case_seed(np.float32, "")
    case_seed(np.float64, "_f64")
    case_mlp(rng, np.float32, "")
    case_mlp(rng, np.float64, "_f64")
    case_matrix(rng)
    case_conv(rng)
    case_lstm(rng)
    case_full_jacobian(rng)
    case_unconnected()
    case_zeros_dtype()
    case_degenerate()
    case_tf_tests()
    case_errors()
    case_tape_sources()

    out = os.path.normpath(args.out)
    save_npz(out, OUT)
    size = os.path.getsize(out)
    print(f"wrote {out}: {len(OUT)} arrays, {size} bytes", file=sys.stderr)
    for key in sorted(OUT):
        a = OUT[key]
        desc = repr(a.item()) if a.dtype.kind == "U" else f"{a.dtype} {a.shape}"
        print(f"{key}: {desc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
