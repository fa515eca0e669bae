"""The benchmarks' report logic (benchmarks/common.py and the scripts' report writers): the claims in the README are
read off these tables, so the seed pairing and the "better only beyond the spread" rule are tested on hand-made rows,
and each committed report must come back unchanged from its committed JSON (no model is loaded)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
RESULTS = BENCHMARKS / "results"
sys.path.insert(0, str(BENCHMARKS))
import alpha_sweep  # noqa: E402
import common  # noqa: E402
import compare  # noqa: E402
import sparsity_curve  # noqa: E402

TEXT = "Northanger Abbey"
TEST_TEXT = "Sense and Sensibility"


def row(n: int, seed: int, pattern: str, alpha, ppl: float, test: float | None = None) -> tuple[str, dict]:
    norm = "-" if alpha == 0 else "l1"
    r = {"num_samples": n, "seed": seed, "pattern": pattern, "norm": norm, "alpha": alpha, "prune_s": 1.0,
         "validation": {TEXT: ppl, "Debian handbook": ppl}, "median_layer_alpha": None}
    if test is not None:
        r["test"] = {TEST_TEXT: test}
    return alpha_sweep.row_key(n, seed, pattern, norm, alpha), r


def report(rows: list[tuple[str, dict]], tmp_path: Path) -> str:
    args = argparse.Namespace(seqlen=512, eval_tokens=4096, eval_seqlen=512)
    out = tmp_path / "report.md"
    alpha_sweep.write_report(dict(rows), args, out, None)
    return out.read_text()


def line_for(text: str, alpha: str) -> str:
    (line,) = [line for line in text.splitlines() if line.startswith(f"| l1 | {alpha} |")]
    return line


def test_better_only_beyond_the_larger_seed_spread(tmp_path):
    wanda = [row(32, s, "2:4", 0, p) for s, p in enumerate([100.0, 102.0, 104.0])]  # mean 102, std 2
    clear = [row(32, s, "2:4", "auto", p) for s, p in enumerate([96.0, 97.0, 98.0])]  # mean 97: 5 below
    assert "(-4.9% **better**)" in line_for(report(wanda + clear, tmp_path), "auto")
    close = [row(32, s, "2:4", "auto", p) for s, p in enumerate([99.0, 100.0, 101.0])]  # mean 100: 2 below = std
    line = line_for(report(wanda + close, tmp_path), "auto")
    assert "(-2.0%)" in line and "better" not in line


def test_a_single_seed_is_compared_with_wanda_on_that_seed_and_never_called_better(tmp_path):
    wanda = [row(32, s, "2:4", 0, p) for s, p in enumerate([100.0, 150.0, 200.0])]  # mean 150
    # alpha 100 ran on seed 2 only: against Wanda's 200 on seed 2 (-40%), not the 3-seed mean (-20%)
    text = report(wanda + [row(32, 2, "2:4", 100.0, 120.0), row(32, 0, "2:4", 10.0, 50.0)], tmp_path)
    assert "(-40.0%)" in line_for(text, "100") and "better" not in line_for(text, "100")
    assert "(-50.0%)" in line_for(text, "10")


def test_calibration_sizes_are_compared_on_the_seeds_every_size_has(tmp_path):
    rows = [row(16, 0, "unstructured", 0, 60.0, 50.0), row(16, 0, "unstructured", "auto", 57.0, 49.0)]
    rows += [row(32, s, "unstructured", 0, 50.0 + s, 40.0) for s in range(3)]
    rows += [row(32, s, "unstructured", "auto", 49.0 + 10 * s, 40.0) for s in range(3)]
    text = report(rows, tmp_path)
    section = text.split("## Calibration size")[1]
    assert "| unstructured | 16 | 0 | 60.00 -> 57.00 (-5.0%)" in section
    # 32 sequences: seed 0 only (what 16 has), so seeds 1 and 2's much worse GBLM rows do not enter.
    assert "| unstructured | 32 | 0 | 50.00 -> 49.00 (-2.0%)" in section
    assert "50.00 -> 49.00 (-2.0%) | 50.00 -> 49.00 (-2.0%) | 40.00 -> 40.00 (+0.0%)" in section


def test_a_fresh_sweep_with_only_wanda_rows_writes_a_report(tmp_path):
    text = report([row(16, 0, "unstructured", 0, 60.0), row(16, 0, "2:4", 0, 160.0)], tmp_path)
    assert "## unstructured, 16 calibration sequences" in text and "## Calibration size" not in text



def test_resumed_results_must_have_been_measured_with_the_same_settings(tmp_path):
    path = tmp_path / "rows.json"
    assert common.load_resumable(path, {"seqlen": 512}, empty={"rows": []}) == {"rows": []}
    common.atomic_write_text(path, '{"settings": {"seqlen": 512}, "rows": [1]}')
    assert common.load_resumable(path, {"seqlen": 512}, empty={"rows": []})["rows"] == [1]
    with pytest.raises(SystemExit, match="seqlen.*512.*seqlen.*128.*move it away"):
        common.load_resumable(path, {"seqlen": 128}, empty={"rows": []})


def test_a_failed_write_keeps_the_previous_file_whole(tmp_path):
    path = tmp_path / "deep" / "table.md"
    common.atomic_write_text(path, "old table\n")

    class FailingFigure:
        def savefig(self, target, **kwargs):
            Path(target).write_text("half a pn")
            raise OSError("disk full")

    png = tmp_path / "plot.png"
    png.write_bytes(b"old plot")
    with pytest.raises(OSError, match="disk full"):
        common.atomic_savefig(FailingFigure(), png)
    assert png.read_bytes() == b"old plot"
    with pytest.raises(TypeError):
        common.atomic_write_text(path, None)  # fails while writing the temporary file
    assert path.read_text() == "old table\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["table.md"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deep", "plot.png"]


def test_a_worker_row_is_the_json_on_its_last_line_and_a_failure_names_the_row(tmp_path, monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "0")  # the worker must get "1" whatever the caller's environment says
    script = tmp_path / "worker.py"
    script.write_text(
        "import json, os, sys\n"
        "if sys.argv[1] == 'fail':\n"
        "    sys.exit('no such layer')\n"
        "print('a log line')\n"
        "print(json.dumps({'args': sys.argv[1:], 'tqdm': os.environ['TQDM_DISABLE']}))\n"
    )
    assert common.run_worker(script, "ok", 3) == {"args": ["ok", "3"], "tqdm": "1"}
    with pytest.raises(SystemExit, match=r"\('wanda', 7\) failed:\nno such layer"):
        common.run_worker(script, "fail", what=("wanda", 7))


def test_the_seed_spread_rule():
    # Wanda mean 102, std 2 (seeds 0..2); a claim needs the means to differ by more than the larger std.
    wanda = {0: 100.0, 1: 102.0, 2: 104.0}
    better = common.compare_over_seeds({0: 96.0, 1: 97.0, 2: 98.0}, wanda)
    assert (better.n, round(better.change, 2), better.verdict) == (3, -4.9, "better")
    assert common.compare_over_seeds({0: 99.0, 1: 100.0, 2: 101.0}, wanda).verdict == ""  # 2 below = the std: no claim
    assert common.compare_over_seeds({0: 106.0, 1: 107.0, 2: 108.0}, wanda).verdict == "worse"
    # A wide spread of its own also blocks the claim: std 5 > difference 4.
    assert common.compare_over_seeds({0: 93.0, 1: 98.0, 2: 103.0}, wanda).verdict == ""
    # Only the seeds both have: one shared seed gives a change, never a verdict; none gives nothing.
    single = common.compare_over_seeds({2: 52.0, 7: 1.0}, wanda)  # against seed 2 alone: 104
    assert (single.n, single.change, single.verdict) == (1, -50.0, "")
    assert common.compare_over_seeds({5: 1.0}, wanda) is None


def compare_row(method: str, pattern: str, seed, ppl: float) -> dict:
    return {"method": method, "pattern": pattern, "seed": seed, "ppl": {TEXT: ppl}, "prune_s": 1.0,
            "gradient_s": "-", "gradient_rss": "-"}


def test_compare_claims_better_and_worse_only_on_shared_seeds():
    rows = [compare_row("dense", "-", "-", 40.0)]
    rows += [compare_row("wanda", "2:4", s, p) for s, p in enumerate([100.0, 102.0, 104.0])]
    rows += [compare_row("gblm-l1", "2:4", s, p) for s, p in enumerate([106.0, 107.0, 108.0])]
    rows += [compare_row("sparsegpt", "2:4", 0, 50.0)]  # one seed: its number, no comparison
    lines = compare.report_lines(rows, [TEXT])
    (gblm,) = [line for line in lines if line.startswith("| gblm-l1 | 2:4 | 3 |")]
    assert gblm.endswith("107.00 +- 1.00 (106.00..108.00) +4.9% vs Wanda (n=3) **worse** |")
    (sparsegpt,) = [line for line in lines if line.startswith("| sparsegpt | 2:4 | 1 |")]
    assert sparsegpt.endswith("50.00 +- 0.00 (50.00..50.00) |")
    assert compare.report_lines(rows[:1], [TEXT])[-1] == "| dense | - | - | 40.00 | 1.0 | - | - |"


def test_committed_compare_table_comes_back_from_its_json():
    rows = json.loads((RESULTS / "compare_smollm2_seeds.json").read_text())["rows"]
    table = "\n".join(compare.report_lines(rows, list(rows[0]["ppl"]))) + "\n"
    assert (RESULTS / "compare_smollm2_seeds.md").read_text().endswith("\n\n" + table)


def test_committed_alpha_sweep_report_comes_back_from_its_json(tmp_path):
    results = json.loads((RESULTS / "alpha_sweep_smollm2.json").read_text())
    args = argparse.Namespace(seqlen=512, eval_tokens=4096, eval_seqlen=512)  # the sweep's settings (its header)
    alpha_sweep.write_report(results, args, tmp_path / "sweep.md", None)
    assert (tmp_path / "sweep.md").read_text() == (RESULTS / "alpha_sweep_smollm2.md").read_text()


def test_committed_sparsity_curve_table_comes_back_from_its_json():
    results = json.loads((RESULTS / "sparsity_curve_smollm2.json").read_text())
    assert sparsity_curve.report_markdown(results) == (RESULTS / "sparsity_curve_smollm2.md").read_text()


def test_evaluation_tokens_read_the_start_or_the_middle(tmp_path):
    class Characters:  # a tokenizer stand-in: one token per character
        def __call__(self, text, **kwargs):
            return {"input_ids": [ord(c) for c in text]}

    (tmp_path / "a.txt").write_text("abcdefgh")
    texts = {"start": "a.txt", "middle": ("a.txt", "middle"), "absolute": (str(tmp_path / "a.txt"), "start")}
    tokens = common.evaluation_tokens(tmp_path, Characters(), 3, texts)
    assert {k: "".join(map(chr, v.tolist())) for k, v in tokens.items()} == {"start": "abc", "middle": "efg", "absolute": "abc"}


def test_shared_flags_keep_their_defaults_and_take_overrides():
    parser = common.argument_parser("doc", "seqlen", "seeds", eval_tokens=dict(default=4096), extra=dict(default="x"))
    args = parser.parse_args([])
    assert (args.seqlen, args.seeds, args.eval_tokens, args.extra) == (512, "0", 4096, "x")
    assert parser.parse_args(["--eval-tokens", "8"]).eval_tokens == 8
    assert common.comma_list("0,1,,2", int) == [0, 1, 2]
