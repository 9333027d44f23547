"""Tier 1: dask's partd disk shuffles found in real graphs, pinned and removed (no Ray)."""

from __future__ import annotations

import gc
import pickle
from pathlib import Path

import dask
import dask.bag as db
import dask.dataframe as dd
import pandas as pd
import partd.file
import pytest
from dask.bag.core import collect as bag_collect
from dask.bag.core import partition as bag_partition
from dask.dataframe.shuffle import collect as df_collect

from ray_oob_sched import _partd
from ray_oob_sched._p2p import UnsupportedGraphError
from tests.scheduler.support import graph_of


def _frame(parts: int = 4) -> dd.DataFrame:
    return dd.from_pandas(pd.DataFrame({"k": range(40), "v": range(40)}), npartitions=parts)


def _funcs(g, keys):
    return sorted({getattr(g.nodes[k].func, "__qualname__", "?") for k in keys})


def test_dataframe_disk_shuffle_pins_the_store_and_its_users_not_the_barrier():
    g = graph_of(_frame(parts=4).shuffle("k", shuffle_method="disk", npartitions=3))
    found = _partd.find(g.nodes, g.dependents)
    assert found is not None
    (creator,) = found.creators
    assert found.users == g.dependents[creator]
    # The appends (one per input partition) and 3 reads (one per output partition).
    assert _funcs(g, found.users) == ["DiskShuffle._shuffle_group", "collect"]
    assert sum(g.nodes[k].func is df_collect for k in found.users) == 3
    barriers = [k for k in g.nodes if "barrier" in str(k)]
    assert barriers and not found.pinned & set(barriers)  # the barrier runs anywhere


def test_merge_with_disk_shuffles_has_a_store_per_side():
    right = dd.from_pandas(pd.DataFrame({"k": range(10), "w": range(10)}), npartitions=2)
    g = graph_of(_frame().merge(right, on="k", shuffle_method="disk", broadcast=False))
    found = _partd.find(g.nodes, g.dependents)
    assert found is not None and len(found.creators) == 2
    assert found.users == set().union(*(g.dependents[c] for c in found.creators))


@pytest.mark.parametrize("tmpdir_set", [False, True])
def test_bag_disk_groupby_store_is_found_also_nested_in_apply(tmpdir_set, tmp_path):
    with dask.config.set(temporary_directory=str(tmp_path) if tmpdir_set else None):
        b = db.from_sequence(range(20), npartitions=4).groupby(lambda x: x % 3, shuffle="disk")
        g = graph_of(b)
    found = _partd.find(g.nodes, g.dependents)
    assert found is not None
    (creator,) = found.creators
    assert str(creator).startswith("('partd-")
    funcs = {g.nodes[k].func for k in found.users}
    assert funcs == {bag_partition, bag_collect} and len(found.users) == 4 + 4


@pytest.mark.parametrize("method", ["tasks", "p2p"])
def test_other_shuffle_methods_have_no_store(method):
    g = graph_of(_frame().shuffle("k", shuffle_method=method))
    assert _partd.find(g.nodes, g.dependents) is None
    b = db.from_sequence(range(20), npartitions=4).groupby(lambda x: x % 3, shuffle="tasks")
    g = graph_of(b)
    assert _partd.find(g.nodes, g.dependents) is None


def _made_store(g, creator):
    """Run a (kept) creator task in this process, as a worker would."""
    return g.nodes[creator]({})


def test_kept_bag_store_outlives_its_maker_and_drop_removes_it(tmp_path):
    with dask.config.set(temporary_directory=str(tmp_path)):
        b = db.from_sequence(range(20), npartitions=4).groupby(lambda x: x % 3, shuffle="disk")
        g = graph_of(b)
    (creator,) = _partd.find(g.nodes, g.dependents).creators

    # As dask wrote it, the store's directory goes with the object that made it,
    # while other tasks (here: other processes) still use the store.
    store = _made_store(g, creator)
    (path,) = _partd.store_paths(store)
    assert Path(path).parent == tmp_path and Path(path).is_dir()
    del store
    gc.collect()
    assert not Path(path).exists()

    kept = dict(_partd.keep(g.nodes, [creator]))
    store = kept[creator]({})
    (path,) = _partd.store_paths(store)
    assert path not in partd.file.cleanup_files  # our cleanup removes it, not exit
    copy = pickle.loads(pickle.dumps(store))  # what a task on the same node receives
    copy.append({"a": [1, 2]})
    del store
    gc.collect()
    assert Path(path).is_dir() and copy.get("a") == [1, 2]
    assert _partd.drop_stores(pickle.loads(pickle.dumps(copy))) == [path]
    assert list(tmp_path.iterdir()) == []


def test_drop_removes_a_dataframe_store_with_its_data(tmp_path):
    with dask.config.set(temporary_directory=str(tmp_path)):
        g = graph_of(_frame().shuffle("k", shuffle_method="disk"))
    (creator,) = _partd.find(g.nodes, g.dependents).creators
    # Pickled, as every Ray task is: the factory makes an unbuffered store.
    node = pickle.loads(pickle.dumps(_partd.keep(g.nodes, [creator])[creator]))
    store = node({})
    store.append({0: pd.DataFrame({"k": [1]})}, fsync=True)
    (path,) = _partd.store_paths(store)
    assert Path(path).parent == tmp_path and any(Path(path).iterdir())
    assert _partd.drop_stores(store) == [path]
    assert list(tmp_path.iterdir()) == []


def _node(node_id, cpus, alive=True, **extra):
    return _partd.NodeInfo(node_id, alive, {"CPU": cpus, **extra})


def test_the_driver_node_is_chosen_when_it_can_run_the_tasks():
    nodes = [_node("a", 8), _node("drv", 1)]
    assert _partd.choose_node(nodes, driver="drv", need={"CPU": 1}) == "drv"


def test_a_head_without_cpus_is_skipped_for_the_alive_node_with_most_cpus():
    nodes = [_node("head", 0), _node("b", 2), _node("c", 4), _node("d", 16, alive=False)]
    assert _partd.choose_node(nodes, driver="head", need={"CPU": 1}) == "c"
    gpus = [*nodes, _node("g", 1, GPU=1.0)]
    assert _partd.choose_node(gpus, driver="head", need={"CPU": 1, "GPU": 1}) == "g"


def test_no_node_that_can_run_the_tasks_is_refused_before_anything_runs():
    with pytest.raises(UnsupportedGraphError, match=r"\{'GPU': 1\.0\}.*shuffle_method='p2p'"):
        _partd.choose_node([_node("a", 4)], driver="a", need={"GPU": 1.0})


def test_need_is_the_most_any_pinned_task_asks_for():
    opts = [{}, {"num_cpus": 0.5, "resources": {"disk": 2}}, {"num_gpus": 1, "memory": 10}]
    assert _partd.need(opts) == {"CPU": 1.0, "disk": 2.0, "GPU": 1.0, "memory": 10.0}
    assert _partd.need([{"num_cpus": 0}]) == {}  # runs on any alive node


def test_pin_sets_the_node_and_no_retries_unless_asked():
    per_key = {"a": {"num_cpus": 2, "scheduling_strategy": "SPREAD"}, "c": {"max_retries": 1}}
    out = _partd.pin(per_key, ["a", "b", "c"], strategy="NODE")
    assert out["a"] == {"num_cpus": 2, "scheduling_strategy": "NODE", "max_retries": 0}
    assert out["b"] == {"scheduling_strategy": "NODE", "max_retries": 0}
    assert out["c"] == {"scheduling_strategy": "NODE", "max_retries": 1}
    assert per_key["a"]["scheduling_strategy"] == "SPREAD"  # not modified
