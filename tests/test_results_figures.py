"""experiments/results_figures.py: the figures' numbers from results.json, and the PNGs."""

import functools
import importlib.util
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from compax.paper import TABLE1, TABLE1_VARIANTS

ROOT = pathlib.Path(__file__).resolve().parents[1]
GMP = "gmp(final={},begin=1,end=8,every=0.5,unit=epochs,scope=global,initial=0.0,epochs=12,"\
      "patience=None,start=init,exclude=None,seed_offset={})"
L1 = "l1_global(amount={},exclude=None)"


@functools.cache
def _module():
    """The script as a module, loaded once (its absl flags can be defined only once)."""
    spec = importlib.util.spec_from_file_location("results_figures",
                                                  ROOT / "experiments" / "results_figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cie(count, pies):
    return {"count": count, "pies": pies, "correction": "holm", "alpha": 0.05,
            "design": "independent", "significant_classes": list(range(count))}


def _variant(recipe, accuracy, amount=None, cie=None):
    """A variant as pipeline.py's results.json schema has it (the fields read here and a few more)."""
    accuracy = np.asarray(accuracy, float)
    return {"recipe": recipe, "accuracy": float(accuracy.mean()), "accuracy_std": float(accuracy.std()),
            "member_accuracy": accuracy.tolist(), "weight_bits": 32, "activation_bits": 32,
            "sparsity": None if amount is None else {"amount": amount, "fraction_of_weights": amount,
                                                      "fraction_of_params": 0.98 * amount},
            **({"hooker": {"cie": cie}} if cie else {})}


def _workdir(path: pathlib.Path, model, dataset, members, seed, hooker=False) -> dict:
    """A finished run's results.json and config.json: the Table 1 variants and, with `hooker`,
    gradual gmp levels (gmp0 the floor) and one-shot levels with their Welch counts and CIEs."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(0.85, 0.95, members)
    variants = {"baseline": _variant(None, base),
                "pruned": _variant(L1.format("searched"), base - rng.uniform(0, 0.02, members), 0.46,
                                   _cie(2, 200)),
                "w8a8": _variant("quantize(weight_bits=8,activation_bits=8)",
                                 base - rng.uniform(0, 0.01, members), cie=_cie(1, 150)),
                "w4a8": _variant("quantize(weight_bits=4,activation_bits=8)",
                                 base - rng.uniform(0, 0.04, members), cie=_cie(3, 300)),
                "pruned_w8a8": _variant(L1.format("searched") + "+quantize(weight_bits=8)",
                                        base - rng.uniform(0, 0.03, members), 0.46, _cie(4, 250))}
    if hooker:
        for i, level in enumerate((0.0, 0.3, 0.5, 0.9)):
            variants[f"gmp{round(100 * level)}"] = _variant(
                GMP.format(level, 1000 * (i + 1)), rng.uniform(0.85, 0.95, members), level,
                _cie(i, 300 + 10 * i))
        for level in (0.3, 0.5, 0.7, 0.9):
            variants[f"sparsity_{round(100 * level)}"] = _variant(
                L1.format(level), base - level / 10, level, _cie(round(10 * level), round(1000 * level)))
    results = {"dataset": {"name": dataset, "classes": 43}, "model": {"name": model, "width": 1.0},
               "epochs_trained": 9, "members": [{"seed": i} for i in range(members)],
               "variants": variants}
    path.mkdir()
    (path / "results.json").write_text(json.dumps(results))
    (path / "config.json").write_text(json.dumps({"model_width": 1.0, "max_epochs": 60, "patience": 10,
                                                  "population": members}))
    return results


@pytest.fixture
def runs(tmp_path):
    return {name: (tmp_path / name, _workdir(tmp_path / name, *args))
            for name, args in {"a": ("lenet5", "gtsrb", 6, 0, True), "b": ("lenet5", "cifar10", 2, 1),
                               "c": ("lenet5", "gtsrb", 4, 2)}.items()}


def test_table1_data_are_the_members_figures_with_numpy_spread_and_the_papers(runs):
    figures = _module()
    pairs = figures.table1_data([str(runs[n][0]) for n in "abc"])
    assert [(p["model"], p["dataset"]) for p in pairs] == [("lenet5", "gtsrb"), ("lenet5", "cifar10")]
    assert [len(p["runs"]) for p in pairs] == [2, 1]  # a and c are one pair, side by side
    assert pairs[0]["paper"] == TABLE1[("lenet5", "gtsrb")]
    for pair in pairs:
        for run in pair["runs"]:
            variants = runs[pathlib.Path(run["workdir"]).name][1]["variants"]
            base = 100 * np.asarray(variants["baseline"]["member_accuracy"])
            assert run["members"] == len(base)
            assert run["pruned_percent"] == pytest.approx(100 * 0.98 * 0.46)
            assert "patience 10" in run["setting"] and "pruned at 0.46" in run["setting"]
            paper = TABLE1.get((pair["model"], pair["dataset"]))
            for name in ("accuracy", *TABLE1_VARIANTS):
                q = run["quantities"][name]
                expected = (base if name == "accuracy"
                            else 100 * np.asarray(variants[name]["member_accuracy"]) - base)
                np.testing.assert_allclose(q["values"], expected)
                assert q["paper"] == (paper["accuracy"] if name == "accuracy" else paper["diff_pp"][name])
                d = q["distribution"]
                if len(base) < 3:
                    assert d is None
                    continue
                low, high = np.percentile(expected, [2.5, 97.5])
                assert d["mean"] == pytest.approx(expected.mean())
                assert d["std"] == pytest.approx(expected.std(ddof=1))
                assert (d["low"], d["high"]) == (pytest.approx(low), pytest.approx(high))
                assert d["percentile"] == pytest.approx(
                    100 * (np.mean(expected < q["paper"]) + np.mean(expected == q["paper"]) / 2))


def test_hooker_data_put_one_shot_and_gradual_on_their_curves_with_the_floor(runs):
    figures = _module()
    data = figures.hooker_data(runs["a"][1])
    assert data["families"] == {"gradual (gmp)": [(0.0, 0, 300), (0.3, 1, 310), (0.5, 2, 320),
                                                  (0.9, 3, 330)],
                                "one-shot (global L1)": [(0.3, 3, 300), (0.5, 5, 500), (0.7, 7, 700),
                                                         (0.9, 9, 900)]}
    assert data["floor"] == (0, 300) and data["searched"] == (0.46, 2, 200)
    assert (data["correction"], data["alpha"], data["members"]) == ("holm", 0.05, 6)
    without = figures.hooker_data(runs["c"][1])  # no levels, no gmp0: nothing but the searched point
    assert without["families"] == {} and without["floor"] is None


def test_the_script_writes_both_small_pngs_and_prints_the_plotted_numbers(runs, tmp_path):
    out = tmp_path / "docs"
    done = subprocess.run([sys.executable, "experiments/results_figures.py",
                           f"--table1={runs['a'][0]},{runs['b'][0]},{runs['c'][0]}",
                           f"--hooker={runs['a'][0]}", f"--out={out}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 0, done.stderr[-3000:]
    printed = json.loads(done.stdout.strip().splitlines()[-1])
    for name in ("table1_seed_ranges.png", "hooker_levels.png"):
        png = (out / name).read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) < 150_000, (name, len(png))
    assert printed["hooker"]["families"]["one-shot (global L1)"][-1] == [0.9, 9, 900]
    assert printed["hooker"]["floor"] == [0, 300]
    accuracy = printed["table1"]["pairs"][0]["runs"][0]["quantities"]["accuracy"]["values"]
    np.testing.assert_allclose(accuracy, 100 * np.asarray(
        runs["a"][1]["variants"]["baseline"]["member_accuracy"]))
    assert "| w8a8 Δ pp |" in done.stdout  # Table 1 over the members, as experiments/table1.py


def test_the_figures_read_a_real_runs_results_and_config(study_run, tmp_path):
    """The schema the pipeline writes (the session's small study: 2 members, pruned, w8a8,
    pruned_w8a8, Hooker's analysis), not only the fake above."""
    figures = _module()
    workdir, results = study_run
    [pair] = figures.table1_data([str(workdir)])
    [run] = pair["runs"]
    variants = results["variants"]
    base = 100 * np.asarray(variants["baseline"]["member_accuracy"])
    assert (pair["model"], pair["dataset"], pair["paper"], run["members"]) == ("lenet5", "tiny", None, 2)
    assert set(run["quantities"]) == {"accuracy", "pruned", "w8a8", "pruned_w8a8"}
    for name in ("pruned", "w8a8", "pruned_w8a8"):
        np.testing.assert_allclose(run["quantities"][name]["values"],
                                   100 * np.asarray(variants[name]["member_accuracy"]) - base)
        assert run["quantities"][name]["distribution"] is None  # 2 members: no 95% range
    config = json.loads((workdir / "config.json").read_text())
    assert f"≤{config['max_epochs']} epochs, patience {config['patience']}" in run["setting"]
    data = figures.hooker_data(results)
    cie = variants["pruned"]["hooker"]["cie"]
    assert data["searched"] == (variants["pruned"]["sparsity"]["amount"], cie["count"], cie["pies"])
    assert (data["correction"], data["members"], data["families"]) == ("holm", 2, {})
    figures.plot_table1([pair], tmp_path / "table1.png")
    assert 0 < (tmp_path / "table1.png").stat().st_size < 150_000
