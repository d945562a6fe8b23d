"""KLDO's separation metric (evaluation/separation.py) by hand, and `alignserve eval
--separation-only` end to end on a tiny random Llama."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from evaluation.separation import bhattacharyya_distance, pca_2d, separation, silhouette

DIAMOND = np.array([[-1.0, 0.0], [1.0, 0.0], [0.0, -1.0], [0.0, 1.0]])


def test_bhattacharyya_distance_by_hand():
    # both clusters: mean shift (2, 0), sample covariance diag(2/3, 2/3) (ddof 1), so
    # BD = ⅛·Δμᵀ Σ⁻¹ Δμ + ½·log(det Σ / √(det Σ_a det Σ_b)) = ⅛·4·(3/2) + 0 = 0.75
    assert bhattacharyya_distance(DIAMOND, DIAMOND + [2.0, 0.0]) == pytest.approx(0.75)
    assert bhattacharyya_distance(DIAMOND, DIAMOND) == pytest.approx(0.0, abs=1e-9)
    # a wider second cluster adds the covariance term: Σ_b = 4·Σ_a, Σ = 2.5·Σ_a in 2-D,
    # ½·log(2.5² / √(4²)) = ½·log(6.25/4)
    assert bhattacharyya_distance(DIAMOND, 2 * DIAMOND) == pytest.approx(0.5 * math.log(6.25 / 4))


def test_silhouette_by_hand():
    x = np.array([[0.0], [1.0], [10.0], [11.0]])
    # point 0: a = 1, b = (10 + 11)/2; point 1: a = 1, b = (9 + 10)/2; 2 and 3 mirror them
    want = (9.5 / 10.5 + 8.5 / 9.5) / 2
    assert silhouette(x, np.array([0, 0, 1, 1])) == pytest.approx(want)


def test_pca_keeps_a_plane_and_separation_grows_with_the_gap():
    rng = np.random.default_rng(0)
    plane = rng.normal(size=(20, 2)) @ np.array([[3.0, 0.0], [0.0, 1.0]])
    embedded = plane @ rng.normal(size=(2, 6))  # a 2-D cloud inside 6-D
    proj = pca_2d(embedded)
    gram = lambda z: (z - z.mean(0)) @ (z - z.mean(0)).T  # noqa: E731
    assert np.allclose(gram(proj), gram(embedded), atol=1e-8)  # distances preserved
    safe = rng.normal(size=(15, 8))
    near, far = separation(safe, rng.normal(size=(15, 8)) + 0.5), separation(
        safe, rng.normal(size=(15, 8)) + 5.0)
    assert far["bhattacharyya_distance"] > near["bhattacharyya_distance"] > 0
    assert far["silhouette"] > near["silhouette"]
    assert far["bhattacharyya_coefficient"] == pytest.approx(
        math.exp(-far["bhattacharyya_distance"]))
    assert len(far["points"]["safe"]) == 15 and len(far["points"]["safe"][0]) == 2
    with pytest.raises(ValueError, match="at least 3"):
        separation(safe[:2], safe)


def test_eval_separation_only_writes_numbers_and_a_png(tmp_path, capsys):
    pytest.importorskip("transformers")
    from test_finetune_methods import _tiny_model

    from cli.main import main

    model = _tiny_model(tmp_path / "tiny")
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"id": f"h{i}", "prompt": f"how do i {w}", "kind": "helpful"}
            for i, w in enumerate(["cook", "sleep", "run", "study"])]
    rows += [{"id": f"a{i}", "prompt": f"how do i steal {w}", "kind": "adversarial"}
             for i, w in enumerate(["cars", "bikes", "money", "food"])]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "eval"
    rc = main(["eval", "--prompts", str(prompts), "--out", str(out), "--separation-only",
               "--separation", f"{model},{model}"])
    err = capsys.readouterr().err
    assert rc == 2 and "each policy once" in err  # the same policy twice is refused
    rc = main(["eval", "--prompts", str(prompts), "--out", str(out), "--separation-only",
               "--separation", str(model)])
    assert rc == 0
    doc = json.loads((out / "separation.json").read_text())
    (result,) = doc["separation"]
    assert (result["safe_prompts"], result["harmful_prompts"]) == (4, 4)
    assert math.isfinite(result["bhattacharyya_distance"]) and result["bhattacharyya_distance"] >= 0
    assert (out / "separation.png").stat().st_size > 0
    assert "Bhattacharyya distance" in (out / "separation.md").read_text()
    rc = main(["eval", "--prompts", str(prompts), "--out", str(out), "--separation-only"])
    assert rc == 2 and "--separation-only needs --separation" in capsys.readouterr().err


class _ConstantRunner:
    """Every answer the same: the evaluation's own numbers do not matter here."""

    model_name = "constant"

    async def answer(self, item, setting, seed=None):
        from evaluation.runners import Answer

        return Answer("ok", 0.5, 0.1, 0.0, None, 4, 0.01)

    async def aclose(self) -> None:
        pass


async def test_eval_with_separation_adds_a_section_and_a_png(tmp_path):
    import argparse

    pytest.importorskip("transformers")
    from test_finetune_methods import _tiny_model

    from evaluation.cli import add_arguments, evaluate

    model = _tiny_model(tmp_path / "tiny")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"{k}{i}", "prompt": f"how do i {k} {i}",
                                           "kind": k}) + "\n"
                               for k in ("helpful", "adversarial") for i in range(3)))
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    ns = parser.parse_args(["--prompts", str(prompts), "--out", str(tmp_path / "out"),
                            "--strategies", "none", "--separation", str(model)])
    await evaluate(ns, runner=_ConstantRunner())
    out = tmp_path / "out"
    doc = json.loads((out / "results.json").read_text())
    (result,) = doc["separation"]
    assert result["policy"] == str(model) and result["harmful_prompts"] == 3
    assert "## Separation of safe and harmful prompts" in (out / "report.md").read_text()
    assert (out / "separation.png").stat().st_size > 0
