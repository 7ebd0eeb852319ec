"""`regionmed-train --threads` and the warning when a CPU run's threads would share cores with other work."""

import pytest
from cli_helpers import run_failing

from regionmed_clip.training_scripts.train import cpu_threads_advice, main


def test_no_advice_when_the_threads_fit_the_idle_cores():
    assert cpu_threads_advice(threads=2, cores=2, load=0.3) is None
    assert cpu_threads_advice(threads=1, cores=2, load=1.0) is None


def test_a_busy_machine_gets_the_thread_count_that_fits():
    advice = cpu_threads_advice(threads=2, cores=2, load=1.9)  # another training holds both cores
    assert "--threads 1" in advice and "load 1.9 on 2 cores" in advice
    assert "--threads 6" in cpu_threads_advice(threads=8, cores=8, load=2.2)


@pytest.mark.parametrize("threads", ["0", "-2"])
def test_a_thread_count_below_one_is_refused(threads, capsys):
    run_failing(main, ["--threads", threads], capsys, 2, "--threads", f"must be a positive integer, got '{threads}'")
