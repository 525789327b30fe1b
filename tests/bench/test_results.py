"""Results files: rows with their provenance, and files of the old shape still read."""

import json
import socket

import torch

from expunge.bench import read_results, read_rows, report

FIELDS = {"commit", "dirty", "expunge", "torch", "numpy", "python", "platform", "threads", "cpu", "cpus", "cuda",
          "load_before", "load_after", "started", "written", "command", "settings"}


def _write(rows, path, **kw):
    drawn = []
    report(rows, path, table=lambda rows: None, plot=lambda rows, png: drawn.append(png), **kw)
    return drawn


def test_report_writes_rows_with_their_provenance(tmp_path):
    rows = [{"case": "a", "speedup": 2.0}, {"case": "b", "speedup": 3.0}]
    out = tmp_path / "results" / "x.json"
    drawn = _write(rows, out, settings={"rounds": {"fixed": 1}})
    assert drawn == [out.with_suffix(".png")]
    data = json.loads(out.read_text())
    assert set(data) == {"provenance", "rows"} and data["rows"] == rows
    prov = data["provenance"]
    assert FIELDS <= set(prov), FIELDS - set(prov)
    assert prov["torch"] == torch.__version__ and prov["threads"] == torch.get_num_threads()
    assert prov["settings"] == {"rounds": {"fixed": 1}} and prov["cpu"] and prov["written"]
    assert prov["commit"] is None or len(prov["commit"]) == 40
    hostname = socket.gethostname()
    if len(hostname) >= 4:  # a short name could occur by chance in other text
        assert hostname not in out.read_text()
    assert read_results(out) == (rows, prov) and read_rows(out) == rows


def test_files_of_the_old_shape_are_still_read(tmp_path):
    rows = [{"case": "a"}]
    old = tmp_path / "old.json"
    old.write_text(json.dumps(rows))
    assert read_results(old) == (rows, None) and read_rows(old) == rows
