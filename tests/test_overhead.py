"""`make overhead` (kbench.bench.overhead): its plan of compare passes whichever compiled
variants compare knows, the naming of its rows, its table and its argument errors. Its real
run takes minutes (docs/compare.md, "Host overhead")."""

import os
import signal
import subprocess
import sys

import pytest

from kbench.bench import overhead
from tests.conftest import (REPO, fake_compare_interpreter, in_own_session,
                            sigterm_to_the_tool_alone, wait_for)

pytestmark = pytest.mark.backend_independent


def backends_of(args):
    return args[args.index("--backends") + 1], args[args.index("--jit-compile") + 1]


def test_plan_uses_compares_compiled_variants_when_it_has_them():
    (eager, eager_args, eager_renames), (compiled, args, renames) = overhead.plan(
        {"torch-compiled": ("torch", {"jit_compile": "on"})},
        {"native-torch": "torch", "native-torch-compiled": "torch"})
    assert backends_of(eager_args) == ("jax,tensorflow,torch", "auto") and not eager_renames
    assert "--reference" in eager_args and eager_args[eager_args.index("--reference") + 1] == \
        "native"
    assert backends_of(args) == ("torch-compiled", "on") and renames == {}
    # compare runs its compiled twin only under --jit-compile on (an earlier plan asked for
    # it with --reference none and the table lost the native-torch-compiled row)
    assert args[args.index("--reference") + 1] == "native"
    assert args[args.index("--batch-size") + 1] == "2"
    # every pass repeats its rows, interleaved, three times by default
    assert eager_args[eager_args.index("--repeats") + 1] == args[args.index("--repeats") + 1] \
        == "3"


def test_a_row_run_several_times_is_its_median_run():
    runs = [("torch", rec("torch", ms)) for ms in (14.0, 19.0, 13.0)]
    summary = overhead.summarize(runs + [("native-torch", rec("native-torch", 10.0))])
    assert summary["torch"]["step_time_ms"] == 14.0 and summary["torch"]["p10"] == 13.0


def test_plan_without_the_compiled_names_runs_torch_under_jit_on():
    _, (_, args, renames) = overhead.plan({}, {"native-torch": "torch"}, steps=7)
    assert backends_of(args) == ("torch", "on")
    assert args[args.index("--reference") + 1] == "native" and args[
        args.index("--steps") + 1] == "7"
    assert renames == {"torch": "torch-compiled", "native-torch": "native-torch-compiled"}
    # A twin is named compiled only when its record says it compiled.
    compiled = {"backend": "native-torch", "status": "ok",
                "jit": "torch.compile (inductor, default mode)"}
    eager = {"backend": "native-torch", "status": "ok", "jit": "eager"}
    assert overhead.row_name(compiled, renames) == "native-torch-compiled"
    assert overhead.row_name(eager, renames) is None
    assert overhead.row_name({"backend": "torch", "status": "ok", "jit": "True"},
                             renames) == "torch-compiled"


def rec(backend, ms, status="ok"):
    return {"backend": backend, "status": status, "step_time_ms": ms, "step_time_p10_ms": ms - 1,
            "step_time_p90_ms": ms + 1, "compile_s": 2.0,
            "error": None if status == "ok" else "boom\n\x1b[1mTypeError: dynamo\n  • mask=None"}


def test_table_has_every_row_and_each_keras_row_over_its_own_twin():
    summary = overhead.summarize([("torch", rec("torch", 60.0)),
                                  ("native-torch", rec("native-torch", 30.0)),
                                  ("torch-compiled", rec("torch", 0, status="failed")),
                                  ("native-torch-compiled", rec("native-torch", 20.0))])
    table = overhead.host_table(summary)
    lines = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()[2:]}
    assert list(lines) == list(overhead.ROWS)
    assert "| 60.0 | 59.0-61.0 | 2.00x |" in lines["torch"]
    assert "failed: TypeError: dynamo" in lines["torch-compiled"]
    assert "not run" in lines["jax"]


def test_profile_table_says_where_keras_spends_its_time():
    profile = {"backend": "torch", "model": "resnet20", "batch_size": 2, "steps": 10,
               "step_ms": 60.0, "forward_ms": 35.0,
               "layers": [{"layer": "Conv2D", "calls": 19, "call_ms": 19.0, "inner_ms": 9.5}],
               "functions": [{"function": "keras/src/layers/layer.py:872 __call__",
                              "own_ms": 3.0, "calls": 72}]}
    text = overhead.profile_tables(profile)
    assert "the rest (25.0 ms)" in text
    assert "| Conv2D | Layer.__call__ | 19 | 19.00 | 9.50 | 500 |" in text  # 9.5 ms, 19 calls
    assert "layer.py:872 __call__" in text


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "0"], "--batch-size 0 is not allowed"),
    (["--bogus"], "error: unrecognized arguments: --bogus (see tools/overhead.py --help)"),
    (["--timeout", "nan"], "--timeout nan is not allowed"),
    (["--threads", "-1"], "--threads -1 is not allowed"),
    (["--repeats", "0"], "--repeats 0 is not allowed"),
    (["--python", "/no/such/python"], "--python /no/such/python: no executable interpreter"),
    (["--model", "nope"], "--model nope is not allowed: every framework's native twins cover "
                          "resnet20, resnet32, resnet44, resnet56, resnet110, preact_resnet18"),
])
def test_bad_arguments_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        overhead.main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_an_output_folder_with_a_measurement_is_refused(tmp_path, capsys):
    (tmp_path / "overhead.jsonl").write_text("{}\n")
    with pytest.raises(SystemExit) as stop:
        overhead.main(["--output", str(tmp_path)])
    assert stop.value.code == 2 and "already holds" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a plan checks the model too
        overhead.main(["--plan", "--model", "convnet"])
    assert (tmp_path / "overhead.jsonl").read_text() == "{}\n"


def test_plan_flag_prints_the_commands(capsys):
    assert overhead.main(["--plan"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("eager: kbench compare ") and lines[1].startswith("compiled: ")


def test_one_intra_op_thread_unless_asked_otherwise(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    env = overhead.thread_env(1)
    assert env["OMP_NUM_THREADS"] == "1" and env["TF_NUM_INTRAOP_THREADS"] == "1"
    assert "OMP_NUM_THREADS" not in overhead.thread_env(0)


def test_report_of_a_damaged_folder_is_one_line(tmp_path, capsys):
    (tmp_path / "overhead.jsonl").write_text('{"broken\n')
    with pytest.raises(SystemExit) as stop:
        overhead.main(["--report", str(tmp_path)])
    assert stop.value.code == 2 and "is not a JSON record" in capsys.readouterr().err


def test_report_renders_a_folder_again(tmp_path, capsys):
    import json

    rows = [{"overhead_row": "torch", **rec("torch", 60.0)},
            {"overhead_row": "native-torch", **rec("native-torch", 30.0)},
            {"overhead_row": None, **rec("native-torch", 29.0)}]  # not a row of the table
    (tmp_path / "overhead.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "overhead.md").write_text("Host overhead: title\n\nold table\n")
    assert overhead.main(["--report", str(tmp_path)]) == 0
    text = (tmp_path / "overhead.md").read_text()
    assert text.startswith("Host overhead: title\n\n| run |") and "| 2.00x |" in text
    assert text in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:
        overhead.main(["--report", str(tmp_path / "nowhere")])
    assert stop.value.code == 2
    # It runs nothing: a flag beside it, which it would ignore, is refused
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        overhead.main(["--report", str(tmp_path), "--steps", "5", "--plan"])
    assert stop.value.code == 2 and capsys.readouterr().err == (
        "error: --report DIR renders a saved measurement again and runs nothing: drop --plan, "
        "--steps\n")
    # An overhead.md without the measurement's line (written by a report of a folder that had
    # none): the table's first line is not taken for it, render after render
    (tmp_path / "overhead.md").unlink()
    for _ in range(2):
        assert overhead.main(["--report", str(tmp_path)]) == 0
        assert (tmp_path / "overhead.md").read_text().startswith("| run |")


# --------------------------------------------------------------------------- stopping


def test_sigterm_to_the_tool_alone_stops_its_compare_and_keeps_what_finished(tmp_path):
    """A scheduler's SIGTERM reaches the tool, not the compare it runs as a child: the tool
    passes it on (compare then stops its worker's process group: test_compare) and writes
    the rows that finished before it exits 143."""
    marker = tmp_path / "compare-got"
    python = fake_compare_interpreter(tmp_path / "python", rec("jax", 26.7), marker)
    sigterm_to_the_tool_alone([sys.executable, os.path.join(REPO, "tools", "overhead.py"),
                               "--python", python, "--repeats", "1", "--no-profile",
                               "--output", str(tmp_path / "out")], marker)
    assert "| jax | ok | 26.7 | 25.7-27.7 |" in (tmp_path / "out" / "overhead.md").read_text()


def run_child_program(call):
    """A Python program that runs `call` (run_child's arguments) under exit_on_error, with
    Python's own SIGINT handler even where pytest was started with SIGINT ignored (a shell
    script's `pytest &`)."""
    return [sys.executable, "-c",
            "import signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
            "from kbench.errors import exit_on_error, run_child, sigterm_interrupts\n"
            f"with sigterm_interrupts(): exit_on_error(run_child, {call})"]


def test_a_sigint_the_child_did_not_get_is_passed_on_as_sigterm(tmp_path):
    """Ctrl-C reaches the whole terminal group, so run_child first lets the child act on
    it; a SIGINT sent to the parent alone reaches the child as SIGTERM once that wait is over
    (30 s by default; 0.5 s here)."""
    marker = tmp_path / "child-got"
    child = fake_compare_interpreter(tmp_path / "python", rec("jax", 1.0), marker)
    call = f"[{child!r}, '-m', 'kbench.cli', 'compare', '--output', " \
           f"{str(tmp_path / 'out')!r}], sigint_reach_s=0.5"
    with in_own_session(run_child_program(call), cwd=REPO) as parent:
        wait_for(tmp_path / "child-got.running")
        parent.send_signal(signal.SIGINT)
        _, stderr = parent.communicate(timeout=60)
    assert parent.returncode == 130 and stderr.strip() == "interrupted"
    assert marker.read_text().strip() == "SIGTERM"


@pytest.mark.parametrize("child_status, status, message", [
    (130, 130, "interrupted"), (143, 143, "stopped by SIGTERM"), (2, 0, "")])
def test_a_child_stopped_by_a_signal_of_its_own_stops_the_tool(child_status, status, message):
    """Someone stopped the compare itself: the tool stops too (as if it had been signalled),
    rather than go on to its next pass; any other status is the child's own result."""
    call = f"[{sys.executable!r}, '-c', 'raise SystemExit({child_status})']"
    done = subprocess.run(run_child_program(call), cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert (done.returncode, done.stderr.strip()) == (status, message)


def test_a_child_past_its_timeout_is_stopped_as_sigterm_stops_it_then_killed(tmp_path):
    """run_child(timeout=...) (gpu-check's budget): a compare still running is sent SIGTERM,
    so it stops its worker and keeps what finished, and TimeoutExpired follows; a child that
    ignores SIGTERM is killed once the grace is over."""
    import time

    from kbench.errors import run_child

    marker = tmp_path / "child-got"
    child = fake_compare_interpreter(tmp_path / "python", rec("jax", 1.0), marker)
    with pytest.raises(subprocess.TimeoutExpired):
        run_child([child, "-m", "kbench.cli", "compare", "--output", str(tmp_path / "out")],
                  timeout=2.0)
    assert marker.read_text().strip() == "SIGTERM"
    assert (tmp_path / "out" / "results.jsonl").read_text().strip()  # what finished is kept
    start = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        run_child([sys.executable, "-c", "import signal, time; "
                   "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"],
                  timeout=1.0, grace_s=0.5)
    assert time.monotonic() - start < 30  # killed, not waited for
    assert run_child([sys.executable, "-c", "raise SystemExit(4)"], timeout=30) == 4
