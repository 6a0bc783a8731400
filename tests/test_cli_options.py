"""The option groups: parameters declared once, appended to each command's signature, handed over as one value."""

from __future__ import annotations

import inspect

import pytest
import typer
from typer.testing import CliRunner

from vqtool.cli import app, options


def _app_with(group: options.OptionGroup) -> tuple[typer.Typer, list]:
    seen = []
    demo = typer.Typer()

    @demo.command()
    @group
    def show(n: int = typer.Option(1, "--n"), bundle=None) -> None:
        seen.append((n, bundle))

    return demo, seen


def test_group_values_arrive_as_one_namespace_and_defaults_hold():
    group = options.OptionGroup("bundle", {"steps": (int, options.Steps), "seed": (int, options.Seed)})
    demo, seen = _app_with(group)
    r = CliRunner().invoke(demo, ["--n", "3", "--steps", "7"])
    assert r.exit_code == 0, r.output
    n, bundle = seen[0]
    assert n == 3 and vars(bundle) == {"steps": 7, "seed": 0}


def test_make_builds_the_value():
    group = options.OptionGroup("bundle", {"seed": (int, options.Seed)}, make=lambda seed: ("made", seed))
    demo, seen = _app_with(group)
    assert CliRunner().invoke(demo, ["--seed", "5"]).exit_code == 0
    assert seen[0][1] == ("made", 5)


def test_signature_hides_the_group_parameter_and_lists_its_options():
    group = options.OptionGroup("bundle", {"temperature": (float, options.Temperature)})

    @group
    def fn(n: int = 1, bundle=None) -> None: ...

    assert list(inspect.signature(fn).parameters) == ["n", "temperature"]


def test_a_command_without_the_group_parameter_is_refused():
    with pytest.raises(TypeError, match="takes no parameter 'bundle'"):
        options.OptionGroup("bundle", {})(lambda n=1: None)


@pytest.mark.parametrize("command", ["sample", "inpaint", "eval", "neighbours"])
def test_every_sampling_command_takes_the_shared_options(command):
    r = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0
    for flag in ("--steps", "--temperature", "--schedule", "--curve", "--order", "--top-k", "--top-p",
                 "--seed", "--device", "--precision", "--threads", "--config", "--set", "--overwrite"):
        assert flag in r.output, (command, flag)
    assert "Sampling" in r.output


def test_common_applies_threads_before_the_command_runs(monkeypatch):
    import torch

    monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.append(n))
    calls: list[int] = []
    demo, seen = typer.Typer(), []

    @demo.command()
    @options.common
    def show(n: int = typer.Option(1, "--n"), common=None) -> None:
        seen.append((n, common))

    r = CliRunner().invoke(demo, ["--threads", "1", "--seed", "4"])
    assert r.exit_code == 0, r.output
    assert calls == [1] and seen[0][1].seed == 4 and not hasattr(seen[0][1], "threads")
    r = CliRunner().invoke(demo, ["--threads", "-2"])
    assert r.exit_code != 0 and "--threads -2" in str(r.exception)
