"""`fedbus attack` end to end on real data with few iterations, and the figure files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gradient_leakage.figures import save_animation, save_grid
from node.attack import main
from tests.datafiles import PNEUMONIAMNIST

SHARED = PNEUMONIAMNIST.parent


def test_attack_command_on_pneumoniamnist(tmp_path: Path) -> None:
    out = tmp_path / "run"
    rc = main(
        [
            "--defense", "cvb", "--attack", "ig", "--images", "1", "--iterations", "4",
            "--norm", "group", "--out", str(out), "--data", str(PNEUMONIAMNIST), "--quiet",
        ]
    )  # fmt: skip
    assert rc == 0
    report = json.loads((out / "results.json").read_text())
    summary = report["summary"]
    for key in ("psnr", "ssim", "identified", "baseline_psnr", "label_accuracy", "chance"):
        assert isinstance(summary[key], float), key
    assert summary["chance"] == pytest.approx(1 / 624)
    assert summary["images"] == 1 and len(report["images"]) == 1
    assert report["config"]["norm"] == "group"
    assert summary["smooth_relu"] == 30.0  # IG's default stand-in for ReLU
    image = report["images"][0]
    assert 0 <= image["index"] < 624 and 0 <= image["nearest"] < 624
    assert image["identified"] == (image["index"] == image["nearest"])
    # The mean training X-ray's PSNR against one victim: the dataset-mean baseline.
    assert 10 < image["baseline_psnr"] < 30
    assert Image.open(out / "grid.png").format == "PNG"
    gif = Image.open(out / "reconstruction.gif")
    assert gif.format == "GIF" and gif.n_frames == 4  # one frame per progress report


def test_attack_command_on_an_image_folder_with_fedavg(tmp_path: Path) -> None:
    # A Kermany-layout folder (as a hospital holds it), written here so the test owns it.
    rng = np.random.default_rng(0)
    for cls in ("NORMAL", "PNEUMONIA"):
        (tmp_path / "xr" / cls).mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 256, (40, 40), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "xr" / cls / f"{i}.png")
    out = tmp_path / "run"
    rc = main(
        [
            "--defense", "none", "--attack", "adaptive", "--images", "2", "--batch", "2",
            "--threat", "fedavg", "--local-steps", "2", "--iterations", "3",
            "--source", "kermany", "--data", str(tmp_path / "xr"), "--out", str(out), "--quiet",
        ]
    )  # fmt: skip
    assert rc == 0
    summary = json.loads((out / "results.json").read_text())["summary"]
    assert summary["chance"] == pytest.approx(1 / 6)
    assert summary["images"] == 2


def test_attack_command_refuses_bad_arguments(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        main(["--images", "3", "--batch", "2", "--out", str(tmp_path), "--data", str(SHARED)]) == 2
    )
    assert "multiple" in capsys.readouterr().err
    # Missing data is an unusable data file: exit status 3 (ExitCode.CONFIG).
    assert main(["--data", str(tmp_path / "missing.npz"), "--out", str(tmp_path)]) == 3
    assert not (tmp_path / "results.json").exists()
    assert main(["--attack", "dlg", "--parameters", "conv1.weight", "--out", str(tmp_path)]) == 2
    assert "--parameters" in capsys.readouterr().err
    assert main(["--attack", "dlg", "--smooth-relu", "10", "--out", str(tmp_path)]) == 2
    assert "--smooth-relu" in capsys.readouterr().err
    assert main(["--smooth-relu", "-1", "--out", str(tmp_path)]) == 2
    assert "--smooth-relu" in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()
    with pytest.raises(SystemExit):
        main(["--attack", "nope"])


def test_trained_weights_must_match_the_norm(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from node.training.model import build_model
    from node.training.weights import get_weights

    weights = tmp_path / "bn.npz"
    np.savez(weights, **get_weights(build_model("cnn", "none", 28, seed=3, norm="batch")))
    common = ["--defense", "none", "--images", "1", "--iterations", "2", "--quiet"]
    common += ["--data", str(PNEUMONIAMNIST), "--trained", str(weights)]
    assert main([*common, "--out", str(tmp_path / "a")]) == 2  # default norm is group
    err = capsys.readouterr().err
    assert "batch-norm" in err and "--norm" in err
    assert not (tmp_path / "a" / "results.json").exists()
    assert main([*common, "--norm", "batch", "--out", str(tmp_path / "b")]) == 0
    assert json.loads((tmp_path / "b" / "results.json").read_text())["config"]["norm"] == "batch"


def test_grid_and_animation_files(tmp_path: Path) -> None:
    originals = torch.rand(3, 1, 8, 8)
    frames = [torch.rand(3, 1, 8, 8) for _ in range(5)]
    grid = save_grid(
        tmp_path / "g.png", originals, frames[-1], psnr=[10.0, 20.0, 30.0], ssim=[0.1, 0.5, 0.9]
    )
    assert Image.open(grid).size[0] > 100
    gif = Image.open(save_animation(tmp_path / "a.gif", frames, originals, scale=2))
    assert gif.n_frames == 5
    # Originals on top, the frame below: 2 rows of 8 px, a 2 px gap, scaled by 2.
    assert gif.size == (2 * (3 * 8 + 2 * 2), 2 * (2 * 8 + 2))
    with pytest.raises(ValueError):
        save_grid(tmp_path / "bad.png", originals, frames[0], psnr=[1.0], ssim=[1.0])
    assert not (tmp_path / "bad.png").exists()


@pytest.mark.parametrize(
    ("losses", "best"),
    [
        ([], 0),
        ([float("nan")], 0),
        ([float("nan"), float("inf")], 0),
        ([3.0, float("nan"), 1.0], 2),
    ],
)
def test_best_trial_survives_diverged_restarts(losses: list[float], best: int) -> None:
    from node.attack import _best_trial

    assert _best_trial(losses) == best


def test_the_contrast_prior_changes_the_reported_contrast_not_the_attack(tmp_path: Path) -> None:
    common = [
        "--defense", "none", "--attack", "ig", "--images", "2", "--iterations", "5",
        "--data", str(PNEUMONIAMNIST), "--quiet",
    ]  # fmt: skip
    reports: dict[str, dict] = {}
    for prior in ("population", "neighbours"):
        out = tmp_path / prior
        assert main([*common, "--contrast-prior", prior, "--out", str(out)]) == 0
        reports[prior] = json.loads((out / "results.json").read_text())
        assert reports[prior]["config"]["contrast_prior"] == prior
    # Same attack, same objective: only the reported contrast differs, and so the scores.
    a, b = (reports[k]["images"] for k in ("population", "neighbours"))
    assert [i["index"] for i in a] == [i["index"] for i in b]
    assert any(abs(x["psnr"] - y["psnr"]) > 1e-6 for x, y in zip(a, b, strict=True))
