"""`gptjax plot`: runs compared in one figure."""

import shutil

from PIL import Image

from gptjax import plots


def test_plot_compares_runs_in_one_png(tiny_run, tmp_path, capsys):
  run, _ = tiny_run
  other = tmp_path / "other"
  other.mkdir()
  shutil.copy(run / "metrics.jsonl", other / "metrics.jsonl")
  with open(other / "metrics.jsonl", "a") as f:
    f.write('{"kind": "eval", "step": 4')  # a line cut short by a crash is passed over
  plots.main([str(run), str(other), "--output", str(tmp_path / "compare.png")])
  with Image.open(tmp_path / "compare.png") as image:
    assert image.size == tuple(round(x * plots.DPI) for x in plots.SIZE_INCHES)
  assert not (tmp_path / "compare.png.tmp").exists()
  assert capsys.readouterr().out.strip() == f"{run}, {other}: {tmp_path / 'compare.png'}"
