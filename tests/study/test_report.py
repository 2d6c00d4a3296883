"""The HTML report: built from a tiny results dir, self-contained, and rendered by a real browser."""

from __future__ import annotations

import html as html_lib
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from idiom_lens.analyses.interventions import KnockoutGrid, KnockoutOptions
from idiom_lens.errors import InputError
from idiom_lens.study.layout import FORMAT
from idiom_lens.study.report import build_report, find_results


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory, tiny_model_dir, tiny_model) -> Path:
    """`idiom-lens run` on the tiny model, plus a knockout stage, an unknown stage and a comparison."""
    import idiom_lens.cli as cli
    from idiom_lens.analyses.interventions import knockout_grid
    from idiom_lens.datasets import load_probes
    from idiom_lens.io import write_json
    from idiom_lens.plots.export import save_figure
    from idiom_lens.plots.interventions import knockout_heatmaps
    from idiom_lens.study.compare import write_comparison

    root = tmp_path_factory.mktemp("results")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cli, "_COMMANDS", ("run",))
        rc = cli.main(["run", "--model", str(tiny_model_dir), "--limit", "3", "--attribution-sample", "2",
                       "--no-png", "--out", str(root)])
    assert rc == 0
    (model_dir,) = [p for p in root.iterdir() if p.is_dir()]
    stage = model_dir / "interventions"
    probes = list(load_probes("idioms").probes[:3])
    grid = KnockoutGrid(ks=[1], windows=(1,), modes=("zero_top",), keep_top_ks=None)
    knock = knockout_grid(tiny_model, probes, KnockoutOptions(grid=grid, controls=("random",)))
    knock.save(stage)
    write_json(stage / "summary.json", {"knockouts": knock.settings, "n_probes": len(probes)})
    save_figure(knockout_heatmaps(knock, k=1, mode="zero_top"), stage / "knockout_zero_top_k1", png=False)
    extra = model_dir / "zz_extra"
    import plotly.graph_objects as go

    save_figure(go.Figure(go.Bar(x=[1, 2], y=[3, 4]), layout={"title": "An extra <b>figure</b> & more"}),
                extra / "extra_bar", png=False)
    write_json(extra / "summary.json", {"note": "a stage the report does not know", "rows": [{"a": 1, "b": "<x>"}]})
    write_comparison(root, png=False)
    return root


def _figure_count(html: str) -> int:
    return html.count('class="plotly-graph-div"')


def test_report_has_every_section_and_figure(results_dir, tmp_path):
    out = build_report(results_dir, out_path=tmp_path / "r.html")
    assert out == tmp_path / "r.html"
    html = out.read_text(encoding="utf-8")
    models, root_stages = find_results(results_dir)
    assert len(models) == 1 and [s.name for s in root_stages] == ["comparison"]
    model = models[0]
    assert [s.name for s in model.stages] == ["trajectory", "recall", "attribution", "interventions", "tracing",
                                              "attention_knockout", "patching", "zz_extra"]
    for anchor in ("overview", "datasets", "build", "root-comparison"):
        assert f'id="{anchor}"' in html
    for stage in ("memorization", "trajectory", "recall", "attribution", "interventions", "tracing",
                  "attention-knockout", "zz-extra", "settings"):
        assert re.search(rf'id="model-[a-z0-9-]*-{stage}"', html), stage
    # Contents list at the top links every section.
    assert html.index('<nav class="toc">') < html.index('<section id="overview">')
    assert '<a href="#root-comparison">' in html
    # Figures: those of every stage, known ones first in their stage.
    for name in ("trajectory.fig.json", "trajectory_target.fig.json", "promotion_layers.fig.json",
                 "layers_logit.fig.json", "layers_logit_diff.fig.json", "knockout_zero_top_k1.fig.json",
                 "extra_bar.fig.json", "depth.fig.json", "where_recall_lives.fig.json",
                 "tracing_curves_last_noised.fig.json", "attention_knockout.fig.json"):
        assert f"({name})" in html, name
    assert html.index("(trajectory.fig.json)") < html.index("(trajectory_target.fig.json)") \
        < html.index("(promotion_layers.fig.json)") < html.index("(layers_logit.fig.json)")
    n = _figure_count(html)
    assert n >= 8 and f"String({n})" in html  # the status script expects exactly the embedded figures
    # Contents from the summaries: phase text, memorization (facts beside idioms), neurons, controls, settings.
    traj = json.loads((model.path / "trajectory" / "summary.json").read_text())
    assert html_lib.escape(traj["phases"]["summary"]) in html
    assert "fraction (hard_to_guess)" in html and "<td>fact</td>" in html and "<td>idiom</td>" in html
    assert "Top neurons per set" in html
    assert "top-1 share threshold moves from 0.3 to 0.8" in html  # the phase statistics' tables
    assert "Knockouts and their control" in html and "<td>random</td>" in html and "<td>targeted</td>" in html
    for key in ("numerics_mode", "prepend_bos", "transformer_lens", "compat", "raw"):
        assert key in html
    assert "&lt;x&gt;" in html and "<x>" not in html  # summary text is escaped
    assert "An extra figure &amp; more" in html  # figure caption without its markup


def test_report_is_self_contained(results_dir, tmp_path):
    import plotly.offline

    html = build_report(results_dir, out_path=tmp_path / "r.html").read_text(encoding="utf-8")
    assert not re.search(r"<script[^>]*\bsrc\s*=", html, re.I)
    assert not re.search(r"<link[^>]*href\s*=\s*[\"']?(https?:)?//", html, re.I)
    assert html.count(plotly.offline.get_plotlyjs()[:500]) == 1  # plotly.js inline, once


def test_default_path(results_dir):
    out = build_report(results_dir)
    assert out == results_dir / "report.html" and out.is_file()
    assert not list(results_dir.glob(".report.html.*"))  # atomic write left no temporary file


def test_no_results_is_a_clear_input_error(results_dir, tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        build_report(tmp_path / "missing")
    with pytest.raises(InputError, match="no study.json"):
        build_report(tmp_path)
    (model_dir,) = [p for p in results_dir.iterdir() if p.is_dir() and p.name != "comparison"]
    with pytest.raises(InputError, match="no study.json"):  # a model folder alone is no study
        build_report(model_dir)
    (tmp_path / "study.json").write_text(json.dumps({"format": FORMAT}))
    (tmp_path / "model" / "empty").mkdir(parents=True)
    with pytest.raises(InputError, match="holds no model with a finished trajectory"):
        build_report(tmp_path)


def test_cli_report(results_dir, tmp_path, monkeypatch, capsys):
    import idiom_lens.cli as cli

    monkeypatch.setattr(cli, "_COMMANDS", ("report",))
    out = tmp_path / "cli.html"
    assert cli.main(["report", "--results", str(results_dir), "--html", str(out)]) == 0
    assert out.is_file() and str(out) in capsys.readouterr().out
    assert cli.main(["report", "--results", str(results_dir), "--out", str(tmp_path / "folder")]) == 0
    assert (tmp_path / "folder" / "report.html").is_file()
    capsys.readouterr()
    assert cli.main(["report", "--results", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("idiom-lens report: error:") and "\n" not in err


# --------------------------------------------------------------------------------------
# A real browser: the page loads offline, every plot draws, no JavaScript error.
# --------------------------------------------------------------------------------------

APT_HINT = "install it with: apt-get update && apt-get install -y chromium"


def _chromium() -> str:
    for candidate in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and Path(candidate).is_file():
            return candidate
    pytest.fail(f"the report's browser test needs Chromium (headless), which is not installed; {APT_HINT}")


def _chromium_run(browser: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
           "--enable-logging=stderr", "--v=0", "--hide-scrollbars", "--virtual-time-budget=10000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


def test_report_renders_in_headless_chromium(results_dir, tmp_path):
    browser = _chromium()
    page = build_report(results_dir, out_path=tmp_path / "report.html")
    expected = _figure_count(page.read_text(encoding="utf-8"))

    run = _chromium_run(browser, tmp_path / "profile", "--dump-dom", page.as_uri())
    assert run.returncode == 0, run.stderr[-2000:]
    body = re.search(r"<body([^>]*)>", run.stdout)
    assert body, f"no <body> in the dumped DOM; stderr: {run.stderr[-2000:]}"
    attrs = dict(re.findall(r'data-([a-z-]+)="([^"]*)"', body.group(1)))
    assert attrs.get("errors") is not None, "the report's status script did not run"
    assert json.loads(html_lib.unescape(attrs["errors"])) == []
    assert int(attrs["plots-expected"]) == expected
    assert int(attrs["plots-rendered"]) == expected, "some plots did not draw"
    assert "Uncaught" not in run.stderr, run.stderr[-2000:]
    assert run.stdout.count('class="main-svg"') >= expected

    shot = tmp_path / "report.png"
    run = _chromium_run(browser, tmp_path / "profile", "--window-size=1280,3000", f"--screenshot={shot}",
                        page.as_uri())
    assert run.returncode == 0 and shot.is_file() and shot.stat().st_size > 20_000, run.stderr[-2000:]
