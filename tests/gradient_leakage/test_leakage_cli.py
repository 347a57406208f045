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
from node.attack.cli import victim_pool
from node.attack.deployed import REPO
from tests.datafiles import PNEUMONIAMNIST

SHARED = PNEUMONIAMNIST.parent


def test_the_default_attack_is_the_deployed_one(tmp_path: Path) -> None:
    out = tmp_path / "run"
    rc = main(
        [
            "--images", "8", "--iterations", "4", "--out", str(out),
            "--data", str(PNEUMONIAMNIST), "--quiet",
        ]
    )  # fmt: skip
    assert rc == 0
    report = json.loads((out / "results.json").read_text())
    deployment = report["config"]["deployment"]
    # configs/director.toml: batch norm + CVB, the round-1 plan, the federation's KL weight.
    assert deployment["model"]["defense"] == "cvb" and deployment["model"]["norm"] == "batch"
    assert deployment["round"] == 1 and deployment["plan"]["kl_beta"] == 0.01
    assert deployment["plan"]["lr"] == 0.05 and deployment["recipe"]["max_grad_norm"] == 5.0
    assert report["config"]["threat"] == "update"
    summary = report["summary"]
    assert summary["images"] == 8 and summary["candidates"] == 624
    # One envoy of 8 images: each victim gets the best of the envoy's 8 reconstructions.
    assert summary["tries_per_victim"] == 8
    assert summary["top1_mse_chance"] == pytest.approx(1 - (623 / 624) ** 8)
    assert summary["top5_ncc_chance"] == pytest.approx(1 - (619 / 624) ** 8)
    assert summary["registration_poses"] == 270  # the recipe augments: register candidates
    assert summary["smooth_relu"] == 30.0
    assert summary["median_rank_chance"] == pytest.approx(624 * (1 - 0.5 ** (1 / 8)))
    for image in report["images"]:
        assert 0 <= image["index"] < 624
        assert 1 <= image["rank_mse"] <= 624 and 1 <= image["rank_ncc"] <= 624
        assert image["identified"] == (image["rank_mse"] == 1)
        assert 10 < image["baseline_psnr"] < 30
    assert Image.open(out / "grid.png").format == "PNG"
    gif = Image.open(out / "reconstruction.gif")
    assert gif.format == "GIF" and gif.n_frames == 4  # one frame per progress report


def test_reported_and_tuning_victims_are_disjoint() -> None:
    report, tune = victim_pool(624, "report"), victim_pool(624, "tune")
    assert len(report) == len(tune) == 312
    assert not set(report) & set(tune) and set(report) | set(tune) == set(range(624))


def test_the_kl_weight_comes_from_the_director_config(tmp_path: Path) -> None:
    text = (REPO / "configs" / "director.toml").read_text()
    assert "kl_beta = 0.01" in text
    config = tmp_path / "director.toml"
    config.write_text(text.replace("kl_beta = 0.01", "kl_beta = 0.05"))
    out = tmp_path / "run"
    common = ["--images", "1", "--envoy-images", "1", "--iterations", "2", "--quiet"]
    common += ["--data", str(PNEUMONIAMNIST)]
    assert main([*common, "--config", str(config), "--out", str(out)]) == 0
    plan = json.loads((out / "results.json").read_text())["config"]["deployment"]["plan"]
    assert plan["kl_beta"] == 0.05


def test_attack_command_on_an_image_folder_with_an_aggregate(tmp_path: Path) -> None:
    # A Kermany-layout folder (as a hospital holds it), written here so the test owns it.
    rng = np.random.default_rng(0)
    for cls in ("NORMAL", "PNEUMONIA"):
        (tmp_path / "xr" / cls).mkdir(parents=True)
        for i in range(4):
            pixels = rng.integers(0, 256, (40, 40), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "xr" / cls / f"{i}.png")
    out = tmp_path / "run"
    rc = main(
        [
            "--defense", "none", "--attack", "adaptive", "--images", "4", "--threat", "aggregate",
            "--envoys", "2", "--envoy-images", "2", "--iterations", "3",
            "--source", "kermany", "--data", str(tmp_path / "xr"), "--out", str(out), "--quiet",
        ]
    )  # fmt: skip
    assert rc == 0
    summary = json.loads((out / "results.json").read_text())["summary"]
    assert summary["candidates"] == 8 and summary["images"] == 4
    assert summary["tries_per_victim"] == 4  # every reconstruction of the aggregate


def test_attack_command_refuses_bad_arguments(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--images", "3", "--envoy-images", "2", "--out", str(tmp_path)]) == 2
    assert "multiple" in capsys.readouterr().err
    # Missing data is an unusable data file: exit status 3 (ExitCode.CONFIG).
    assert main(["--data", str(tmp_path / "missing.npz"), "--out", str(tmp_path)]) == 3
    assert not (tmp_path / "results.json").exists()
    assert main(["--attack", "dlg", "--parameters", "conv1.weight", "--out", str(tmp_path)]) == 2
    assert "--parameters" in capsys.readouterr().err
    assert main(["--attack", "dlg", "--eot-samples", "4", "--out", str(tmp_path)]) == 2
    assert "--samples" in capsys.readouterr().err
    assert main(["--attack", "dlg", "--smooth-relu", "10", "--out", str(tmp_path)]) == 2
    assert "--smooth-relu" in capsys.readouterr().err
    assert main(["--smooth-relu", "-1", "--out", str(tmp_path)]) == 2
    assert "--smooth-relu" in capsys.readouterr().err
    # An unusable director config: exit status 3 (ExitCode.CONFIG).
    assert main(["--config", str(tmp_path / "nope.toml"), "--out", str(tmp_path)]) == 3
    assert main(["--images", "400", "--data", str(PNEUMONIAMNIST), "--out", str(tmp_path)]) == 2
    assert "half the split" in capsys.readouterr().err
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
    common = ["--defense", "none", "--images", "1", "--envoy-images", "1", "--iterations", "2"]
    common += ["--quiet"]
    common += ["--data", str(PNEUMONIAMNIST), "--trained", str(weights), "--round", "7"]
    assert main([*common, "--norm", "group", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "batch-norm" in err and "--norm" in err
    assert not (tmp_path / "a" / "results.json").exists()
    assert main([*common, "--out", str(tmp_path / "b")]) == 0
    deployment = json.loads((tmp_path / "b" / "results.json").read_text())["config"]["deployment"]
    assert deployment["model"]["norm"] == "batch" and deployment["round"] == 7
    assert deployment["plan"]["lr"] < 0.05  # round 7 of the cosine schedule
    assert str(weights) in deployment["weights"]


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
    from node.attack.cli import _best_trial

    assert _best_trial(losses) == best


def test_the_contrast_prior_changes_the_reported_contrast_not_the_attack(tmp_path: Path) -> None:
    # The stress test's group-norm model cannot see contrast; the prior picks it.
    common = [
        "--defense", "none", "--norm", "group", "--threat", "gradient", "--attack", "ig",
        "--images", "2", "--iterations", "5", "--data", str(PNEUMONIAMNIST), "--quiet",
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
    assert reports["neighbours"]["summary"]["registration_poses"] == 0  # nothing augmented


def test_the_attack_on_dp_training_needs_a_dp_compatible_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = ["--images", "2", "--envoy-images", "2", "--iterations", "2", "--quiet"]
    common += ["--data", str(PNEUMONIAMNIST), "--dp-noise", "1.0"]
    assert main([*common, "--out", str(tmp_path / "a")]) == 2  # the deployed batch norm
    assert "group" in capsys.readouterr().err
    assert main([*common, "--norm", "group", "--out", str(tmp_path / "b")]) == 0
    recipe = json.loads((tmp_path / "b" / "results.json").read_text())["config"]["deployment"]
    assert recipe["recipe"]["privacy"]["noise_multiplier"] == 1.0


def test_cpu_seconds_are_the_attacks_own(tmp_path: Path) -> None:
    # benchmarks/leakage/run.py runs many attacks in one process: each reports only its own
    # CPU time, not what the process spent before it.
    from node.attack.cli import cpu_seconds

    spin = cpu_seconds()
    while cpu_seconds() - spin < 1.0:
        pass
    start = cpu_seconds()
    out = tmp_path / "run"
    args = ["--images", "8", "--iterations", "2", "--data", str(PNEUMONIAMNIST), "--quiet"]
    assert main([*args, "--out", str(out)]) == 0
    spent = cpu_seconds() - start
    reported = json.loads((out / "results.json").read_text())["summary"]["cpu_seconds"]
    assert 0 < reported <= spent + 1e-6
