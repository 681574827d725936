"""benchmarks/synthetic.py on tiny settings: its options reach the pipeline and its JSON keeps its contract."""

from __future__ import annotations

import json

from benchmark_loader import load_benchmark

TINY = ["--num-images", "24", "--image-size", "64", "--epochs", "1", "--width", "16", "--feature-dim", "32",
        "--k", "3", "--scales", "1", "--threads", "1", "--quiet"]


bench = load_benchmark("synthetic")


def test_options_become_settings():
    args = bench.parse_args(["--num-classes", "4", "--tau", "0.2", "--k", "8", "--mu-b", "0.5",
                             "--pool-cam-scales", "1", "0.5", "--scales", "1", "2"])
    settings = bench.demo_settings(0, **bench.overrides_from_args(args))
    assert settings.data.num_classes == 4
    assert (settings.lpcam.fg_threshold, settings.lpcam.num_clusters, settings.lpcam.context_high) == (0.2, 8, 0.5)
    assert settings.pool_cam_scales == (1.0, 0.5) and settings.scales == (1.0, 2.0)
    # Without --pool-cam-scales the pools follow the inference scales.
    default = bench.demo_settings(0, **bench.overrides_from_args(bench.parse_args(["--scales", "1", "2"])))
    assert default.pool_cam_scales == (1.0, 2.0)


def test_json_holds_the_three_rows_the_settings_and_every_seed(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert bench.main(["--seed", "0", "1", "--json", str(out), "--data-root", str(tmp_path / "data"), *TINY]) == 0
    payload = json.loads(out.read_text())
    for key in ("cam", "lpcam_no_context", "lpcam"):
        for score in ("miou", "precision", "recall", "threshold"):
            assert isinstance(payload[key][score], float), (key, score)
    assert payload["settings"]["seeds"] == [0, 1] and payload["settings"]["lpcam"]["num_clusters"] == 3
    assert [run["settings"]["seed"] for run in payload["runs"]] == [0, 1]
    for run in payload["runs"]:
        gain = run["gain_interval"]["miou"]
        assert abs(gain["difference"] - (run["lpcam"]["miou"] - run["cam"]["miou"])) < 1e-9
    # The rows are the means of the seeds' rows.
    mean = sum(run["lpcam"]["miou"] for run in payload["runs"]) / 2
    assert abs(payload["lpcam"]["miou"] - mean) < 1e-9
    printed = capsys.readouterr().out
    assert "| 1 | LPCAM |" in printed and "seed 1: LPCAM - CAM" in printed


def test_amp_rows_come_from_the_same_network_and_bank(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert bench.main(["--seed", "0", "--json", str(out), "--data-root", str(tmp_path / "data"), "--amp", *TINY]) == 0
    run = json.loads(out.read_text())["runs"][0]
    assert "artifacts" not in run
    for key in ("cam", "lpcam_no_context", "lpcam"):
        amp = run["amp"][key]
        assert 0 < amp["max_abs_diff"] < 0.2, (key, amp)  # bfloat16 features: changed, not another network
        assert abs(amp["miou"] - run[key]["miou"]) < 10
    printed = capsys.readouterr().out
    assert "With --amp" in printed and "| 0 | LPCAM |" in printed
