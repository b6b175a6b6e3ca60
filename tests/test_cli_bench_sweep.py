"""``cspify bench``, ``cspify sweep`` and ``--plot`` on the command line: tiny models, few runs,
no timing assertions (speed targets live in benchmarks/paper.py)."""

from __future__ import annotations

import json
from pathlib import Path


from test_cli import cli

ROOT = Path(__file__).resolve().parents[1]
RESNET = str(ROOT / "examples" / "resnet_like.py")
SMALL = ["--input-shape", "1,3,32,32", "-q"]
PNG = b"\x89PNG\r\n\x1a\n"


def test_bench_command_prints_speedup_and_flops_ratio(tmp_path):
    out = tmp_path / "bench.json"
    result = cli("bench", RESNET, *SMALL, "--batch-sizes", "1,2", "--threads", "1", "--min-run-time", "0.01",
                 "--json", out)
    assert result.exit_code == 0, result.output
    assert "speed-up" in result.output and "flops ratio" in result.output
    assert [r["batch_size"] for r in json.loads(out.read_text())["rows"]] == [1, 2]
    bad = cli("bench", RESNET, *SMALL, "--batch-sizes", "one")
    assert bad.exit_code == 2 and "batch sizes" in bad.stderr
    assert cli("bench", RESNET, *SMALL, "--rounds", "0").exit_code == 2


def test_sweep_gives_one_row_per_point_and_a_plot(tmp_path):
    out, png = tmp_path / "sweep.json", tmp_path / "sweep.png"
    result = cli("sweep", RESNET, *SMALL, "--gammas", "0.5,0.75", "--hidden", "keep,scale", "--json", out,
                 "--plot", png)
    assert result.exit_code == 0, result.output
    points = json.loads(out.read_text())["points"]
    assert [(p["gamma"], p["hidden"]) for p in points] == [(0.5, "keep"), (0.5, "scale"), (0.75, "keep"),
                                                           (0.75, "scale")]
    assert all(p["figures"]["flops"] < json.loads(out.read_text())["original"]["flops"] for p in points)
    assert png.read_bytes().startswith(PNG)
    table = result.output.split("\n\n")[1].splitlines()
    assert len(table) == 2 + 1 + 4  # header, rule, the original, one row per point


def test_sweep_round_to_applies_at_every_point(tmp_path):
    """gamma 0.375 with scaled inner widths: round_to 16 moves the widths, so the flops."""
    flops = []
    for round_to in ("1", "16"):
        out = tmp_path / f"sweep{round_to}.json"
        result = cli("sweep", RESNET, *SMALL, "--gammas", "0.375", "--hidden", "scale", "--round-to", round_to,
                     "--json", out, "-q")
        assert result.exit_code == 0, result.output
        flops.append(json.loads(out.read_text())["points"][0]["figures"]["flops"])
    assert flops[0] != flops[1]
    result = cli("sweep", RESNET, *SMALL, "--round-to", "x")
    assert result.exit_code == 2 and "round_to must be a positive whole number" in result.stderr


def test_sweep_rejects_bad_lists():
    result = cli("sweep", RESNET, *SMALL, "--fusion", "middle")
    assert result.exit_code == 2 and "--fusion" in result.stderr
    result = cli("sweep", RESNET, *SMALL, "--gammas", "0.5,1.5")
    assert result.exit_code == 2


def test_convert_plot_writes_a_png(tmp_path):
    png = tmp_path / "stages.png"
    result = cli("convert", RESNET, *SMALL, "--plot", png)
    assert result.exit_code == 0, result.output
    assert png.read_bytes().startswith(PNG) and png.stat().st_size > 10_000
