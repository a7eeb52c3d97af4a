"""ONNX models run by onnxruntime on the CPU: sessions, batched predictions, interleaved timing.

`predict` evaluates in the batches of `member_vmap.make_predict` (`padded_batches`: the last one
padded with copies of the last image), so that a dynamically quantized model sees the same
batches in both.
`images_per_second` times several sessions on one batch in interleaved rounds (each round runs
every session once, in the same order), the fastest round of each counting, so that the ratios
between them are measured under the same conditions.
"""

import numpy as np

from compax.compress.cost import interleaved_seconds
from compax.errors import UserError
from compax.member_vmap import padded_batches

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
    out = [sess.run(None, {name: batch})[0] for batch in padded_batches(images, batch_size)]
    return np.concatenate(out)[:images.shape[0]]


def images_per_second(sessions: dict, images: np.ndarray, rounds: int) -> dict:
    """{name: images/s} of each session on the batch `images`, the fastest of `rounds`
    interleaved rounds (`cost.interleaved_seconds`, after one untimed run of each)."""
    if rounds < 1:
        raise UserError(f"export.timing_rounds must be >= 1, got {rounds}")
    calls = {k: (lambda s=s: s.run(None, {s.get_inputs()[0].name: images}))
             for k, s in sessions.items()}
    return {k: images.shape[0] / min(t) for k, t in interleaved_seconds(calls, rounds).items()}
