"""`interlace serve`'s Ray flags: what they ask Ray for, and the combinations refused with the fix."""

from __future__ import annotations

import pytest

from interlace.cli import build_parser
from interlace.server.ray_options import MSG_RAY_THREAD, RayResources, ray_options


def _serve(*flags: str):
    return build_parser().parse_args(["serve", *flags])


def test_without_ray_nothing_changes():
    assert ray_options(_serve()) is None


def test_the_flags_become_the_replicas_resources():
    options = ray_options(_serve("--ray", "auto", "--ray-cpus", "2", "--replicas", "3", "--replica-cpus", "0.5",
                                 "--replica-gpus", "1", "--replica-memory-mb", "512", "--max-hot-models", "2"))
    assert options is not None
    assert (options.address, options.cpus, options.replicas, options.max_hot_models) == ("auto", 2, 3, 2)
    assert options.resources == RayResources(0.5, 1.0, 512.0)
    # What Ray is asked for per actor: memory in bytes.
    assert options.resources.options() == {"num_cpus": 0.5, "num_gpus": 1.0, "memory": 512 * 2**20}


def test_defaults_one_replica_of_one_cpu_and_every_model_hot():
    options = ray_options(_serve("--ray", "head:6379"))
    assert options is not None and options.address == "head:6379"
    assert options.replicas == 1 and options.max_hot_models is None
    assert options.resources.options() == {"num_cpus": 1.0, "num_gpus": 0.0}


def test_ray_with_thread_isolation_is_refused_with_the_fix():
    with pytest.raises(ValueError) as info:
        ray_options(_serve("--ray", "auto", "--isolation", "thread"))
    assert str(info.value) == MSG_RAY_THREAD and "drop `--isolation thread`" in MSG_RAY_THREAD


@pytest.mark.parametrize("flag", ["--replicas", "--max-hot-models", "--ray-cpus"])
def test_counts_must_be_positive(flag, capsys):
    with pytest.raises(SystemExit):
        _serve("--ray", "auto", flag, "0")
    assert "must be > 0" in capsys.readouterr().err
