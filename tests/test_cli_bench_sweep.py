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
    assert "1 thread(s), load " in result.output.splitlines()[0]
    assert result.output.splitlines()[-1] == f"saved the timings as JSON to {out}"
    data = json.loads(out.read_text())
    assert [r["batch_size"] for r in data["rows"]] == [1, 2]
    assert data["threads"] == 1 and set(data["load"]) == {"before", "after", "cores"}
    assert all("unreliable" in r for r in data["rows"]) and isinstance(data["notes"], list)
    assert "timing both models" not in result.stderr  # -q: no progress
    bad = cli("bench", RESNET, *SMALL, "--batch-sizes", "one")
    assert bad.exit_code == 2 and "batch sizes" in bad.stderr
    assert cli("bench", RESNET, *SMALL, "--rounds", "0").exit_code == 2


def test_bench_command_states_a_busy_machine_and_shows_progress(tmp_path, monkeypatch):
    """One thread by default, the load beside the figures, a note when it makes them
    unreliable, and a progress line on stderr (the load is injected: no timing asserted)."""
    monkeypatch.setattr("cspify.bench.machine_load", lambda: 9.0)
    monkeypatch.setattr("cspify.bench.cpu_cores", lambda: 2)
    out = tmp_path / "bench.json"
    result = cli("bench", RESNET, "--input-shape", "1,3,32,32", "--min-run-time", "0.01", "--rounds", "1",
                 "--device", "cpu", "--json", out)
    assert result.exit_code == 0, result.output
    assert "1 thread(s), load 9.00 before, 9.00 after timing on 2 cores" in result.output
    (note,) = [line for line in result.output.splitlines() if line.startswith("note: unreliable figures")]
    assert "other work (load 9.00 less the 1 timed thread(s)) leaves under 1 of its 2 cores free" in note
    assert "--threads 1" in note
    assert "timing both models on cpu at batch sizes 1, 1 thread(s)" in result.stderr
    assert "2/2" in result.stderr and "block" in result.stderr  # tqdm: blocks timed, with an ETA
    data = json.loads(out.read_text())
    assert data["load"] == {"before": 9.0, "after": 9.0, "cores": 2} and data["rows"][0]["unreliable"]


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
