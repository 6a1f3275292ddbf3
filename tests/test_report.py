"""The report on a small synthetic results store."""

import csv
import json
import os
import subprocess
import sys

import pytest

from dlfix_jax import report
from dlfix_jax.report import tables

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _rec(dataset, approach, abbrev, seed, status="ok", **metrics):
    rec = {"key": f"{dataset}/lenet5/{approach}/{seed}", "dataset": dataset,
           "model": "lenet5", "approach": approach, "abbrev": abbrev,
           "seed": seed, "status": status,
           "reason": None if status == "ok" else f"{status} because",
           "metrics": metrics, "fixer_config": {}, "info": {},
           "version": "0.1.0", "git_rev": "abc", "started": "", "finished": ""}
    return rec


def _store(tmp_path):
    recs = []
    for seed, acc in enumerate((90.0, 92.0, 94.0)):
        for ds, shift in (("digits", 0.0), ("mnist", 5.0)):
            r = _rec(ds, "apricot", "AP", seed, acc=acc + shift,
                     d_acc=1.0 + seed, rr=50.0, asr=20.0, d_asr=10.0,
                     aaod=None, d_aaod=None, nfr=0.5, time_s=75.0 + seed,
                     time_compile_s=5.0, time_execute_s=70.0 + seed)
            if ds == "digits":
                r["ensembles"] = {
                    c: {"acc": acc + k, "asr": 20.0, "aaod": None,
                        "nfr": 0.5 - 0.1 * k, "rr": 50.0}
                    for k, c in enumerate(("NO", "SV", "HV", "UP", "UD",
                                           "US"))}
            recs.append(r)
        recs.append(_rec("digits", "arachne", "AR", seed,
                         acc=60.0 + seed, d_acc=-5.0, rr=10.0, asr=50.0,
                         d_asr=-3.0, nfr=3.0, time_s=3700.0))
        recs.append(_rec("mnist", "ra", "RA", seed, status="unadaptable",
                         time_s=0.01))
        recs.append(_rec("digits", "ra", "RA", seed, acc=70.0, rr=1.0,
                         nfr=0.1, time_s=13.0))
    recs.append(_rec("mnist", "arachne", "AR", 2, acc=80.0, rr=5.0,
                     nfr=1.0, time_s=30.0))
    for seed in (0, 1):
        recs.append(_rec("mnist", "arachne", "AR", seed, status="failure",
                         time_s=99.0))
    # A record superseded by a newer one with the same key (--force).
    old = _rec("digits", "arachne", "AR", 0, acc=10.0)
    lines = [json.dumps(old)] + [json.dumps(r) for r in recs]
    path = tmp_path / "results.jsonl"
    # ... and a torn trailing line of a write in progress.
    path.write_text("\n".join(lines) + "\n" + '{"key": "torn"')
    return tmp_path


def _read_csv(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], {r[0]: dict(zip(rows[0], r)) for r in rows[1:]}


def test_cell_summaries():
    m = tables.METRICS["acc"]
    ok = [{"status": "ok", "metrics": {"acc": v}} for v in (1.0, 2.0, 3.0)]
    s = tables.summarise(ok, m)
    assert (s.mean, s.std, s.display) == (2.0, 1.0, "2.00 ± 1.00")
    fail = [{"status": "failure"}] * 2 + [ok[0]]
    assert tables.summarise(fail, m).display == "FAILURE (2/3); ok: 1.00"
    assert tables.summarise([{"status": "corrupted"}] * 3,
                            m).display == "CORRUPTED"
    mixed = [{"status": "corrupted"}, {"status": "failure"}]
    assert tables.summarise(mixed, m).display == \
        "FAILURE (1/2), CORRUPTED (1/2)"
    assert tables.summarise([{"status": "ok", "metrics": {"acc": None}}],
                            m).display == tables.NA
    assert [tables.format_duration(s) for s in (3.24, 17, 545, 49560)] == \
        ["3.2s", "17s", "9m05s", "13h46m"]


def test_report_files_and_contents(tmp_path):
    workdir = _store(tmp_path)
    out = report.write_report(str(workdir))
    rdir = workdir / "report"
    assert out["records"] == 18  # newest per key; torn line ignored

    header, t1 = _read_csv(rdir / "table1.csv")
    # Columns in the study's dataset order (mnist first), 3 metrics each.
    assert header == ["approach", "mnist ACC", "mnist ⇑ACC", "mnist RR",
                      "digits ACC", "digits ⇑ACC", "digits RR"]
    assert list(t1) == ["AP", "RA", "AR"]  # study order
    assert t1["AP"]["digits ACC"] == "92.00 ± 2.00"
    assert t1["AP"]["mnist ACC"] == "97.00 ± 2.00"
    assert t1["AP"]["digits ⇑ACC"] == "2.00 ± 1.00"
    assert t1["AR"]["digits ACC"] == "61.00 ± 1.00"  # superseded 10.0 gone
    assert t1["AR"]["mnist ACC"] == "FAILURE (2/3); ok: 80.00"
    assert t1["RA"]["mnist RR"] == "UNADAPTABLE"

    _, t2 = _read_csv(rdir / "table2.csv")
    assert t2["AP"]["digits AAOD"] == tables.NA
    assert t2["AP"]["digits NFR"] == "0.50 ± 0.00"
    _, t3 = _read_csv(rdir / "table3.csv")
    assert t3["AP"]["digits TIME"] == "1m16s ± 1.0s"
    assert t3["AR"]["digits TIME"] == "1h01m ± 0.0s"

    with open(rdir / "table1_long.csv", newline="") as f:
        long = list(csv.DictReader(f))
    ap = [r for r in long if r["approach"] == "AP"
          and r["dataset"] == "digits" and r["metric"] == "ACC"][0]
    assert float(ap["mean"]) == 92.0 and float(ap["std"]) == 2.0
    assert ap["n_ok"] == "3" and ap["status"] == "ok"
    ar = [r for r in long if r["approach"] == "AR"
          and r["dataset"] == "mnist" and r["metric"] == "ACC"][0]
    assert ar["status"] == "mixed" and ar["n_ok"] == "1"

    sk_header, sk = _read_csv(rdir / "sk_groups.csv")
    assert sk_header == ["approach", "ACC", "RR", "ASR", "AAOD", "NFR",
                         "TIME"]
    assert sk["AP"]["ACC"] == "a" and sk["AR"]["ACC"] == "c"
    assert sk["RA"]["ACC"] == "b"
    assert sk["AP"]["AAOD"] == "-"  # no AAOD observation anywhere
    assert sk["AP"]["NFR"] == "b" and sk["RA"]["NFR"] == "a"  # lower better

    for name in ("table1.png", "table2.png", "table3.png", "sk_groups.png",
                 "box_acc.png", "box_time.png",
                 "discussion_digits_AP.png"):
        with open(rdir / name, "rb") as f:
            assert f.read(8) == PNG_MAGIC, name
    assert not (rdir / "discussion_mnist_AP.png").exists()
    with open(rdir / "ensembles.csv", newline="") as f:
        ens = list(csv.DictReader(f))
    sv = [r for r in ens if r["combination"] == "SV" and r["metric"] == "acc"]
    assert float(sv[0]["mean"]) == pytest.approx(93.0)

    md = (rdir / "report.md").read_text()
    for text in ("Table 1", "Table 2", "Table 3", "Scott-Knott ESD groups",
                 "| AP | a |", "FAILURE (2/3)", "discussion_digits_AP.png",
                 "unadaptable because"):
        assert text in md, text
    assert not [p for p in os.listdir(rdir) if p.startswith(".tmp-")]


def test_missing_or_empty_store_is_an_error(tmp_path):
    with pytest.raises(tables.ReportError, match="no results store"):
        report.write_report(str(tmp_path))
    (tmp_path / "results.jsonl").write_text("")
    with pytest.raises(tables.ReportError, match="holds no records"):
        report.write_report(str(tmp_path))
    # Only invalid records: each is skipped with a warning, then none left.
    (tmp_path / "results.jsonl").write_text('{"dataset": "d"}\n[1, 2]\n')
    with pytest.raises(tables.ReportError, match="holds no records"):
        report.write_report(str(tmp_path))
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.report",
         f"--workdir={tmp_path / 'nowhere'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "no results store" in proc.stderr


def test_invalid_lines_are_skipped_and_a_newline_less_record_counts(
        tmp_path, caplog):
    """Issue 11 items 9-10: a JSON line that is not a record is skipped with
    a warning naming the line (not a refusal of the whole store); a
    complete last record without its newline is read, not dropped."""
    good = [_rec("digits", "arachne", "AR", s, acc=90.0 + s) for s in (0, 1)]
    text = (json.dumps(good[0]) + "\n" + '{"key": "only/a/key/0"}\n'
            + "not json\n" + json.dumps(good[1]))  # no trailing newline
    (tmp_path / "results.jsonl").write_text(text)
    with caplog.at_level("WARNING"):
        recs = tables.load_records(str(tmp_path))
    assert sorted(r["seed"] for r in recs) == [0, 1]
    assert any("line 2 ignored" in m for m in caplog.messages)
    assert any("line 3 is not valid JSON" in m for m in caplog.messages)


def test_failed_report_leaves_no_partial_directory(tmp_path):
    """Issue 11 item 15: a report that fails half-way (here a bad
    ``sk_alpha``) leaves no partial directory and keeps an earlier report;
    files get the user's umask mode, not 0600."""
    import stat
    workdir = _store(tmp_path)
    with pytest.raises(ValueError, match="alpha"):
        report.write_report(str(workdir), sk_version="o", sk_alpha=7.0)
    assert not (workdir / "report").exists()
    assert not [p for p in os.listdir(workdir) if p.startswith(".tmp-")]
    report.write_report(str(workdir))
    before = sorted(os.listdir(workdir / "report"))
    mode = stat.S_IMODE(os.stat(workdir / "report" / "report.md").st_mode)
    from dlfix_jax import fileio
    assert mode == fileio.FILE_MODE  # 0o666 & ~umask
    with pytest.raises(ValueError, match="alpha"):
        report.write_report(str(workdir), sk_version="o", sk_alpha=-1.0)
    assert sorted(os.listdir(workdir / "report")) == before


def test_mixed_execution_is_named_and_warned(caplog):
    """A cell whose seeds ran under different seed modes or backends (a
    store put together from different runs) is reported with a warning
    naming the seeds; records without ``execution`` (older stores) and
    non-ok seeds are not compared."""
    recs = []
    for seed, mode in enumerate(("vmap", "vmap", "sequential")):
        r = _rec("mnist", "genmunn", "GM", seed, acc=90.0)
        r["execution"] = {"mode": mode, "backend": "cpu"}
        recs.append(r)
    assert tables.mixed_execution(recs) == (
        "sequential on cpu: seed 2; vmap on cpu: seeds 0, 1")
    assert tables.mixed_execution(recs[:2]) is None
    assert tables.mixed_execution(recs[:2] + [_rec("mnist", "genmunn", "GM",
                                                   2, acc=1.0)]) is None
    older = dict(recs[2], execution={"mode": "sequential"})  # no backend
    assert tables.mixed_execution(recs[:2] + [older]) is None
    failed = dict(recs[2], status="failure")
    assert tables.mixed_execution(recs[:2] + [failed]) is None
    gpu = dict(recs[1], execution={"mode": "vmap", "backend": "gpu"})
    assert tables.mixed_execution([recs[0], gpu]) == (
        "vmap on cpu: seed 0; vmap on gpu: seed 1")
    with caplog.at_level("WARNING"):
        tables.Grid.from_records(recs)
    assert "GM / mnist: its seeds ran under different executions" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        tables.Grid.from_records(recs[:2])
    assert "different executions" not in caplog.text
