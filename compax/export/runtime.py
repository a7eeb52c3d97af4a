"""ONNX models run by onnxruntime on the CPU: sessions, batched predictions, interleaved timing.

`predict` evaluates in batches as `member_vmap.make_predict` does (the last batch padded with
copies of the last image), so that a dynamically quantized model sees the same batches in both.
`images_per_second` times several sessions on one batch in interleaved rounds (each round runs
every session once, in the same order), the fastest round of each counting, so that the ratios
between them are measured under the same conditions.
"""

import time

import numpy as np

from compax.errors import UserError

INSTALL = "pip install onnx==1.23.2 onnxruntime==1.32.0 (pinned in requirements.txt)"


def require_onnx(what: str = "the export stage") -> None:
    """Raises a one-line UserError unless onnx and onnxruntime are installed."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise UserError(f"{what} needs onnx and onnxruntime ({e.name} is missing): {INSTALL}, or"
                        " leave export out of --config.stages") from None


def session(model_bytes: bytes, threads: int = 0):
    """An onnxruntime CPU session of the serialized model, every graph optimisation on;
    `threads` intra-op threads (0: onnxruntime's default, one per core) that sleep when idle."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    # Idle workers sleep instead of spinning: a session timed after another would find the cores
    # taken by the first one's spinning pool (experiments/bench_export.py measured it).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def predict(sess, images: np.ndarray, batch_size: int) -> np.ndarray:
    """Logits (N, classes) of the session on `images`, `batch_size` at a time."""
    name = sess.get_inputs()[0].name
    num = images.shape[0]
    pad = (-num) % batch_size
    if pad:
        images = np.concatenate([images, np.repeat(images[-1:], pad, axis=0)])
    out = [sess.run(None, {name: images[i:i + batch_size]})[0]
           for i in range(0, images.shape[0], batch_size)]
    return np.concatenate(out)[:num]


def images_per_second(sessions: dict, images: np.ndarray, rounds: int) -> dict:
    """{name: images/s} of each session on the batch `images`, the fastest of `rounds`
    interleaved rounds (after one untimed run of each)."""
    if rounds < 1:
        raise UserError(f"export.timing_rounds must be >= 1, got {rounds}")
    feeds = {k: {s.get_inputs()[0].name: images} for k, s in sessions.items()}
    for k, s in sessions.items():
        s.run(None, feeds[k])
    best = dict.fromkeys(sessions, np.inf)
    for _ in range(rounds):
        for k, s in sessions.items():
            start = time.perf_counter()
            s.run(None, feeds[k])
            best[k] = min(best[k], time.perf_counter() - start)
    return {k: images.shape[0] / t for k, t in best.items()}
