"""The benchmark harness itself: a case that raises does not lose the others' rows, a contract
check catches NaN, and each suite's legend says what its ref / floor / check rows are."""
from __future__ import annotations

import io
import json

import torch

from lowrank_ops import bench
from lowrank_ops.bench import Case, Config, Impl, measure

CFG = Config(device=torch.device("cpu"), dtype=torch.float32, quick=True, min_run_time=0.0, min_runs=1, warmup=0)


def _case(name, contract=None, ours=lambda: torch.ones(3), ref=True):
    impls = [Impl("ours", "ours", ours, 1.0, contract=contract)]
    if ref:
        impls.append(Impl("ref", "ref", lambda: torch.ones(3), 1.0))
    return Case("test_suite", name, lambda cfg: measure(cfg, name, impls))


def _boom(cfg):
    raise RuntimeError("broken case")


def test_a_raising_case_keeps_the_others_and_is_reported(tmp_path):
    out = io.StringIO()
    report = bench.run(CFG, [_case("good_a"), Case("test_suite", "bad", _boom), _case("good_b")], stream=out)
    assert [r.case for r in report.rows if r.impl == "ours"] == ["good_a", "good_b"]
    assert report.header["failed_cases"] == [{"case": "bad", "error": "RuntimeError: broken case"}]
    assert "bad" in out.getvalue() and "broken case" in out.getvalue()
    path = tmp_path / "r.json"
    bench.write_json(report, str(path))
    assert json.loads(path.read_text())["header"]["failed_cases"][0]["case"] == "bad"


def test_contract_check_without_a_reference():
    ok = _case("ok", contract=lambda: 1e-7, ref=False).run(CFG)
    bad = _case("bad", contract=lambda: 0.1, ref=False).run(CFG)
    nan = _case("nan", contract=lambda: float("nan"), ref=False).run(CFG)
    assert ok[0].check is True and bad[0].check is False and nan[0].check is False


def test_wrong_output_against_the_reference_fails():
    rows = _case("wrong", ours=lambda: torch.tensor([1.0, float("nan"), 1.0])).run(CFG)
    assert rows[0].check is False


def test_every_suite_describes_its_roles():
    bench.load_suites()
    from lowrank_ops.bench import _ROLES
    from lowrank_ops.bench.suites import SUITES
    assert set(SUITES) <= set(_ROLES)
