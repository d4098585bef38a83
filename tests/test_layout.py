"""What each process loads: the receiver (`serve`'s main process) and the small
commands stay light. DuckDB, polars, pyarrow, River and SciPy belong to the lake
writer, replay, backtest and the rule checker, each a process of its own."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import duckdb

from engine.core.events import CallEvent, CallState
from engine.ingest.codec import Vos3000TextCodec
from engine.ingest.journal import DATAGRAMS, datagram_payload
from engine.ingest.keyfile import key_file_path
from engine.ingest.store import EventStore
from engine.lake.writer import LakeWriter

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("duckdb", "polars", "pyarrow", "river", "scipy")
T0 = 1795860000.0

# Builds and starts the receiver's Engine (rules checked, store recovered, lake writer
# started, socket bound, metrics and health served), stops it, and prints what the
# process loaded and recovered.
RECEIVER = """
import asyncio, json, sys
from engine.apps.serve import Engine
from engine.apps.settings import load_settings

settings = load_settings(None, {
    "receiver": {"listen": ["127.0.0.1:0"]},
    "store": {"data_dir": sys.argv[1]},
    "detection": {"rules_dir": sys.argv[2]},
    "metrics": {"listen": "127.0.0.1:0"},  # /metrics, /healthz, /readyz served too
}, environ={})

async def main():
    engine = Engine(settings)
    await engine.start()
    seen = [list(key) for key in [("call-1", 1), ("call-9", 1)] if key in engine.intake.seen]
    next_seq = engine.intake.next_seq
    await engine.stop()
    return {"modules": sorted(sys.modules), "next_seq": next_seq, "seen": seen}

print(json.dumps(asyncio.run(main())))
"""


def heavy_in(modules: list[str]) -> list[str]:
    return [name for name in modules if name.split(".")[0] in HEAVY]


def run_receiver(data_dir: Path) -> dict[str, object]:
    result = subprocess.run(
        [sys.executable, "-c", RECEIVER, str(data_dir), str(ROOT / "rules")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    answer: dict[str, object] = json.loads(result.stdout.splitlines()[-1])
    return answer


def reports_in_the_lake(data_dir: Path, count: int) -> None:
    codec = Vos3000TextCodec()
    store = EventStore(data_dir, codec)
    store.open()
    for n in range(count):
        event = CallEvent(T0 + n, f"call-{n}", 1, CallState.RINGING, 180, "1", "2", "", "7", "m")
        store.commit(DATAGRAMS, n + 1, datagram_payload([(event.ts, "", codec.encode(event))]))
        store.seal()
    store.close()
    LakeWriter(data_dir).drain()


def test_the_receiver_process_loads_no_lake_or_model_library(tmp_path: Path) -> None:
    answer = run_receiver(tmp_path / "data")
    modules = answer["modules"]
    assert isinstance(modules, list) and "engine.ingest.receiver" in modules
    assert heavy_in(modules) == []
    assert key_file_path(tmp_path / "data").exists(), "the lake writer ran and wrote it"


def test_a_receiver_whose_key_file_is_gone_has_the_lake_writer_rebuild_it_and_stays_light(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    reports_in_the_lake(data_dir, 3)
    key_file_path(data_dir).unlink()
    answer = run_receiver(data_dir)
    modules = answer["modules"]
    assert isinstance(modules, list) and heavy_in(modules) == []
    assert answer["next_seq"] == 4, "numbering carries on after the lake's last report"
    assert answer["seen"] == [["call-1", 1]], "a report in the lake only is a duplicate"
    assert key_file_path(data_dir).exists()


# What `callsentry --help` has no use for: the settings (pydantic), the rules (YAML),
# the packages' metadata (importlib.metadata: `version` alone reads it), detection.
NOT_FOR_HELP = ("pydantic", "yaml", "importlib.metadata", "engine.apps.settings", "engine.detect")

HELP = """
import json, sys
from engine.apps.cli import main
try:
    main(["--help"])
except SystemExit as end:
    code = end.code
print(json.dumps({"code": code, "modules": sorted(sys.modules)}))
"""


def test_help_and_the_command_line_load_no_lake_or_model_library() -> None:
    script = "import json, sys, engine.apps.cli; print(json.dumps(sorted(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert heavy_in(json.loads(result.stdout)) == []
    helped = subprocess.run(
        [sys.executable, "-c", HELP], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert helped.returncode == 0, helped.stderr
    assert "serve" in helped.stdout and "replay" in helped.stdout
    answer = json.loads(helped.stdout.splitlines()[-1])
    assert answer["code"] == 0
    modules = answer["modules"]
    assert "click" in modules and "engine.apps.cli" in modules
    assert heavy_in(modules) == []
    loaded = [m for m in modules if any(m == n or m.startswith(n + ".") for n in NOT_FOR_HELP)]
    assert loaded == []


def test_the_forward_model_loads_page_hinkley_without_rivers_drift_package() -> None:
    # river.drift's package imports KSWIN and with it scipy.stats: about a second of
    # the start-up of a replay with a forwarded call (the caller model's anomaly
    # package loads it later, and only once a caller has enough calls to be scored).
    script = """
import json, sys
from models.forward import page_hinkley
detector = page_hinkley()(min_instances=3, delta=0.1, threshold=5.0, alpha=1.0, mode="up")
drifted = False
for x in [1.0] * 10 + [20.0]:
    detector.update(x)
    drifted = drifted or detector.drift_detected
import river.drift
print(json.dumps([sorted(sys.modules), drifted,
                  river.drift.PageHinkley is type(detector)]))
"""
    before = subprocess.run(
        [sys.executable, "-c", script.replace("import river.drift\n", "").replace(
            "river.drift.PageHinkley is type(detector)", "None")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert before.returncode == 0, before.stderr
    modules, drifted, _ = json.loads(before.stdout)
    assert drifted and "river.drift.page_hinkley" in modules
    assert "river.drift" not in modules and "scipy.stats" not in modules
    # Whoever imports river.drift later gets the same class.
    after = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert after.returncode == 0, after.stderr
    assert json.loads(after.stdout)[2] is True


def test_the_anomaly_model_loads_half_space_trees_without_scipys_statistics() -> None:
    # River's anomaly, tree and preprocessing packages import scipy.stats: most of a
    # second of CPU in a detection process whose models fill their first window. The
    # model made, then scored and pickled, is River's own classes either way.
    script = """
import json, pickle, sys
from models.scoring import AnomalyModel
from models.spec import HalfSpaceTreesSpec
model = AnomalyModel(HalfSpaceTreesSpec(n_trees=3, height=3, window_size=10, seed=5))
for n in range(30):
    model.learn_one({"a": n % 5 / 5.0, "b": float(n)})
score = model.score_one({"a": 0.9, "b": 30.0})
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("scipy", "river"))
if "whole" in sys.argv:
    from river import anomaly, preprocessing
    same = [type(model.river.steps["HalfSpaceTrees"]) is anomaly.HalfSpaceTrees,
            type(model.river.steps["MinMaxScaler"]) is preprocessing.MinMaxScaler]
else:
    same = []
again = pickle.loads(pickle.dumps(model.river)).score_one({"a": 0.9, "b": 30.0})
print(json.dumps([loaded, score, again, same]))
"""
    alone = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert alone.returncode == 0, alone.stderr
    loaded, score, again, _ = json.loads(alone.stdout)
    assert "river.anomaly.hst" in loaded and "river.preprocessing.scale" in loaded
    assert "scipy.stats" not in loaded
    assert [m for m in ("river.anomaly", "river.tree", "river.preprocessing") if m in loaded] == []
    assert score > 0 and again == score
    # Whoever imports the packages later gets the same classes, and the same scores.
    whole = subprocess.run(
        [sys.executable, "-c", script, "whole"], capture_output=True, text=True, timeout=120,
        cwd=ROOT,
    )  # fmt: skip
    assert whole.returncode == 0, whole.stderr
    _, score_whole, _, same = json.loads(whole.stdout)
    assert score_whole == score and same == [True, True]


# A small replay through the command line (models on, the shipped rules), then what its
# processes loaded: this one, and the one forked for detection (written at its end).
SMALL_REPLAY = """
import json, sys
from multiprocessing import util
from engine.apps.cli import main

def write():
    with open(sys.argv[3], "w") as out:
        json.dump(sorted(sys.modules), out)

class Recorder:
    pass

# Run in a multiprocessing child once forked (its finalizers of the parent forgotten).
RECORDER = Recorder()
util.register_after_fork(RECORDER, lambda _: util.Finalize(None, write, exitpriority=100))
try:
    main(["replay", sys.argv[1], "--data-dir", sys.argv[2]])
except SystemExit as end:
    code = end.code
print(json.dumps({"code": code, "modules": sorted(sys.modules)}))
"""
# What River's `river.stats` package and river.utils would bring, and what only a large
# replay or another command needs: DuckDB (a new data dir holds nothing to look up, and
# the analysts' views file is written by a process of its own).
NOT_IN_A_SMALL_REPLAY = ("numpy", "scipy", "narwhals", "pandas", "pyarrow", "sklearn", "duckdb")
# Loaded by the detection process alone: the process that reads the files and writes the
# lake does not wait for them.
DETECTIONS_OWN = ("engine.detect.evaluate", "engine.detect.schema", "phonenumbers", "river")


def sample_rows(tmp_path: Path, rows: int) -> Path:
    lines = (ROOT / "data" / "samples" / "events.csv").read_text().splitlines(keepends=True)
    path = tmp_path / "small.csv"
    path.write_text("".join(lines[: rows + 1]))
    return path


def test_a_small_replay_loads_neither_numpy_nor_scipy_nor_narwhals(tmp_path: Path) -> None:
    import polars as pl

    csv = sample_rows(tmp_path, 100)
    # Rows with a forward number: the forward model makes its River detector (PageHinkley,
    # with a river.stats Mean) as well as the caller model's statistics.
    assert pl.read_csv(csv, infer_schema_length=0)["forward"].fill_null("").str.len_chars().max()
    parquet = tmp_path / "small.parquet"
    pl.read_csv(csv, infer_schema_length=0).write_parquet(parquet)
    for n, events in enumerate((csv, parquet)):
        detection_modules = tmp_path / f"detection{n}.json"
        result = subprocess.run(
            [
                sys.executable,
                "-c",
                SMALL_REPLAY,
                str(events),
                str(tmp_path / f"data{n}"),
                str(detection_modules),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
        )
        assert result.returncode == 0, result.stderr
        assert "replayed 100 rows: 100 events stored" in result.stdout
        answer = json.loads(result.stdout.splitlines()[-1])
        assert answer["code"] == 0
        modules = answer["modules"]
        detecting = json.loads(detection_modules.read_text())
        for made in ("river.stats.ewmean", "river.stats.quantile", "river.drift.page_hinkley"):
            assert made in detecting, f"the models did not run as expected: no {made}"
        assert "river.stats.mean" in detecting, "no forward number: PageHinkley not made"
        assert "polars" in modules and "engine.lake.writer" in modules
        assert [m for m in modules if m.split(".")[0] in NOT_IN_A_SMALL_REPLAY] == []
        assert [m for m in detecting if m.split(".")[0] in NOT_IN_A_SMALL_REPLAY] == []
        assert [m for m in DETECTIONS_OWN if m in modules] == []
        # Forked before this process loaded polars: the detection process never did.
        assert "polars" not in detecting
        # The views file is in place when replay is done, and shows what it stored.
        views = tmp_path / f"data{n}" / "callsentry.duckdb"
        with duckdb.connect(str(views), read_only=True) as con:
            assert con.execute("SELECT count(*) FROM events").fetchone() == (100,)


def test_rivers_statistics_package_is_whole_on_first_use_of_anything_else() -> None:
    # models.running_stats loads River's statistics without the package's __init__ (and
    # numpy): what the rest of River asks of river.stats afterwards must still be there.
    script = """
import json, pickle, sys
from models.running_stats import stats
before = sorted(m for m in sys.modules if m.split(".")[0] in ("numpy", "scipy", "narwhals"))
mean = stats.Mean()
for x in (1.0, 2.0, 6.0):
    mean.update(x)
ewmean = pickle.loads(pickle.dumps(stats.EWMean(0.5)))
quantile = stats.Quantile(0.5)
import river.stats
variance = river.stats.Var()          # a name the models did not load: the whole package
from river import anomaly, preprocessing
mean.update_many([3.0, 3.0])          # the one method of Mean that needs numpy
print(json.dumps([before, mean.get(), type(ewmean).__module__, type(quantile).__qualname__,
                  type(variance).__module__, river.stats.Mean is type(mean),
                  hasattr(anomaly, "HalfSpaceTrees"), "numpy" in sys.modules]))
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    before, mean, ewmean, quantile, variance, same, trees, numpy = json.loads(result.stdout)
    assert before == []
    assert mean == 3.0
    assert ewmean == "river.stats.ewmean" and quantile == "Quantile"
    assert variance == "river.stats.var" and same and trees and numpy
