"""The export stage: every compressed variant as ONNX files that onnxruntime runs, measured there.

For the trained population ("baseline") and each saved variant, one ONNX file per member
(`export.members="first"`: member 0 only), `export/<variant>/member_<i>.onnx`, written by
`compax.export.graph.export_onnx` with the dataset's normalisation inside the graph: the files take
the raw uint8 NHWC images, as a deployed model would, and compute (x / 255 - mean) / std first,
exactly as compax does; static int8 layers take their bias in int32 (the integer kernels' form)
unless `export.integer_bias=False` (compax's float bias, float kernels; `graph.export_onnx`).
Each file is checked by `onnx.checker`, run by onnxruntime on the CPU on
the whole test set, and compared with compax's own evaluation of that member of that variant
(`apply_compressed`, the same batches):

    onnx_bytes                 bytes of member 0's file (weights, graph and metadata)
    onnx_compression_ratio     the baseline file's bytes over this one's
    ort_images_per_second      member 0 in onnxruntime on `export.timing_images` test images in one
                               batch, the fastest of `export.timing_rounds` rounds interleaved with
                               the baseline's (`runtime.images_per_second`)
    ort_speedup                images/s over the baseline's in the same rounds
    ort_agreement              per member: the fraction of test images whose argmax equals compax's
    ort_max_logit_difference   per member: the largest |logit difference| over the test set

It is a stage (train, compress, analyse, export, report) rather than a separate command so that a
finished workdir gets it with `--config.stages=export,report`, its record and checksums kept like
every other stage's, and the report shows its table; it reads only the saved variants. The files'
SHA-256 are in `export/compax_manifest.json`.
"""

import pathlib
import shutil

import jax
import ml_collections
import numpy as np
from absl import logging

from compax.compress.compressed import apply_compressed, size_bytes
from compax.data import Dataset
from compax.distributed import is_main_process
from compax.export import runtime
from compax.member_vmap import make_predict, take_members
from compax.safe_files import MANIFEST, tree_checksums, write_bytes_atomic, write_json_atomic


def export_population(config: ml_collections.ConfigDict, model, original, populations: dict,
                      dataset: Dataset, chunk: int, directory: pathlib.Path) -> dict:
    """{variant: export results} (module doc) of the `original` population (as "baseline") and
    of `populations` ({variant: (module, compressed population)}), files under `directory`."""
    from compax.export.graph import export_onnx

    runtime.require_onnx()
    export = config.export
    tmp = directory.with_name(directory.name + ".tmp")
    if is_main_process():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    test = dataset.test
    shape = test.images.shape[1:]
    timing = test.images[:export.timing_images]
    entries = {"baseline": (model, original), **populations}
    sessions, results = {}, {}
    for name, (module, population) in entries.items():
        members = jax.tree.leaves(population)[0].shape[0]
        count = 1 if export.members == "first" else members
        predict = make_predict(lambda c, x, m=module: apply_compressed(m, c, x), dataset.mean,
                               dataset.std, config.eval_batch_size, chunk)
        reference = predict(take_members(population, slice(0, count)), test.images)
        agreement, difference, files = [], [], []
        for i in range(count):
            member = take_members(population, i)
            proto = export_onnx(module, member, shape, mean=dataset.mean, std=dataset.std,
                                integer_bias=export.integer_bias)
            data = proto.SerializeToString()
            path = tmp / name / f"member_{i}.onnx"
            if is_main_process():
                path.parent.mkdir(exist_ok=True)
                write_bytes_atomic(path, data)
            files.append(f"{directory.name}/{name}/{path.name}")
            sess = runtime.session(data, export.threads)
            logits = runtime.predict(sess, test.images, config.eval_batch_size)
            agreement.append(float(np.mean(logits.argmax(1) == reference[i].argmax(1))))
            difference.append(float(np.max(np.abs(logits - reference[i]))))
            if i == 0:
                sessions[name] = sess
                results[name] = {"onnx_bytes": len(data),
                                 "computed_bytes": int(size_bytes(member))}
        results[name].update(files=files, ort_agreement=agreement,
                             ort_max_logit_difference=difference)
        logging.info("export %s: %d file(s), %d bytes each, onnxruntime agrees with compax on"
                     " %.4f of test images (worst member), largest logit difference %.2e", name,
                     count, results[name]["onnx_bytes"], min(agreement), max(difference))
    speeds = runtime.images_per_second(sessions, timing, export.timing_rounds)
    for name, result in results.items():
        result["onnx_compression_ratio"] = results["baseline"]["onnx_bytes"] / result["onnx_bytes"]
        result["ort_images_per_second"] = speeds[name]
        result["ort_speedup"] = speeds[name] / speeds["baseline"]
        logging.info("export %s: onnxruntime %.0f images/s (%.2fx the baseline), file %.2fx"
                     " smaller than the baseline's", name, speeds[name], result["ort_speedup"],
                     result["onnx_compression_ratio"])
    if is_main_process():
        write_json_atomic(tmp / MANIFEST, {"sha256": tree_checksums(tmp, skip=(MANIFEST,))})
        shutil.rmtree(directory, ignore_errors=True)
        tmp.replace(directory)
    return results

