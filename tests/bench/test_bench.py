"""The benchmark's machinery: the interleaved timer (order, statistics, errors) on a fake clock, the runner's
agreement check, JSON rewrites and untrusted flag, and the training-step cases. No timing assertions."""
import json
import math
import os
from collections import Counter
from dataclasses import dataclass

import pytest
import torch

from conftest import bench_module

cases = bench_module("cases")
cases_training = bench_module("cases_training")
bench_run = bench_module("run")
timing = bench_module("timing")

CPU = torch.device("cpu")


class FakeClock:
    """A clock that only the fake methods move: each call of a method advances it by that method's next
    duration (milliseconds), and the call is logged."""

    def __init__(self):
        self.now = 0.0
        self.log = []

    def __call__(self):
        return self.now

    def method(self, name, durations_ms, fail_on_call=None):
        durations = list(durations_ms)
        calls = [0]

        def fn():
            calls[0] += 1
            self.log.append(name)
            if fail_on_call is not None and calls[0] == fail_on_call:
                raise RuntimeError(f"{name} failed on call {calls[0]}")
            self.now += durations[(calls[0] - 1) % len(durations)] / 1e3
        return fn


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 6, 7, 8, 9, 16, 17])
def test_round_orders_balance_positions_and_predecessors(m):
    orders = timing.round_orders(m)
    assert len(orders) == (m if m % 2 == 0 else 2 * m)
    assert all(sorted(row) == list(range(m)) for row in orders)
    positions = Counter((pos, i) for row in orders for pos, i in enumerate(row))
    assert set(positions.values()) == {len(orders) // m}  # every method in every position equally often
    if m > 1:
        pairs = Counter((a, b) for row in orders for a, b in zip(row, row[1:]))
        assert len(pairs) == m * (m - 1)  # every ordered pair occurs ...
        assert len(set(pairs.values())) == 1  # ... equally often
    if m > 2:  # over two cycles back to back, no method runs twice in a row
        stream = [i for row in orders + orders for i in row]
        assert all(a != b for a, b in zip(stream, stream[1:]))


def test_round_orders_rejects_no_methods():
    with pytest.raises(ValueError, match="m: expected at least one method"):
        timing.round_orders(0)


def test_time_interleaved_warms_up_then_runs_the_rotating_rounds():
    clock = FakeClock()
    names = ["a", "b", "c", "d", "e"]
    methods = {n: clock.method(n, [1.0]) for n in names}
    rounds = 13  # more than one cycle (2 * 5), and a partial one
    out = timing.time_interleaved(methods, CPU, budget_s=1e9, min_rounds=rounds, max_rounds=rounds, clock=clock)
    orders = timing.round_orders(len(names))
    expected = names + [names[i] for r in range(rounds) for i in orders[r % len(orders)]]
    assert clock.log == expected
    assert [t.rounds for t in out.values()] == [rounds] * len(names)
    timed = clock.log[len(names):]
    for n in names:  # nobody always follows the same method, nor itself
        before = {timed[j - 1] for j in range(1, len(timed)) if timed[j] == n}
        assert before == set(names) - {n}


def test_time_interleaved_statistics_on_a_fake_clock():
    clock = FakeClock()
    steady = [4.0] * 10
    noisy = [float(v) for v in range(1, 11)]
    # The first call is the warm-up: its (huge) duration must not be counted.
    methods = {"steady": clock.method("steady", [1000.0] + steady), "noisy": clock.method("noisy", [1000.0] + noisy)}
    out = timing.time_interleaved(methods, CPU, budget_s=1e9, min_rounds=10, max_rounds=10, clock=clock)
    s, n = out["steady"], out["noisy"]
    assert (s.median_ms, s.min_ms, s.spread, s.rounds, s.trusted) == pytest.approx((4.0, 4.0, 0.0, 10, True))
    assert n.times_ms == pytest.approx(tuple(noisy))
    assert n.median_ms == pytest.approx(5.5) and n.min_ms == pytest.approx(1.0)
    # inclusive deciles of 1..10: p10 = 1.9, p90 = 9.1
    assert n.spread == pytest.approx((9.1 - 1.9) / 5.5)
    assert not n.trusted and n.error is None


def test_time_interleaved_stops_on_the_budget_within_min_and_max_rounds():
    def rounds(**kw):
        clock = FakeClock()
        methods = {"a": clock.method("a", [10.0]), "b": clock.method("b", [10.0])}  # 20 ms a round
        return timing.time_interleaved(methods, CPU, clock=clock, **kw)["a"].rounds

    assert rounds(budget_s=0.095, min_rounds=1, max_rounds=100) == 5
    assert rounds(budget_s=0.1, min_rounds=8, max_rounds=100) == 8
    assert rounds(budget_s=0.1, min_rounds=1, max_rounds=3) == 3
    assert rounds(budget_s=0.0, min_rounds=2, max_rounds=100) == 2


def test_time_interleaved_reports_a_raising_method_and_times_the_others():
    clock = FakeClock()
    methods = {"ok": clock.method("ok", [2.0]),
               "broken": clock.method("broken", [1.0], fail_on_call=1),     # fails in its warm-up
               "later": clock.method("later", [3.0], fail_on_call=4)}       # fails in its third round
    out = timing.time_interleaved(methods, CPU, budget_s=1e9, min_rounds=6, max_rounds=6, clock=clock)
    assert list(out) == ["ok", "broken", "later"]
    assert out["ok"].error is None and out["ok"].rounds == 6 and out["ok"].median_ms == pytest.approx(2.0)
    for name, call in (("broken", 1), ("later", 4)):
        t = out[name]
        assert t.error == f"RuntimeError: {name} failed on call {call}"
        assert t.rounds == 0 and math.isnan(t.median_ms) and not t.trusted
    assert clock.log.count("broken") == 1 and clock.log.count("later") == 4


def test_time_interleaved_on_cuda_brackets_every_call_with_events_and_waits(monkeypatch):
    log = []

    class FakeEvent:
        count = 0

        def __init__(self, enable_timing=False):
            assert enable_timing
            FakeEvent.count += 1
            self.id = FakeEvent.count

        def record(self):
            log.append(("record", self.id))

        def synchronize(self):
            log.append(("wait", self.id))

        def elapsed_time(self, end):
            return float(end.id - self.id) * 3.0  # 3 ms: the events of one call are consecutive

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(timing, "synchronize", lambda device: log.append(("device sync",)))
    methods = {n: (lambda n: lambda: log.append(("call", n)))(n) for n in "ab"}
    out = timing.time_interleaved(methods, torch.device("cuda"), budget_s=0, min_rounds=2, max_rounds=2)
    timed = log[log.index(("device sync",), 2) + 1:]  # after the warm-up calls and their device syncs
    assert [e[0] for e in timed] == ["record", "call", "record", "wait"] * 4
    for i in range(0, len(timed), 4):  # begin, call, end, wait for end
        assert timed[i + 2][1] == timed[i][1] + 1 and timed[i + 3][1] == timed[i + 2][1]
    assert all(t.median_ms == 3.0 and t.rounds == 2 for t in out.values())


@pytest.mark.parametrize("kwargs, match", [
    (dict(budget_s=-1.0), "budget_s"), (dict(min_rounds=0), "min_rounds"), (dict(min_rounds=9, max_rounds=3),
                                                                             "min_rounds"),
    (dict(warmup=-1), "warmup")])
def test_time_interleaved_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        timing.time_interleaved({"a": lambda: None}, CPU, **kwargs)


def test_summarize_flags_the_spread_and_single_rounds():
    assert timing.summarize([10.0, 10.0, 10.0]).trusted
    below = timing.summarize([9.0, 10.0, 11.0], untrusted_spread=0.25)   # spread 0.16
    above = timing.summarize([7.0, 10.0, 13.0], untrusted_spread=0.25)   # spread 0.48
    assert below.trusted and below.spread == pytest.approx(1.6 / 10)
    assert not above.trusted and above.spread == pytest.approx(4.8 / 10)
    one = timing.summarize([3.0])
    assert math.isnan(one.spread) and not one.trusted and one.rounds == 1
    with pytest.raises(ValueError, match="times_ms"):
        timing.summarize([])


def test_paired_speedup_is_the_median_of_per_round_ratios():
    base = timing.summarize([10.0, 40.0, 12.0, 10.0, 11.0])   # round 2 hit by noise in both methods
    fast = timing.summarize([5.0, 20.0, 6.0, 5.0, 5.5])
    assert timing.paired_speedup(base, fast) == pytest.approx(2.0)
    assert timing.paired_speedup(base, base) == pytest.approx(1.0)


def test_measure_ms_raises_for_a_failing_function():
    def boom():
        raise ValueError("nope")
    with pytest.raises(RuntimeError, match="ValueError: nope"):
        timing.measure_ms(boom, CPU)


# -- the runner ----------------------------------------------------------------------------------------------

@dataclass
class FakeCase:
    """Three tiny methods on a (3, 5) weight: the baseline, one computing the same thing another way, and
    whatever ``extra`` adds."""

    name: str
    extra: dict = None
    on_build: object = None
    dtype: torch.dtype = torch.float32
    batch: int = 3
    n: int = 1

    def build(self, device, backends):
        if self.on_build is not None:
            self.on_build()
        w = torch.randn(3, 5, requires_grad=True)
        methods = {"base": lambda: w.relu() * 2, "same": lambda: torch.relu(2 * w)}
        methods.update({k: (lambda f: lambda: f(w))(f) for k, f in (self.extra or {}).items()})
        return cases.Problem(methods, (w,), baseline="base")

    def flops(self):
        return 15.0

    def bytes_moved(self, itemsize):
        return 30.0 * itemsize


@pytest.fixture
def fake_ceilings(monkeypatch):
    monkeypatch.setattr(bench_run, "_ceilings", lambda device, clock: {"copy_GBps": 1.0, "fp32_matmul_TFLOPs": 1.0})


def _raise_interrupt():
    raise KeyboardInterrupt  # what a kill in the middle of a run looks like to the runner


def test_json_is_rewritten_after_every_case_and_valid_when_killed(tmp_path, fake_ceilings):
    path = tmp_path / "r.json"
    seen = {}

    def read_then_die():
        seen.update(json.loads(path.read_text()))
        _raise_interrupt()

    args = bench_run.parse_args(["--device", "cpu", "--json", str(path), "--budget", "0"])
    with pytest.raises(KeyboardInterrupt):
        bench_run.run(args, cases=[FakeCase("first"), FakeCase("second", on_build=read_then_die)])
    on_disk = json.loads(path.read_text())
    assert on_disk == seen  # the file the second case found is the one the kill left
    assert on_disk["complete"] is False
    assert {(r["case"], r["method"]) for r in on_disk["rows"]} == {("first", "base"), ("first", "same")}
    assert not [p for p in os.listdir(tmp_path) if p != "r.json"]  # no temporary file left behind

    bench_run.run(args, cases=[FakeCase("first"), FakeCase("second")])
    done = json.loads(path.read_text())
    assert done["complete"] is True and len(done["rows"]) == 4
    row = next(r for r in done["rows"] if r["method"] == "same")
    for p in ("fwd", "fwdbwd"):
        assert row[f"{p}_rounds"] >= 5 and row[f"{p}_min_ms"] <= row[f"{p}_ms"] and row[f"{p}_speedup"] > 0
    assert "| first | same |" in bench_run.format_table(done)


def test_an_interrupted_run_prints_the_finished_cases_and_from_json_reprints_them(tmp_path, fake_ceilings,
                                                                                 monkeypatch, capsys):
    path = tmp_path / "r.json"
    real_run = bench_run.run
    monkeypatch.setattr(bench_run, "run", lambda args, result: real_run(
        args, cases=[FakeCase("first"), FakeCase("second", on_build=_raise_interrupt)], result=result))
    with pytest.raises(SystemExit) as exit_info:
        bench_run.main(["--device", "cpu", "--budget", "0", "--json", str(path)])
    assert exit_info.value.code == 130
    printed = capsys.readouterr().out
    assert "| first | same |" in printed and "| second |" not in printed and "incomplete run" in printed
    bench_run.main(["--from-json", str(path)])
    assert capsys.readouterr().out == printed


def test_cases_filter_selects_by_substring(fake_ceilings):
    args = bench_run.parse_args(["--device", "cpu", "--cases", "eco", "--budget", "0"])
    result = bench_run.run(args, cases=[FakeCase("first"), FakeCase("second")])
    assert {r["case"] for r in result["rows"]} == {"second"}
    with pytest.raises(SystemExit, match="no case name contains"):
        bench_run.run(bench_run.parse_args(["--cases", "nothing"]), cases=[FakeCase("first")])


def test_a_method_that_disagrees_or_raises_is_an_error_row_not_a_timing(fake_ceilings):
    def boom(w):
        raise RuntimeError("cannot run this shape")

    case = FakeCase("c", extra={"wrong": lambda w: w.relu() * 2.1, "boom": boom,
                                "wrong shape": lambda w: w.relu().t()})
    rows = {r["method"]: r for r in bench_run.run_case(case, CPU, bench_run.parse_args(["--budget", "0"]))}
    assert "relative error" in rows["wrong"]["error"] and "fwd_ms" not in rows["wrong"]
    assert rows["boom"]["error"] == "RuntimeError: cannot run this shape"
    assert "output shape (5, 3)" in rows["wrong shape"]["error"]
    assert rows["base"]["fwd_speedup"] == pytest.approx(1.0) and "error" not in rows["same"]


def test_a_failing_baseline_leaves_nothing_timed(fake_ceilings):
    class Broken(FakeCase):
        def build(self, device, backends):
            problem = super().build(device, backends)
            problem.methods["base"] = lambda: 1 / 0
            return problem

    rows = bench_run.run_case(Broken("b"), CPU, bench_run.parse_args(["--budget", "0"]))
    assert rows[0]["error"].startswith("ZeroDivisionError")
    assert all("error" in r and "fwd_ms" not in r for r in rows)


@pytest.mark.parametrize("argv, match", [(["--device", "cuda", "--clock", "cpu"], "--clock cpu"),
                                         (["--threads", "0"], "--threads"), (["--budget", "-1"], "--budget")])
def test_bad_command_lines_are_refused(argv, match, capsys):
    with pytest.raises(SystemExit):
        bench_run.parse_args(argv)
    assert match in capsys.readouterr().err


def test_a_case_that_cannot_be_built_or_is_inconsistent_is_one_error_row(fake_ceilings):
    class NoBaseline(FakeCase):
        def build(self, device, backends):
            problem = super().build(device, backends)
            problem.baseline = "missing"
            return problem

    class BadSteps(FakeCase):
        def build(self, device, backends):
            problem = super().build(device, backends)
            problem.steps = {"base": lambda: None}
            return problem

    args = bench_run.parse_args(["--budget", "0"])
    for case, match in ((FakeCase("x", on_build=lambda: 1 / 0), "ZeroDivisionError"),
                        (NoBaseline("y"), "baseline 'missing'"), (BadSteps("z"), "steps ['base']")):
        rows = bench_run.run_case(case, CPU, args)
        assert len(rows) == 1 and rows[0]["method"] == "(build)" and match in rows[0]["error"]


def _row(method, trusted=True, speedup=1.0):
    timings = {f"{p}_{k}": v for p in ("fwd", "fwdbwd") for k, v in
               (("ms", 2.0), ("min_ms", 1.5), ("spread", 0.1 if trusted else 0.9), ("rounds", 9),
                ("trusted", trusted), ("speedup", speedup))}
    return {"case": "c", "method": method, "baseline": "base", "fwdbwd_peak_MB": None, "fwd_GBps": 1.0,
            "fwd_TFLOPs": 0.1, **timings}


def test_table_flags_untrusted_rows_and_explains_the_flag():
    env = {"device": "cpu", "date": "2026-01-01", "torch": "x", "triton": None, "commit": "c", "command": "run"}
    result = {"environment": env, "ceilings": {"copy_GBps": 10.0}, "rows": [_row("base"), _row("other")],
              "complete": True, "untrusted_spread": 0.25}
    clean = bench_run.format_table(result)
    assert bench_run.UNTRUSTED_FLAG not in clean.split("| case |")[1]
    result["rows"][1] = _row("other", trusted=False, speedup=3.0)
    flagged = bench_run.format_table(result)
    other = next(line for line in flagged.splitlines() if "| other |" in line)
    assert other.count(bench_run.UNTRUSTED_FLAG) == 4  # both spreads and both speedups
    assert "spread by more than 25%" in flagged.splitlines()[-1]
    result["rows"][0] = _row("base", trusted=False)
    result["rows"][1] = _row("other")
    trusted_row = next(line for line in bench_run.format_table(result).splitlines() if "| other |" in line)
    assert trusted_row.count(bench_run.UNTRUSTED_FLAG) == 2  # its speedups lean on the untrusted baseline


# -- the training-step cases -----------------------------------------------------------------------------------

@pytest.mark.parametrize("n, sizes, hidden", [(1, [2, 100, 5], (100,)), (7, [3, 17, 1], (33, 9))])
def test_training_methods_compute_and_train_the_same_model(n, sizes, hidden):
    case = cases_training.TrainingCase("t", 5, n, sizes, torch.float32, cond_features=3, hidden=hidden, lr=1e-2)
    problem = case.build(CPU, ["auto", "torch_bmm"])
    assert set(problem.methods) == set(problem.steps)
    expected = {"vmap(functional_call)", "batched[auto]", "batched[torch_bmm]", "HyperNetwork()",
                "HyperNetwork(fused=False)"} | ({"HyperNetwork(fused=True)"} if n == 1 else set())
    assert set(problem.methods) == expected

    def predictions():
        with torch.no_grad():
            return {k: f().double() for k, f in problem.methods.items()}

    before = predictions()
    ref = before[problem.baseline]
    assert ref.shape == ((5, sizes[-1]) if n == 1 else (5, n, sizes[-1]))
    losses = {k: float(step()) for k, step in problem.steps.items()}
    after = predictions()
    assert (after[problem.baseline] - ref).abs().max() > 1e-4  # the step changed the model
    for k in problem.methods:  # same weights, same data: same predictions, same loss, same update
        torch.testing.assert_close(before[k], ref, rtol=1e-5, atol=1e-6)
        assert losses[k] == pytest.approx(losses[problem.baseline], rel=1e-5)
        torch.testing.assert_close(after[k], after[problem.baseline], rtol=1e-4, atol=1e-5)


def test_default_cases_cover_the_issue_shapes():
    names = [c.name for c in cases_training.default_cases(CPU)]
    for b in (512, 4096):
        case = next(c for c in cases_training.default_cases(CPU) if c.name == f"train step [2,100,5] hidden 100 B={b}")
        assert (case.batch, case.n, case.sizes, case.hidden) == (b, 1, [2, 100, 5], (100,))
    assert len(names) == len(set(names))
