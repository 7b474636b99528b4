"""The README's results section is what bench.report renders from the committed bench/results/*.json."""
import os
import shutil

from bench import report

README = os.path.join(report.ROOT, "README.md")


def test_readme_results_are_rendered_from_the_committed_json():
    text = open(README).read()
    block = text.split(report.START, 1)[1].split(report.END, 1)[0]
    assert block.strip() == report.render().strip(), "README is stale: run `python -m bench.report`"


def test_step_profile_chart_draws(tmp_path):
    from bench.plot import plot_profile

    src = os.path.join(report.ROOT, "bench", "results", "engine_h100_profile.json")
    path = shutil.copy(src, tmp_path / "engine_x_profile.json")
    out = plot_profile(str(path))
    assert out.endswith(".png") and os.path.getsize(out) > 10_000
