"""Tier 1: the configuration YAML, its schema, and reading it (no Ray)."""

from __future__ import annotations

import os
import subprocess
import sys

import dask.config
import jsonschema
import pandas as pd
import pytest
import yaml

from ray_oob_sched import _config
from ray_oob_sched._config import SchedulerConfig, ray_init_kwargs
from shuffle._malloc import DEFAULT_MALLOC, MallocTuning
from shuffle._options import RunOptions


def _load(path):
    with open(path) as f:
        return yaml.safe_load(f)


def test_defaults_validate_against_schema():
    jsonschema.validate(_load(_config.DEFAULTS_PATH), _load(_config.SCHEMA_PATH))


def test_schema_is_complete():
    """Every default key is described by the schema, and nothing else is."""

    def walk(defaults, schema, path):
        props = schema.get("properties", {})
        assert set(defaults) == set(props), path
        for k, v in defaults.items():
            if isinstance(v, dict):
                walk(v, props[k], f"{path}.{k}")

    walk(_load(_config.DEFAULTS_PATH), _load(_config.SCHEMA_PATH), "")


def test_schema_rejects_a_bad_value():
    bad = _load(_config.DEFAULTS_PATH)
    bad["ray-oob-sched"]["scheduler"]["max-in-flight"] = 0
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, _load(_config.SCHEMA_PATH))


def test_auto_window_scales_with_cluster():
    assert SchedulerConfig.from_dask_config(cluster_cpus=2).max_in_flight == 32
    assert SchedulerConfig.from_dask_config(cluster_cpus=100).max_in_flight == 400


def test_values_come_from_dask_config():
    settings = {
        "ray-oob-sched.scheduler.max-in-flight": 5,
        "ray-oob-sched.scheduler.fuse.enabled": False,
    }
    with dask.config.set(settings):
        cfg = SchedulerConfig.from_dask_config(cluster_cpus=2)
    assert cfg.max_in_flight == 5 and not cfg.fuse.enabled


def test_bad_window_names_the_key():
    with dask.config.set({"ray-oob-sched.scheduler.max-in-flight": -1}):
        with pytest.raises(ValueError, match="max-in-flight"):
            SchedulerConfig.from_dask_config(cluster_cpus=2)


@pytest.mark.parametrize(
    "var, value, field, expected",
    [
        ("SCHEDULER__FUSE__MAX_TASKS", "7", "fuse.max_tasks", 7),
        ("SCHEDULER__FUSE__ENABLED", "false", "fuse.enabled", False),
        ("SCHEDULER__MAX_IN_FLIGHT", "5", "max_in_flight", 5),
        ("SCHEDULER__INLINE_DATA_BYTES", "0", "inline_data_bytes", 0),
        ("SCHEDULER__FORWARD_WARNINGS", "false", "forward_warnings", False),
        ("SCHEDULER__OUTPUT_WINDOW_BYTES", "0", "output_window_bytes", 0),
        ("SCHEDULER__RUN_IN_CALLER", "false", "run_in_caller", False),
    ],
)
def test_environment_variables_work_as_for_dask(var, value, field, expected):
    """In a fresh process, where dask reads the environment before our defaults load."""
    code = (
        "import operator, ray_oob_sched._config as c; "
        "cfg = c.SchedulerConfig.from_dask_config(cluster_cpus=2); "
        f"print(repr(operator.attrgetter({field!r})(cfg)))"
    )
    env = {**os.environ, f"DASK_RAY_OOB_SCHED__{var}": value}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == repr(expected)


@pytest.mark.parametrize(
    "key, value",
    [
        ("scheduler.fuse.max-tasks", 0),
        ("scheduler.inline-data-bytes", -1),
        ("scheduler.fuse.enabled", "maybe"),
        ("scheduler.forward-warnings", "sometimes"),
        ("scheduler.output-window-bytes", -1),
        ("scheduler.run-in-caller", "never"),
    ],
)
def test_out_of_range_values_name_their_key(key, value):
    with dask.config.set({f"ray-oob-sched.{key}": value}), pytest.raises(ValueError, match=key):
        SchedulerConfig.from_dask_config(cluster_cpus=2)


def test_init_kwargs_drop_nulls_and_use_underscores():
    with dask.config.set({"ray-oob-sched.init.num-cpus": 3}):
        kw = ray_init_kwargs()
    assert kw["num_cpus"] == 3 and "object_store_memory" not in kw


def test_the_free_period_goes_into_rays_system_config():
    assert ray_init_kwargs()["_system_config"] == {"free_objects_period_milliseconds": 100}
    with dask.config.set({"ray-oob-sched.init.free-objects-period-ms": 250}):
        assert ray_init_kwargs()["_system_config"] == {"free_objects_period_milliseconds": 250}
    with dask.config.set({"ray-oob-sched.init.free-objects-period-ms": None}):
        kw = ray_init_kwargs()
    assert "_system_config" not in kw and "free_objects_period_ms" not in kw


def test_shuffle_config_reads_every_key():
    from ray_oob_sched._config import ShuffleConfig

    settings = {
        "ray-oob-sched.shuffle.transport": "tcp",
        "ray-oob-sched.shuffle.memory-limit": None,
    }
    with dask.config.set(settings):
        cfg = ShuffleConfig.from_dask_config()
    assert cfg.transport == "tcp" and cfg.memory_limit is None and cfg.timeout == 60.0
    assert (cfg.device, cfg.actor_num_gpus, cfg.gpu_results) == ("auto", 0.01, "device")
    assert cfg.rechunk_tasks_max_pieces == 4096
    with dask.config.set({"ray-oob-sched.shuffle.rechunk-tasks-max-pieces": -1}):
        with pytest.raises(ValueError, match=r"shuffle\.rechunk-tasks-max-pieces"):
            ShuffleConfig.from_dask_config()
    with dask.config.set({"ray-oob-sched.shuffle.transport": "carrier-pigeon"}):
        with pytest.raises(ValueError, match=r"shuffle.transport"):
            ShuffleConfig.from_dask_config()


def test_shuffle_memory_limit_takes_bytes_null_or_auto():
    from ray_oob_sched._config import ShuffleConfig
    from shuffle._ids import RunId, ShuffleId
    from shuffle._options import AUTO_MEMORY_FRACTION, RunOptions, auto_memory_limit
    from shuffle._run import DataFrameShuffleRun
    from shuffle._spec import ShuffleRunSpec

    assert ShuffleConfig.from_dask_config().memory_limit == "auto"  # the default
    for value in (0, 2**20, None):
        with dask.config.set({"ray-oob-sched.shuffle.memory-limit": value}):
            assert ShuffleConfig.from_dask_config().memory_limit == value
    with dask.config.set({"ray-oob-sched.shuffle.memory-limit": "lots"}):
        with pytest.raises(ValueError, match=r"memory-limit must be an integer >= 0.*'auto'"):
            ShuffleConfig.from_dask_config()
    with pytest.raises(ValueError, match="memory_limit must be >= 0, None or 'auto'"):
        RunOptions(memory_limit=-1)
    # "auto" is resolved where the run lives, from that machine's memory.
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert auto_memory_limit() == max(64 * 2**20, int(total * AUTO_MEMORY_FRACTION))
    assert auto_memory_limit(1e-12) == 64 * 2**20
    spec = ShuffleRunSpec(
        shuffle_id=ShuffleId("s"), run_id=RunId(1), npartitions_out=1, participants=("a",)
    )
    run = DataFrameShuffleRun(
        spec=spec,
        local="a",
        meta=pd.DataFrame({"_partitions": pd.Series([], dtype="int64")}),
        options=RunOptions(memory_limit="auto"),
    )
    assert run._store._memory_limit == auto_memory_limit()


def test_shuffle_host_is_null_or_a_name():
    from ray_oob_sched._config import ShuffleConfig

    assert ShuffleConfig.from_dask_config().host is None
    with dask.config.set({"ray-oob-sched.shuffle.host": "127.0.0.1"}):
        assert ShuffleConfig.from_dask_config().host == "127.0.0.1"
    with dask.config.set({"ray-oob-sched.shuffle.host": " "}):
        with pytest.raises(ValueError, match=r"shuffle.host must be a host name"):
            ShuffleConfig.from_dask_config()


@pytest.mark.parametrize(
    "key, value",
    [("shuffle.device", "tpu"), ("shuffle.gpu-results", "disk"), ("shuffle.actor-num-gpus", 2)],
)
def test_bad_device_settings_name_their_key(key, value):
    from ray_oob_sched._config import ShuffleConfig

    with dask.config.set({f"ray-oob-sched.{key}": value}), pytest.raises(ValueError, match=key):
        ShuffleConfig.from_dask_config()


def test_service_options_map_every_shuffle_setting():
    from ray_oob_sched._config import ShuffleConfig
    from shuffle.device._options import DeviceOptions
    from shuffle.shell._service import ShuffleService

    settings = {
        "ray-oob-sched.shuffle.transport": "tcp",
        "ray-oob-sched.shuffle.memory-limit": 1000,
        "ray-oob-sched.shuffle.spill-directory": "/tmp/spill-here",
        "ray-oob-sched.shuffle.message-bytes": 4096,
        "ray-oob-sched.shuffle.send-buffer-bytes": 8192,
        "ray-oob-sched.shuffle.combine-bytes": 0,
        "ray-oob-sched.shuffle.timeout": 7.5,
        "ray-oob-sched.shuffle.host": "127.0.0.1",
        "ray-oob-sched.shuffle.device": "host",
        "ray-oob-sched.shuffle.actor-num-gpus": 0.25,
        "ray-oob-sched.shuffle.gpu-results": "host",
        "ray-oob-sched.shuffle.actors-per-node": 3,
        "ray-oob-sched.shuffle.port-range": "40000-40009",
        "ray-oob-sched.shuffle.malloc-mmap-threshold": 2**20,
        "ray-oob-sched.shuffle.malloc-trim-threshold": 2**21,
    }
    with dask.config.set(settings):
        options = ShuffleConfig.from_dask_config().service_options()
    assert options == {
        "transport": "tcp",
        "options": RunOptions(
            memory_limit=1000,
            spill_directory="/tmp/spill-here",
            message_bytes=4096,
            send_buffer_bytes=8192,
            combine_bytes=0,
            malloc=MallocTuning(mmap_threshold=2**20, trim_threshold=2**21),
        ),
        "timeout": 7.5,
        "host": "127.0.0.1",
        "device": DeviceOptions(mode="host", actor_num_gpus=0.25, results="host"),
        "actors_per_node": 3,
        "port_range": (40000, 40009),
    }
    service = ShuffleService(**options)  # starts no actors until used
    assert (service.transport, service.timeout, service.port_range) == ("tcp", 7.5, (40000, 40009))
    service.close()


def test_device_settings_reach_the_shuffle_service():
    from ray_oob_sched._plugin import RaySchedule
    from shuffle.device._options import DeviceOptions

    settings = {
        "ray-oob-sched.shuffle.device": "host",
        "ray-oob-sched.shuffle.actor-num-gpus": 0.5,
        "ray-oob-sched.shuffle.gpu-results": "host",
    }
    with dask.config.set(settings):
        service = RaySchedule().shuffle_service()  # starts no actors until used
    assert service.device == DeviceOptions(mode="host", actor_num_gpus=0.5, results="host")
    service.close()


def test_shuffle_actors_per_node_takes_a_positive_int_or_auto():
    from ray_oob_sched._config import ShuffleConfig

    assert ShuffleConfig.from_dask_config().actors_per_node == "auto"  # the default
    for value in (1, 3):
        with dask.config.set({"ray-oob-sched.shuffle.actors-per-node": value}):
            assert ShuffleConfig.from_dask_config().actors_per_node == value
    for bad in (0, -1, 1.5, "many", True, None):
        with (
            dask.config.set({"ray-oob-sched.shuffle.actors-per-node": bad}),
            pytest.raises(
                ValueError, match=r"shuffle\.actors-per-node must be an integer >= 1.*'auto'"
            ),
        ):
            ShuffleConfig.from_dask_config()


def test_shuffle_combine_bytes_reaches_the_service_and_refuses_bad_values():
    from ray_oob_sched._config import ShuffleConfig
    from ray_oob_sched._plugin import RaySchedule

    assert ShuffleConfig.from_dask_config().combine_bytes == 16 * 2**20  # the default
    with dask.config.set({"ray-oob-sched.shuffle.combine-bytes": 0}):
        service = RaySchedule().shuffle_service()  # starts no actors until used
    assert service.options.combine_bytes == 0  # 0: every input on its own
    service.close()
    for bad in (-1, 1.5, "big", True, None):
        with dask.config.set({"ray-oob-sched.shuffle.combine-bytes": bad}):
            with pytest.raises(ValueError, match=r"shuffle\.combine-bytes must be an integer >= 0"):
                ShuffleConfig.from_dask_config()
    with pytest.raises(ValueError, match="combine_bytes must be >= 0"):
        RunOptions(combine_bytes=-1)


@pytest.mark.parametrize("null", ["mmap", "trim"])
def test_shuffle_malloc_thresholds_are_both_set_or_left_alone(null):
    from ray_oob_sched._config import ShuffleConfig

    assert ShuffleConfig.from_dask_config().malloc == DEFAULT_MALLOC
    assert RunOptions().malloc == DEFAULT_MALLOC  # what a service without config sends
    with dask.config.set({f"ray-oob-sched.shuffle.malloc-{null}-threshold": None}):
        assert ShuffleConfig.from_dask_config().service_options()["options"].malloc is None
    # As an environment variable too (read before the defaults are merged in).
    code = "import ray_oob_sched._config as c; print(c.ShuffleConfig.from_dask_config().malloc)"
    env = {**os.environ, f"DASK_RAY_OOB_SCHED__SHUFFLE__MALLOC_{null.upper()}_THRESHOLD": "None"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert (out.returncode, out.stdout.strip()) == (0, "None"), out.stderr


def test_bad_malloc_thresholds_name_their_key():
    from ray_oob_sched._config import ShuffleConfig

    for key, bad in [("mmap", -1), ("trim", "lots"), ("trim", 2**31), ("mmap", True)]:
        # Checked even when the other one is null (which alone leaves glibc alone).
        other = "trim" if key == "mmap" else "mmap"
        for other_value in (None, 2**20):
            settings = {
                f"ray-oob-sched.shuffle.malloc-{key}-threshold": bad,
                f"ray-oob-sched.shuffle.malloc-{other}-threshold": other_value,
            }
            with dask.config.set(settings):
                match = rf"shuffle\.malloc-{key}-threshold must be an integer in .* or null"
                with pytest.raises(ValueError, match=match):
                    ShuffleConfig.from_dask_config()
    with pytest.raises(TypeError, match="malloc must be a MallocTuning or None"):
        RunOptions(malloc=(1, 2))  # type: ignore[arg-type]


@pytest.mark.parametrize("value, expected", [("2", 2), ("auto", "auto")])
def test_actors_per_node_from_the_environment(value, expected):
    code = (
        "import ray_oob_sched._config as c; "
        "print(repr(c.ShuffleConfig.from_dask_config().actors_per_node))"
    )
    env = {**os.environ, "DASK_RAY_OOB_SCHED__SHUFFLE__ACTORS_PER_NODE": value}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == repr(expected)


def test_actors_per_node_reaches_the_shuffle_service():
    from ray_oob_sched._plugin import RaySchedule

    with dask.config.set({"ray-oob-sched.shuffle.actors-per-node": 3}):
        service = RaySchedule().shuffle_service()  # starts no actors until used
    assert service.actors_per_node == 3
    service.close()
    default = RaySchedule().shuffle_service()
    assert default.actors_per_node == "auto"
    default.close()


def test_shuffle_port_range_is_null_or_first_last_and_reaches_the_service():
    from ray_oob_sched._config import ShuffleConfig
    from ray_oob_sched._plugin import RaySchedule

    assert ShuffleConfig.from_dask_config().port_range is None  # the default
    with dask.config.set({"ray-oob-sched.shuffle.port-range": "40000-40031"}):
        assert ShuffleConfig.from_dask_config().port_range == (40000, 40031)
        service = RaySchedule().shuffle_service()  # starts no actors until used
    assert service.port_range == (40000, 40031)
    service.close()
    for bad in ("40000", "40031-40000", "0-10", "1-65536", "a-b", 40000, [1, 2]):
        with dask.config.set({"ray-oob-sched.shuffle.port-range": bad}):
            with pytest.raises(ValueError, match=r"shuffle\.port-range must be null or"):
                ShuffleConfig.from_dask_config()


def test_shuffle_port_range_from_the_environment():
    code = (
        "from ray_oob_sched._config import ShuffleConfig; "
        "print(ShuffleConfig.from_dask_config().port_range)"
    )
    env = {**os.environ, "DASK_RAY_OOB_SCHED__SHUFFLE__PORT_RANGE": "40000-40031"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "(40000, 40031)"


def test_readme_table_lists_every_setting():
    """The README's configuration table has a row for every default key."""
    with open(os.path.join(os.path.dirname(_config.DEFAULTS_PATH), "..", "README.md")) as f:
        readme = f.read()

    def leaves(tree, prefix):
        for k, v in tree.items():
            if isinstance(v, dict):
                yield from leaves(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}"

    defaults = _load(_config.DEFAULTS_PATH)["ray-oob-sched"]
    missing = [
        key
        for key in leaves(defaults, "")
        if f"| `{key}` |" not in readme
        and not (key.startswith("init.") and "| `init.*` |" in readme)
    ]
    assert missing == []
