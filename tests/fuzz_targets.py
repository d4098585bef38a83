"""Fuzz targets: every input that reaches callsentry from outside, with what it may do.

Each target takes one input drawn by hypothesis and checks the contract of its
reader: the input becomes a result (an event, a reject with its reason, a rule set,
settings), or the reader's documented error type, whose message names where (a
`file:line`, a key, a file). Any other exception escapes the target: that is a bug,
and so is a documented error without a location. `tests/test_fuzz.py` runs each for
a short budget in `make test`; `bench/fuzz.py` runs them for the soak's budget.

A later input (a web form, an action template) adds its target here.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import yaml
from hypothesis import strategies as st

from engine.alerts.actionrender import alert_values, render_command, render_http
from engine.alerts.actionspec import (
    ALERT_FIELDS,
    ActionSpecError,
    CommandSpec,
    HttpSpec,
    load_actions,
)
from engine.apps.settings import ConfigError, load_settings
from engine.core.events import CallEvent, Reject
from engine.core.yamlfile import YamlFileError
from engine.detect.numbers import REGIONS, Destinations, NumberPlan
from engine.detect.rules import load_rules
from engine.detect.ruletest import run_rule_tests
from engine.ingest.codec import Vos3000TextCodec
from engine.ingest.eventfiles import EventFileError, file_parts, read_event_file
from engine.relay.state import RelayStateError, load_state
from engine.relay.subjects import decode_token, encode_token, is_token, report_id
from engine.relay.udp import key_of
from engine.simulator.scenario import load_scenario

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "rules"


class Escape(AssertionError):
    """An input made a reader fail outside its contract."""


@dataclass(frozen=True)
class Target:
    name: str
    strategy: st.SearchStrategy[Any]
    run: Callable[[Any], None]


# -- datagrams -----------------------------------------------------------------------

CODECS = (
    Vos3000TextCodec(),
    Vos3000TextCodec(separator="|", encodings=("gbk",)),
    Vos3000TextCodec(separator="\t", encodings=("utf-8", "gbk")),
)

_report_parts = st.lists(
    st.one_of(
        st.sampled_from(["180", "183", "ok", "OK", "200", "bye", "Ringing", "", " ", "7"]),
        st.text(max_size=20),
        st.from_regex(r"[0-9a-f@.]{1,40}", fullmatch=True),
        st.integers(-5, 10**20).map(str),
    ),
    max_size=12,
)
datagrams = st.one_of(
    st.binary(max_size=2200),
    st.tuples(_report_parts, st.sampled_from([",", "|", "\t", ";"])).map(
        lambda parts: parts[1].join(parts[0]).encode("utf-8", "surrogatepass")
    ),
)


def decode_datagram(data: bytes) -> None:
    for codec in CODECS:
        try:
            decoded = codec.decode(data, 1_790_000_000.0, "10.0.0.5:5060")
        except Exception as error:
            raise Escape(f"decode raised {error!r} on {data!r}") from error
        item = decoded.item
        if not isinstance(item, CallEvent | Reject):
            raise Escape(f"decode gave {item!r}")
        if isinstance(item, Reject) and not item.detail:
            raise Escape(f"a reject without a reason's detail for {data!r}")


def read_key(data: bytes) -> None:
    try:
        from engine.ingest import _fastio as fastio
    except ImportError:
        fastio = None
    for codec in CODECS:
        try:
            key = codec.read_key(data)
        except Exception as error:
            raise Escape(f"read_key raised {error!r} on {data!r}") from error
        if key is not None:
            (call_id, serial), answer = key
            if not call_id or serial < 0 or not isinstance(answer, bytes):
                raise Escape(f"read_key gave {key!r} for {data!r}")
    if fastio is not None:
        from engine.core.events import MAX_CALL_ID_BYTES, MAX_SERIAL_DIGITS

        fast = fastio.read_usual_key(data, ord(","), MAX_CALL_ID_BYTES, MAX_SERIAL_DIGITS)
        if fast is not None and fast != CODECS[0].read_key(data):
            raise Escape(f"the compiled key reader disagrees on {data!r}: {fast!r}")


# -- event files ---------------------------------------------------------------------

HEADER = "ts,call_id,serial,state,caller,callee,forward,menu_id,menu_name\n"
_cells = st.one_of(
    st.sampled_from(
        ["2026-11-28T10:00:00+00:00", "1790000000", "c1", "1", "180", "OK", "bye", '"', '""']
    ),
    st.text(max_size=12),
)
_csv_lines = st.lists(
    st.lists(_cells, max_size=11).map(lambda cells: ",".join(cells)), max_size=30
).map(lambda lines: "\n".join(lines))
csv_files = st.one_of(
    st.binary(max_size=3000),
    _csv_lines.map(lambda body: (HEADER + body).encode("utf-8", "surrogatepass")),
    st.tuples(_csv_lines, st.binary(max_size=40)).map(
        lambda parts: HEADER.encode() + parts[0].encode("utf-8", "surrogatepass") + parts[1]
    ),
)
_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=8,
)
_json_rows = st.dictionaries(
    st.sampled_from(["ts", "call_id", "serial", "state", "caller", "menu_name", "x"]),
    _json_values,
)
jsonl_files = st.one_of(
    st.binary(max_size=3000),
    st.lists(_json_rows.map(json.dumps), max_size=30).map(lambda rows: "\n".join(rows).encode()),
)


def _read_file(suffix: str, data: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"events{suffix}"
        path.write_bytes(data)
        try:
            items = read_event_file(path)
        except EventFileError as error:
            if not str(error).startswith(str(path)):
                raise Escape(f"an event file error without its file: {error}") from error
            return
        except Exception as error:
            raise Escape(f"reading {suffix} raised {error!r} on {data[:200]!r}") from error
        for item in items:
            if isinstance(item, Reject) and not re.fullmatch(r"events\.\w+:\d+", item.source):
                raise Escape(f"a reject without its line: {item.source!r}")
        # Read in parts (a long replay's way), the file is what it is read whole. Three or
        # four parts an input, their edges wherever its bytes put them: each part is a
        # read of its own, and a part per 97 bytes made a CSV input cost 0.1 s of CPU.
        part_bytes = max(97, len(data) // 3 + 1)
        part_rows = max(7, data.count(b"\n") // 3 + 1)
        try:
            read = file_parts(path, part_rows, part_bytes, first_small=True)
            parts = [item for part in read for item in part]
        except Exception as error:
            raise Escape(f"reading {suffix} in parts raised {error!r} on {data[:200]!r}") from error
        if parts != items:
            raise Escape(f"{suffix} read in parts is not the file read whole: {data[:200]!r}")


def read_csv(data: bytes) -> None:
    _read_file(".csv", data)


def read_jsonl(data: bytes) -> None:
    _read_file(".jsonl", data)


def _parquet_bytes(rows: list[dict[str, Any]]) -> bytes:
    import io

    import polars as pl

    buffer = io.BytesIO()
    try:
        pl.DataFrame(rows).write_parquet(buffer)
    except Exception:  # a frame polars cannot make is no input to us
        return b""
    return buffer.getvalue()


parquet_files = st.one_of(
    st.binary(max_size=2000),
    st.lists(
        st.fixed_dictionaries(
            {
                "ts": st.one_of(st.integers(), st.floats(), st.text(max_size=26)),
                "call_id": st.text(max_size=10),
                "serial": st.one_of(st.integers(-3, 10**6), st.text(max_size=4)),
                "state": st.sampled_from(["180", "OK", "bye", "?", ""]),
                "caller": st.one_of(st.text(max_size=10), st.binary(max_size=5)),
                "callee": st.text(max_size=10),
                "forward": st.text(max_size=4),
                "menu_id": st.text(max_size=4),
                "menu_name": st.text(max_size=10),
            }
        ),
        min_size=1,
        max_size=10,
    ).map(_parquet_bytes),
)


def read_parquet(data: bytes) -> None:
    _read_file(".parquet", data)


# -- YAML: rules, lists, scenarios ------------------------------------------------------

_yaml_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**12), 10**12),
    st.floats(),
    st.text(max_size=15),
    st.sampled_from(["3m", "1h30m", ".nan", "-1", "{entity}", "*a", "&a x", "0x10"]),
)
_yaml_values = st.recursive(
    _yaml_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
_SHIPPED_RULES = sorted(RULES.glob("*.yaml"))
# A rule with every input levels and local time bring (a warning bar, hours across
# midnight, weekdays), mutated as the shipped ones are.
_LEVELS_RULE: dict[str, Any] = {
    "id": "night-burst",
    "title": "Night burst",
    "severity": "high",
    "selection": {"hour": {"between": [22, 6]}, "weekday": {"in": ["sat", "sun"]}},
    "aggregate": {"type": "count", "group_by": "caller", "window": 600},
    "condition": {"op": ">=", "threshold": 10, "warning": 5},
    "tests": [
        {"name": "t", "calls": [{"repeat": 6}], "expect": [{"entity": "1", "level": "warning"}]}
    ],
}


def _mutated(document: Any, draw: st.DrawFn) -> Any:
    """A parsed document with a few keys changed, dropped or added."""
    if not isinstance(document, dict) or not document:
        return document
    out = dict(document)
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from([*sorted(out, key=str), "unknown"]))
        action = draw(st.sampled_from(["replace", "drop", "recurse"]))
        if action == "drop":
            out.pop(key, None)
        elif action == "recurse" and isinstance(out.get(key), dict):
            out[key] = _mutated(out[key], draw)
        else:
            out[key] = draw(_yaml_values)
    return out


@st.composite
def rule_files(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["mutated", "text", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=1500))
    if kind == "text":
        return draw(st.text(max_size=600)).encode("utf-8", "surrogatepass")
    source = draw(st.sampled_from([*_SHIPPED_RULES, None]))
    if source is None:
        document = _LEVELS_RULE
        if draw(st.booleans()):  # the new keys themselves, changed or dropped
            document = {**document, "condition": _mutated(document["condition"], draw)}
            document["selection"] = {
                name: _mutated(matcher, draw) for name, matcher in _LEVELS_RULE["selection"].items()
            }
    else:
        document = yaml.safe_load(source.read_text(encoding="utf-8"))
    return yaml.safe_dump(_mutated(document, draw), allow_unicode=True).encode()


def _located(error: YamlFileError, path: Path) -> None:
    for problem in error.problems:
        if not problem.startswith(str(path.parent)):
            raise Escape(f"a problem without its file: {problem!r}")


def load_rule_file(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        rules = Path(folder) / "rules"
        (rules / "lists").mkdir(parents=True)
        for shipped in (RULES / "lists").glob("*.yaml"):
            (rules / "lists" / shipped.name).write_bytes(shipped.read_bytes())
        path = rules / "fuzzed.yaml"
        path.write_bytes(data)
        try:
            load_rules(rules)
        except YamlFileError as error:
            _located(error, path)
        except Exception as error:
            raise Escape(f"loading a rule raised {error!r} on {data[:300]!r}") from error


_BEHAVING_RULES = [path for path in _SHIPPED_RULES if "\nbehaviour:" in path.read_text("utf-8")]
_MEASURE_KEYS = [
    "min_calls",
    "answered_share",
    "short_share",
    "ring_s",
    "talk_s",
    "rate",
    "calls",
    "seen_s",
    "unknown",
]
_BOUND_KEYS = ["lt", "gt", "below_peers", "above_peers", "below_usual", "above_usual", "le"]
_numbers = st.floats(allow_nan=True, allow_infinity=True) | st.integers(-(10**12), 10**12)


@st.composite
def behaviour_rule_files(draw: st.DrawFn) -> bytes:
    """A shipped rule with `behaviour:` whose measures and bounds are drawn."""
    source = draw(st.sampled_from(_BEHAVING_RULES))
    document = yaml.safe_load(source.read_text(encoding="utf-8"))
    bound = st.dictionaries(st.sampled_from(_BOUND_KEYS), _numbers | _yaml_values, max_size=3)
    document["behaviour"] = draw(
        st.dictionaries(st.sampled_from(_MEASURE_KEYS), bound | _numbers | _yaml_values, max_size=4)
        | _yaml_values
    )
    if draw(st.booleans()):
        document["aggregate"]["group_by"] = draw(st.sampled_from(["caller", "menu", ["caller"]]))
    return yaml.safe_dump(document, allow_unicode=True).encode()


_SHARE_RULE = RULES / "short-calls-menu.yaml"
_SHARE_KEYS = [
    "window",
    "min_excess",
    "usual_over",
    "peer_weight",
    "numerator",
    "numerator_behaviour",
    "unknown",
]


@st.composite
def share_rule_files(draw: st.DrawFn) -> bytes:
    """The shipped `unusual_share` rule with its aggregate's keys drawn (a drawn
    `numerator_behaviour` as a behaviour's measures and bounds), and a short inline
    test (a few hundred calls and a burst) so that one that loads also runs."""
    document = yaml.safe_load(_SHARE_RULE.read_text(encoding="utf-8"))
    aggregate = dict(document["aggregate"])
    for key in draw(st.lists(st.sampled_from(_SHARE_KEYS), min_size=1, max_size=3)):
        if draw(st.booleans()):
            aggregate.pop(key, None)
        else:
            bound = st.dictionaries(
                st.sampled_from(_BOUND_KEYS), _numbers | _yaml_values, max_size=3
            )
            behaviour = st.dictionaries(
                st.sampled_from(_MEASURE_KEYS), bound | _numbers | _yaml_values, max_size=3
            )
            aggregate[key] = draw(
                _numbers
                | _yaml_values
                | st.sampled_from(["0s", "1s", "90d", "3m"])
                | (behaviour if key == "numerator_behaviour" else st.nothing())
            )
    document["aggregate"] = aggregate
    document["condition"] = draw(
        st.sampled_from([document["condition"], {"op": ">=", "threshold": 0}])
    )
    document["tests"] = [
        {
            "name": "a menu and a burst",
            "calls": [
                {"menu_id": "3", "repeat": 300, "every": "1s", "talk": "60s"},
                {"menu_id": "3", "repeat": 20, "every": "2s", "talk": "2s", "at": "250s"},
            ],
        }
    ]
    return yaml.safe_dump(document, allow_unicode=True).encode()


_CONCURRENT_RULE = RULES / "simultaneous-calls-new-caller.yaml"
_CONCURRENT_KEYS = ["window", "field", "min_share", "unknown"]


@st.composite
def concurrent_rule_files(draw: st.DrawFn) -> bytes:
    """The shipped `concurrent` rule with `min_share` beside its field, its aggregate's
    keys drawn, and its inline tests (which open many calls at once) run."""
    document = yaml.safe_load(_CONCURRENT_RULE.read_text(encoding="utf-8"))
    document["aggregate"] = _drawn_keys(
        draw,
        document["aggregate"],
        _CONCURRENT_KEYS,
        st.sampled_from(["menu_id", "callee", "talk_s", "0s", "3m", 0.5, 1, 0]),
        3,
    )
    return yaml.safe_dump(document, allow_unicode=True).encode()


def _drawn_keys(
    draw: st.DrawFn,
    aggregate: dict[str, Any],
    keys: list[str],
    values: st.SearchStrategy[Any],
    most: int,
) -> dict[str, Any]:
    """`aggregate` with up to `most` of `keys` each left out or given a drawn value
    (a number, a YAML value of any type, or one of `values`)."""
    aggregate = dict(aggregate)
    for key in draw(st.lists(st.sampled_from(keys), min_size=1, max_size=most)):
        if draw(st.booleans()):
            aggregate.pop(key, None)
        else:
            aggregate[key] = draw(_numbers | _yaml_values | values)
    return aggregate


_PACED_RULE = RULES / "paced-short-calls-menu.yaml"
_PACED_KEYS = ["window", "min_spacing", "max_spacing", "tolerance", "chance", "unknown"]


@st.composite
def paced_rule_files(draw: st.DrawFn) -> bytes:
    """The shipped `paced` rule with its aggregate's keys drawn (durations tiny, huge,
    out of order), and its inline tests run (paced bursts among other calls)."""
    document = yaml.safe_load(_PACED_RULE.read_text(encoding="utf-8"))
    document["aggregate"] = _drawn_keys(
        draw,
        document["aggregate"],
        _PACED_KEYS,
        st.sampled_from(["0s", "0.001s", "1s", "20s", "90d", "3m", 0.5, 1, 0]),
        4,
    )
    document["condition"] = draw(
        st.sampled_from([document["condition"], {"op": ">=", "threshold": 0}])
    )
    return yaml.safe_dump(document, allow_unicode=True).encode()


def load_and_run_rule_file(data: bytes) -> None:
    """A rule file loads or is refused with its file; one that loads runs its inline
    tests (a bound the schema let through must not fail at evaluation)."""
    with tempfile.TemporaryDirectory() as folder:
        rules = Path(folder) / "rules"
        (rules / "lists").mkdir(parents=True)
        for shipped in (RULES / "lists").glob("*.yaml"):
            (rules / "lists" / shipped.name).write_bytes(shipped.read_bytes())
        path = rules / "fuzzed.yaml"
        path.write_bytes(data)
        try:
            loaded = load_rules(rules)
        except YamlFileError as error:
            _located(error, path)
            return
        except Exception as error:
            raise Escape(f"loading a rule raised {error!r} on {data[:300]!r}") from error
        try:
            run_rule_tests(loaded.rules)
        except Exception as error:
            raise Escape(f"running a rule raised {error!r} on {data[:300]!r}") from error


_COUNTRY_LIST = RULES / "lists" / "high_risk_countries.yaml"


@st.composite
def list_files(draw: st.DrawFn) -> bytes:
    document: dict[str, Any] = {"name": draw(st.sampled_from(["extra", "Bad Name", ""]))}
    if draw(st.booleans()):
        document["values"] = []
    else:
        # A country list like the shipped one: entries with sources, some codes wrong.
        document |= {
            "kind": draw(st.sampled_from(["country", "text", "planet"])),
            "entries": draw(
                st.lists(
                    st.fixed_dictionaries(
                        {
                            "value": st.sampled_from(["CU", "cu", "001", "ZZ", "", "GB"])
                            | st.text(max_size=4),
                            "source": st.text(max_size=10),
                        }
                    ),
                    max_size=4,
                )
            ),
        }
    if draw(st.integers(0, 3)) == 0:
        document = yaml.safe_load(_COUNTRY_LIST.read_text(encoding="utf-8"))
        document["name"] = "extra"
    return yaml.safe_dump(_mutated(document, draw), allow_unicode=True).encode()


def _scratch(name: str) -> Path:
    """A folder of this process kept for its inputs: each input overwrites its one file
    there, so an execution costs reading that file, not making and deleting a tree."""
    folder = Path(tempfile.gettempdir()) / f"callsentry-fuzz-{os.getpid()}-{name}"
    if not folder.exists():
        folder.mkdir(parents=True)
        atexit.register(shutil.rmtree, folder, True)
    return folder


def load_list_file(data: bytes) -> None:
    """A list file beside a shipped one is read with every problem at its file:line."""
    from engine.detect.rules import load_lists

    lists = _scratch("lists")
    shipped = lists / "known_trunks.yaml"
    if not shipped.exists():
        shipped.write_bytes((RULES / "lists" / "known_trunks.yaml").read_bytes())
    path = lists / "fuzzed.yaml"
    path.write_bytes(data)
    problems: list[str] = []
    try:
        load_lists(lists, problems)
    except Exception as error:
        raise Escape(f"loading a list raised {error!r} on {data[:300]!r}") from error
    _located(YamlFileError(problems), path)


_SHIPPED_MODELS = sorted((RULES / "models").glob("*.yaml"))


@st.composite
def model_files(draw: st.DrawFn) -> bytes:
    if draw(st.booleans()):
        return draw(st.binary(max_size=800))
    source = draw(st.sampled_from(_SHIPPED_MODELS))
    document = yaml.safe_load(source.read_text(encoding="utf-8"))
    if draw(st.booleans()) and isinstance(document.get("ramp"), dict):
        document["ramp"] = _mutated(document["ramp"], draw)  # the forward model's keys
    return yaml.safe_dump(_mutated(document, draw), allow_unicode=True).encode()


def load_model_file(data: bytes) -> None:
    """A model file is read with every problem at file:line, and a forward model it
    makes takes calls and a day of event time without raising."""
    from engine.detect.calls import Call
    from models.catalogue import load_model_specs
    from models.registry import build_models

    with tempfile.TemporaryDirectory() as folder:
        models = Path(folder) / "models"
        models.mkdir()
        path = models / "fuzzed.yaml"
        path.write_bytes(data)
        problems: list[str] = []
        try:
            documents = load_model_specs(models, problems)
            for problem in problems:
                if not problem.startswith(str(path)):
                    raise Escape(f"a problem without its file: {problem!r}")
            forward = [(spec, doc) for spec, doc in documents if spec.kind == "forward"]
            built = build_models(forward, 1000)
            t0 = 1_793_955_600.0
            for n in range(40):
                at = t0 + n * 97.0
                call = Call(
                    f"c{n}",
                    "8613800000001",
                    "4008001000",
                    f"+3716700000{n % 3}",
                    str(n % 2),
                    "menu",
                    at,
                    answered_at=at + 2,
                    ended_at=at + 60,
                    outcome="answered",
                    deadline=at + 66,
                )
                built.observe((call,), lambda kind, entity: [])
                built.advance(at + 66)
            built.advance(t0 + 86400.0)  # a day later: a gap of many steps
            built.drop_idle(t0 + 86400.0)
        except Escape:
            raise
        except Exception as error:
            raise Escape(f"loading a model raised {error!r} on {data[:300]!r}") from error


_SCENARIOS = sorted((ROOT / "data" / "scenarios").glob("*.yaml"))
TARIFFS = RULES / "tariffs" / "tariffs.yaml"
_PREFIXES = st.sampled_from(["44", "+44", "0044", "4a", "", "1234567890123456", "881"])
_RATES = st.sampled_from([0, 0.5, -1, float("nan"), float("inf"), True, "1.0", None, 10**400])


@st.composite
def tariff_files(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["mutated", "entries", "text", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=600))
    if kind == "text":
        return draw(st.text(max_size=400)).encode("utf-8", "surrogatepass")
    document = yaml.safe_load(TARIFFS.read_text(encoding="utf-8"))
    if kind == "entries":
        entry = st.fixed_dictionaries(
            {"prefix": _PREFIXES | st.integers() | st.text(max_size=6), "rate": _RATES},
            optional={"name": st.text(max_size=8) | st.integers(), "x": st.text(max_size=3)},
        )
        document["rates"] = draw(st.lists(entry | _yaml_values, max_size=5))
    return yaml.safe_dump(_mutated(document, draw), allow_unicode=True).encode()


def load_tariff_file(data: bytes) -> None:
    """A tariff list is loaded with every rate finite and >= 0 and every prefix digits,
    or refused with its problems at file:line."""
    from engine.console.tariffs import load_tariffs

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "tariffs.yaml"
        path.write_bytes(data)
        try:
            tariffs = load_tariffs(path)
        except YamlFileError as error:
            _located(error, path)
            return
        except Exception as error:
            raise Escape(f"loading a tariff list raised {error!r} on {data[:300]!r}") from error
        for tariff in tariffs.tariffs:
            if not tariff.prefix.isdigit() or not tariff.rate >= 0 or tariff.rate == math.inf:
                raise Escape(f"a tariff list loaded {tariff!r} from {data[:300]!r}")


_SCENARIOS = [
    *sorted((ROOT / "data" / "scenarios").glob("*.yaml")),
    *sorted((ROOT / "data" / "scenarios" / "variety").glob("*.yaml")),
    # A callback burst's `jitter`, as ranges.
    ROOT / "bench" / "variety-jitter.yaml",
]
_range_ends = st.one_of(
    st.integers(-5, 10**6), st.floats(-10, 1e6), st.sampled_from(["5s", "1h", "-1", "x", ""])
)
_ranges = st.one_of(
    st.builds(lambda a, b: {"between": [a, b]}, _range_ends, _range_ends),
    st.builds(lambda a, b: {"between": sorted([a, b])}, st.integers(0, 500), st.integers(0, 500)),
    st.builds(lambda values: {"one_of": values}, st.lists(_yaml_scalars, max_size=3)),
    st.dictionaries(st.sampled_from(["between", "one_of", "other"]), _yaml_values, max_size=2),
)


def _ranged(document: Any, draw: st.DrawFn) -> Any:
    """A scenario with a few values (of its benign traffic, of an incident, at the top,
    an incident's `repeat`) written as ranges, well or badly formed."""
    if not isinstance(document, dict):
        return document
    out = dict(document)
    for _ in range(draw(st.integers(0, 3))):
        where = draw(st.sampled_from(["top", "benign", "incident"]))
        if where == "top":
            target = out
        elif where == "benign" and isinstance(out.get("benign"), dict):
            target = out["benign"] = dict(out["benign"])
        elif isinstance(out.get("incidents"), list) and out["incidents"]:
            incidents = out["incidents"] = list(out["incidents"])
            index = draw(st.integers(0, len(incidents) - 1))
            if not isinstance(incidents[index], dict):
                continue
            target = incidents[index] = dict(incidents[index])
        else:
            continue
        key = draw(st.sampled_from([*sorted(target, key=str), "repeat"]))
        target[key] = draw(_ranges)
    return out


@st.composite
def scenario_files(draw: st.DrawFn) -> bytes:
    if draw(st.booleans()):
        return draw(st.binary(max_size=800))
    source = draw(st.sampled_from(_SCENARIOS))
    document = yaml.safe_load(source.read_text(encoding="utf-8"))
    document = _ranged(_mutated(document, draw), draw)
    return yaml.safe_dump(document, allow_unicode=True).encode()


def load_scenario_file(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "scenario.yaml"
        path.write_bytes(data)
        for seed in (None, 2):
            try:
                scenario = load_scenario(path, seed)
            except YamlFileError as error:
                _located(error, path)
                return
            except Exception as error:
                raise Escape(f"loading a scenario raised {error!r} on {data[:300]!r}") from error
        if scenario.duration > 6 * 3600:
            return  # valid, but too long to generate inside a fuzz run


# -- numbers: what the destination fields parse (network text), by any plan ---------

_plans = st.builds(
    NumberPlan,
    dial_prefixes=st.lists(st.sampled_from(["17951", "9", "0", "1"]), max_size=2).map(tuple),
    international_prefixes=st.lists(st.sampled_from(["00", "011", "0"]), max_size=2).map(tuple),
    default_region=st.sampled_from(["", "CN", "GB", "US", "DE"]),
)
_numbers = st.one_of(
    st.text(max_size=40),
    st.text("+0123456789 #*-()", max_size=30),
    st.sampled_from(["+", "00", "+001", "+99912", "0044", "+8613800000001", "\x00+1"]),
)


@st.composite
def numbers(draw: st.DrawFn) -> bytes:
    plan = draw(_plans)
    texts = draw(st.lists(_numbers, min_size=1, max_size=5))
    return json.dumps({"plan": dataclasses.asdict(plan), "numbers": texts}).encode()


def parse_numbers(data: bytes) -> None:
    try:
        document = json.loads(data)
        plan = NumberPlan(
            **{k: tuple(v) if isinstance(v, list) else v for k, v in document["plan"].items()}
        )
        texts = [str(text) for text in document["numbers"]]
    except Exception:
        return  # not a case this target makes (the fuzzer's own mutations)
    book = Destinations(plan, cache_size=2)
    for text in texts:
        try:
            found = book.of(text)
        except Exception as error:
            raise Escape(f"reading number {text!r} raised {error!r}") from error
        if found.valid is not None and found.kind == "":
            raise Escape(f"{text!r}: judged, but with no type")
        if found.country and found.country not in REGIONS:
            raise Escape(f"{text!r}: country {found.country!r} is no region")


# -- settings ------------------------------------------------------------------------

_SECTIONS = {
    "receiver": [
        "listen",
        "allow",
        "socket_buffer_bytes",
        "batched_io",
        "switches",
        "check_senders",
    ],
    "codec": ["name", "separator", "encodings"],
    "store": [
        "data_dir",
        "fsync",
        "flush_interval_s",
        "dedup_horizon_s",
        "max_dedup_keys",
        "retention_days",
    ],
    "detection": [
        "enabled",
        "rules_dir",
        "tick_s",
        "max_keys_per_rule",
        "webhook_url",
        "feed_silence_s",
        "feed_hours",
        "feed_timezone",
        "feed_severity",
        "timezone",
        "webhook_token",
        "dial_prefixes",
        "international_prefixes",
        "default_region",
        "number_cache_size",
    ],
    "outbox": ["give_up_after_s", "max_backoff_s", "timeout_s", "keep_days"],
    "metrics": ["listen", "log_interval_s"],
    "relay": ["allow", "horizon_s", "max_held_bytes", "priority", "udp"],
    "relay.nats": [
        "urls",
        "stream",
        "subject_prefix",
        "credentials_env",
        "duplicate_window_s",
        "create_stream",
        "window",
        "ack_timeout_s",
    ],
    # `[[relay.udp]]`: a target, as an array of tables.
    "[relay.udp]": [
        "target",
        "name",
        "retries",
        "retry_interval_s",
        "separator",
        "encoding",
        "window",
    ],
    # `[[notify.channels]]`: a notification channel.
    "[notify.channels]": [
        "name",
        "url",
        "syslog",
        "facility",
        "severities",
        "levels",
        "rules",
        "tags",
        "rate_limit",
        "rate_period_s",
    ],
    "notify": ["channels"],
    "console": ["public_url", "tariffs"],
    "nope": ["x"],
}
_toml_values = st.one_of(
    st.integers(-(10**20), 10**20).map(str),
    st.floats(allow_nan=False).map(repr),
    st.sampled_from(["true", "false", "nan", "inf", "-inf", '""', "[]", "{}", "1979-05-27"]),
    # Near-valid values of the settings with a grammar of their own.
    st.sampled_from(
        [
            '["07:00-23:00"]',
            '["22:00-06:00", "24:00-01:00"]',
            '["7-23"]',
            '"Europe/Berlin"',
            '"../../etc/passwd"',
            '"off"',
            '"127.0.0.1:99999"',
            # Channels: Apprise URLs (a secret from an unset variable), syslog, routes.
            '"json://127.0.0.1:9/hook"',
            '"mailtos://u:${SMTP_PASSWORD}@smtp.example.org?to=a@example.org"',
            '"slack://${}/x"',
            '"nope://x"',
            '"udp://127.0.0.1:514"',
            '"tcp://[::1]:6514"',
            '"local0"',
            '["critical", "high"]',
            '["warning"]',
            '"https://console.example.org/"',
            '"rules/tariffs/tariffs.yaml"',
            '["nats://127.0.0.1:4222"]',
            '["nats://u:p@127.0.0.1:4222", "tls://[::1]:4222"]',
            '["nats://h:0", "http://x", "nats://", "nats://h/x"]',
            '"callsentry.a.b"',
            '"bad.*.>"',
            '"A B"',
            '"CN"',
            '"cn"',
            '"001"',
            '["00", "17951"]',
            '["0a", ""]',
        ]
    ),
    st.text(max_size=20).map(json.dumps),
    st.lists(st.text(max_size=12).map(json.dumps), max_size=3).map(
        lambda items: "[" + ", ".join(items) + "]"
    ),
    # Inline tables, as `switches` takes (a name -> addresses), right and wrong.
    st.dictionaries(
        st.one_of(st.sampled_from(["east", "west", "a.b", "-x"]), st.text(max_size=8)),
        st.one_of(
            st.sampled_from(["127.0.0.1", "127.0.0.0/8", "10.0.0.5", "::1", "x"]),
            st.lists(st.sampled_from(["127.0.0.2", "127.0.0.0/24", "::1/128", ""]), max_size=3),
            st.integers(),
        ),
        max_size=3,
    ).map(
        lambda table: (
            "{" + ", ".join(f"{json.dumps(k)} = {json.dumps(v)}" for k, v in table.items()) + "}"
        )
    ),
)


@st.composite
def settings_files(draw: st.DrawFn) -> bytes:
    if draw(st.integers(0, 5)) == 0:
        return draw(st.binary(max_size=400))
    lines = []
    for section in draw(st.lists(st.sampled_from(sorted(_SECTIONS)), max_size=4, unique=True)):
        lines.append(f"[{section}]")
        for key in draw(st.lists(st.sampled_from(_SECTIONS[section]), max_size=4, unique=True)):
            lines.append(f"{key} = {draw(_toml_values)}")
    return "\n".join(lines).encode("utf-8", "surrogatepass")


def load_settings_file(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "callsentry.toml"
        path.write_bytes(data)
        try:
            load_settings(path, environ={})
        except ConfigError as error:
            if not str(error):
                raise Escape("a settings error without a message") from error
        except Exception as error:
            raise Escape(f"loading settings raised {error!r} on {data[:300]!r}") from error


# -- a notification channel: an Apprise URL or a syslog target, from any text ----------

_SCHEMES = ["json", "mailto", "mailtos", "slack", "tgram", "msteams", "discord", "udp", "tcp", ""]


@st.composite
def notify_channel_files(draw: st.DrawFn) -> bytes:
    """A settings file with one `[[notify.channels]]` whose URL is any text after a
    scheme Apprise knows (or not); `load_settings_file` reads it (as `make soak` does)."""
    kind = draw(st.sampled_from(["url", "syslog"]))
    scheme = draw(st.sampled_from(_SCHEMES))
    rest = draw(st.one_of(st.text(max_size=60), st.sampled_from(["${X}/y", "${}", "h:0", "[::1]"])))
    lines = [
        "[[notify.channels]]",
        f"name = {json.dumps(draw(st.sampled_from(['c', 'a b', ''])))}",
        f"{kind} = {json.dumps(scheme + '://' + rest)}",
    ]
    if draw(st.booleans()):
        lines.append(f"rules = {json.dumps(draw(st.lists(st.text(max_size=8), max_size=2)))}")
    return "\n".join(lines).encode("utf-8", "surrogatepass")


# -- the relay: a target's answers, and its own state file -----------------------------

_answers = st.one_of(
    st.binary(max_size=300),
    st.tuples(
        st.text(max_size=30), st.sampled_from([",", "|", ";", "\t", ""]), st.text(max_size=25)
    ).map(lambda parts: "".join(parts).encode("utf-8", "surrogatepass")),
)


def read_answer(data: bytes) -> None:
    for separator in (b",", b"|", b"\t"):
        key = key_of(data, separator)
        if key is not None and not (isinstance(key[0], bytes) and key[1] >= 0):
            raise Escape(f"an answer read as {key!r} from {data!r}")


_state_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=10)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=10), inner, max_size=3)
    ),
    max_leaves=12,
)


@st.composite
def relay_states(draw: st.DrawFn) -> bytes:
    if draw(st.integers(0, 3)) == 0:
        return draw(st.binary(max_size=300))
    target = draw(
        st.dictionaries(
            st.sampled_from(
                ["address", "cursor", "segment", "offset", "state", "sent", "lag_seconds"]
            ),
            _state_values,
        )
    )
    state = {"version": draw(st.sampled_from([1, 2, "1", None])), "targets": {"t": target}}
    if draw(st.booleans()):
        state["held"] = draw(_state_values)
    return json.dumps(state).encode()


def load_relay_state(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "state.json"
        path.write_bytes(data)
        try:
            load_state(path)
        except RelayStateError as error:
            if str(path) not in str(error):
                raise Escape(f"a relay state error without the file: {error}") from error
        except Exception as error:
            raise Escape(f"loading a relay state raised {error!r} on {data[:300]!r}") from error


# -- the detection snapshot: a data dir's state/detection.snapshot -------------------


@functools.cache
def _snapshot_base() -> tuple[bytes, tuple[CallEvent, ...]]:
    """A real snapshot (the shipped rules and models after the first half of the sample
    scenario: calls in progress, rule windows, model state) and the reports after it."""
    from engine.apps.detectors import load_detectors
    from engine.core.positions import Position
    from engine.detect.calls import CallTracker
    from engine.detect.pipeline import Pipeline
    from engine.detect.snapshot import MAGIC, encode
    from engine.detect.state import Snapshot
    from engine.simulator.scenario import generate

    events = generate(load_scenario(ROOT / "data" / "scenarios" / "sample.yaml")).events
    half = len(events) // 2
    pipeline = Pipeline(load_detectors(RULES, 10_000, models=True).rules, CallTracker())
    pipeline.feed(events[:half])
    snapshot = Snapshot(Position(1, half), pipeline.state(), 0.0)
    payload = encode(snapshot)  # the file: magic line, the payload's SHA-256, payload
    return MAGIC + hashlib.sha256(payload).digest() + payload, tuple(events[half : half + 400])


@st.composite
def snapshot_files(draw: st.DrawFn) -> bytes:
    """The real snapshot with its payload changed and its checksum made to match (what
    only a bug or a hand could write: a damaged file fails the checksum first), or the
    file itself changed."""
    from engine.detect.snapshot import MAGIC_PREFIX

    data, _ = _snapshot_base()
    head_end = data.index(b"\n", len(MAGIC_PREFIX)) + 1
    head, payload = data[:head_end], data[head_end + 32 :]
    edited = bytearray(payload)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(edited)))
        kind = draw(st.sampled_from(["flip", "replace", "insert", "cut"]))
        if kind == "flip" and at < len(edited):
            edited[at] ^= draw(st.integers(1, 255))
        elif kind == "replace":
            edited[at : at + draw(st.integers(1, 8))] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "insert":
            edited[at:at] = draw(st.binary(min_size=1, max_size=8))
        else:
            del edited[at:]
    if draw(st.integers(0, 4)) == 0:
        whole = bytearray(data)
        whole[draw(st.integers(0, len(whole) - 1))] ^= 0xFF
        return bytes(whole)
    return head + hashlib.sha256(bytes(edited)).digest() + bytes(edited)


def restore_snapshot_file(data: bytes) -> None:
    """The snapshot is taken up or set aside as unusable (detection then starts cold);
    either way detection goes on with the reports after it."""
    from engine.apps.detectors import load_detectors
    from engine.detect.calls import CallTracker
    from engine.detect.pipeline import Pipeline
    from engine.detect.snapshot import restore_into

    _, after = _snapshot_base()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "detection.snapshot"
        path.write_bytes(data)
        pipeline = Pipeline(load_detectors(RULES, 10_000, models=True).rules, CallTracker())
        try:
            restored = restore_into(pipeline, path)
        except Exception as error:
            raise Escape(f"restoring a snapshot raised {error!r}") from error
        if restored is None and path.exists():
            raise Escape("an unusable snapshot was neither taken up nor set aside")
        try:
            pipeline.feed(after)
            pipeline.advance(after[-1].ts + 86_400.0)
        except Exception as error:
            raise Escape(
                f"detection after {'a restored' if restored else 'no'} snapshot raised {error!r}"
            ) from error


# -- NATS: subject tokens and message ids from network text ----------------------------


def nats_names(data: bytes) -> None:
    """A menu id, call id or switch name as the datagram brings it becomes one valid
    subject token (and a header-safe message id), decoded back to itself."""
    text = data.decode("utf-8", "replace")
    token = encode_token(text)
    if not is_token(token) or not token.isascii():
        raise Escape(f"{text!r} made the subject token {token!r}")
    if not token.startswith("%%") and decode_token(token) != text:
        raise Escape(f"{text!r} -> {token!r} does not decode back")
    key = report_id(text, text, 1)
    if not key.isascii() or any(c.isspace() for c in key):
        raise Escape(f"{text!r} made the message id {key!r}")


# -- actions ---------------------------------------------------------------------------

_SHIPPED_ACTIONS = sorted((RULES / "actions").glob("*.yaml"))


@st.composite
def action_files(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["mutated", "mutated", "text", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=1500))
    if kind == "text":
        return draw(st.text(max_size=600)).encode("utf-8", "surrogatepass")
    source = draw(st.sampled_from(_SHIPPED_ACTIONS))
    document = yaml.safe_load(source.read_text(encoding="utf-8"))
    return yaml.safe_dump(_mutated(document, draw), allow_unicode=True).encode()


def load_action_file(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "actions" / "fuzzed.yaml"
        path.parent.mkdir()
        path.write_bytes(data)
        try:
            load_actions(path.parent)
        except YamlFileError as error:
            _located(error, path)
        except Exception as error:
            raise Escape(f"loading an action raised {error!r} on {data[:300]!r}") from error


_network_text = st.text(max_size=40) | st.sampled_from(
    ["+8821\r\nX-Evil: 1", "--rm", "-", "\x00", "{entity}", "%0d%0a", "\u202e", "&a=b?c#d"]
)


@st.composite
def alert_fields(draw: st.DrawFn) -> dict[str, Any]:
    return {name: draw(_network_text) for name in ALERT_FIELDS} | {
        "value": draw(st.floats(allow_nan=True) | st.integers() | _network_text)
    }


def render_requests(alert: dict[str, Any]) -> None:
    """Whatever the network put in an alert's fields, a request is rendered (each value
    encoded for its place) or refused with ActionSpecError; a rendered header never
    holds a line break, and a rendered argument never starts an option."""
    values = alert_values(alert, "fuzzed")
    environ = {"VOS3000_API_PASSWORD": "secret", "TOKEN": "t"}
    own = HttpSpec(
        url="http://192.0.2.1/x/{entity}?q={summary}",
        headers={"X-Number": "{entity}"},
        body={"entity": "{entity}", "all": ["{summary}", "{value}"]},
    )
    for action in [*load_actions(RULES / "actions").actions, None]:
        undo = action.undo.http if action is not None and action.undo is not None else None
        sections = [own] if action is None else [action.http, undo]
        for section in sections:
            if section is None:
                continue
            try:
                request = render_http(section, values, environ)
            except ActionSpecError:
                continue
            except Exception as error:
                raise Escape(f"rendering {section.url} raised {error!r} on {alert!r}") from error
            for name, value in request.headers.items():
                if "\r" in value or "\n" in value:
                    raise Escape(f"header {name} holds a line break: {value!r}")
            if any(c in request.url for c in " \r\n\x00"):
                raise Escape(f"the URL holds {request.url!r}")
            if request.body is not None:
                json.loads(request.body)
    command = CommandSpec(argv=["/bin/true", "{entity}", "--x={summary}"])
    try:
        run = render_command(command, values, {})
    except ActionSpecError:
        return
    except Exception as error:
        raise Escape(f"rendering a command raised {error!r} on {alert!r}") from error
    if run.argv[1].startswith("-"):
        raise Escape(f"an argument starts an option: {run.argv!r}")


# -- exception files ---------------------------------------------------------------------

_EXCEPTION = {
    "rule": "short-calls-caller",
    "entity_type": "caller",
    "entity": "8613900000001",
    "reason": "the Acme PBX",
    "expires": "2027-03-05",
    "created_by": "ana",
    "alert_id": "0f2c",
    "verdict": "false_positive",
}


@st.composite
def exception_files(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["mutated", "mutated", "fields", "text", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=800))
    if kind == "text":
        return draw(st.text(max_size=400)).encode("utf-8", "surrogatepass")
    document: dict[str, Any] = dict(_EXCEPTION)
    if kind == "fields":
        # Each key given a value of any kind, or one of the values that look right.
        for key in document:
            if draw(st.booleans()):
                document[key] = draw(
                    _yaml_values
                    | st.sampled_from(
                        ["never", "2027-02-30", "2027-03-05T25:00", "model.caller-behaviour"]
                    )
                )
        if draw(st.booleans()):
            document["model"] = document.pop("rule")
    return yaml.safe_dump(_mutated(document, draw), allow_unicode=True).encode()


_KNOWN: list[tuple[dict[str, str], dict[str, str]]] = []


def _known_detectors() -> tuple[dict[str, str], dict[str, str]]:
    """The shipped rules' and models' entity types by id, read once: what an exception
    file is checked against."""
    if not _KNOWN:
        from engine.detect.rules import load_rules
        from models.catalogue import catalogue, load_model_specs, models_dir

        problems: list[str] = []
        kinds = catalogue(load_model_specs(models_dir(RULES), problems)).kinds
        loaded = load_rules(RULES)
        rules = {rule.id: rule.spec.aggregate.entity_type for rule in loaded.rules.rules}
        _KNOWN.append((rules, dict(kinds)))
    return _KNOWN[0]


def load_exception_file(data: bytes) -> None:
    """An exception file is read and checked against the shipped rules and models with
    every problem at its file:line."""
    from engine.detect.exceptionfiles import check_exceptions, read_exception_files

    rules, models = _known_detectors()
    folder = _scratch("exceptions")
    path = folder / "fuzzed.yaml"
    path.write_bytes(data)
    problems: list[str] = []
    try:
        found = read_exception_files(folder, problems)
        problems += check_exceptions(found, rules, models)[1]
    except Exception as error:
        raise Escape(f"loading an exception raised {error!r} on {data[:300]!r}") from error
    _located(YamlFileError(problems), path)


def write_exception_files(entity: str) -> None:
    """Whatever text the network put in an entity, `alerts except` writes a file inside
    the exceptions folder that reads back as the same one value and no other key."""
    from engine.detect.exceptionfiles import ExceptionSpec, read_exception_files, write_exception

    with tempfile.TemporaryDirectory() as root:
        folder = Path(root) / "exceptions"
        spec = ExceptionSpec.model_validate(
            _EXCEPTION | {"entity": entity, "reason": f"why: {entity}"}
        )
        path = write_exception(folder, spec)
        if path.parent != folder or list(Path(root).iterdir()) != [folder]:
            raise Escape(f"{entity!r} wrote {path}")
        problems: list[str] = []
        read = read_exception_files(folder, problems)
        if problems or [s for s, _ in read] != [spec]:
            raise Escape(f"{entity!r} read back as {read!r}: {problems}")


_entities = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=300) | (
    st.sampled_from(["../x", "a\x00b", "x\nrule: y", "\u202e", '"', "'", "#", ": ", "- a"])
)


# -- the console: its accounts file, its filters, its forms ----------------------------

_ACCOUNT_KEYS = ["role", "password", "sha256", "created_at", "x"]


@st.composite
def accounts_files(draw: st.DrawFn) -> bytes:
    if draw(st.integers(0, 3)) == 0:
        return draw(st.binary(max_size=300))
    entry = draw(
        st.dictionaries(
            st.sampled_from(_ACCOUNT_KEYS),
            st.one_of(
                st.sampled_from(["reviewer", "viewer", "admin", "$argon2id$v=19$x", "ab" * 32]),
                _state_values,
            ),
        )
    )
    name = draw(st.one_of(st.sampled_from(["ana", "a.b@c", ""]), st.text(max_size=8)))
    document: dict[str, Any] = {
        "version": draw(st.sampled_from([1, 2, "1", None])),
        draw(st.sampled_from(["users", "tokens"])): {name: entry},
    }
    if draw(st.booleans()):
        document[draw(st.sampled_from(["users", "tokens", "extra"]))] = draw(_state_values)
    return json.dumps(document).encode()


def load_accounts_file(data: bytes) -> None:
    from engine.console.accounts import Accounts, AccountsFileError

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "accounts.json"
        path.write_bytes(data)
        try:
            accounts = Accounts.load(path)
        except AccountsFileError as error:
            if str(path) not in str(error):
                raise Escape(f"an accounts error without the file: {error}") from error
            return
        except Exception as error:
            raise Escape(f"loading accounts raised {error!r} on {data[:300]!r}") from error
        # What loads can be written back and checked against without an exception.
        accounts.save()
        for account in accounts.users.values():
            accounts.check_password(account.name, "not-it")
        accounts.check_token("cs_not-it")


# Stands for the session's own CSRF token, so the forms get past the token check too.
VALID_CSRF = "<the session's csrf token>"
_FORM_KEYS = [
    "status",
    "severity",
    "rule",
    "entity",
    "assignee",
    "since",
    "until",
    "alert_id",
    "note",
    "action",
    "back",
    "csrf",
    "username",
    "password",
    "next",
    "value",
    "type",
    "limit",
    "decision",
    "sort",
]
_form_values = st.one_of(
    st.sampled_from(
        [
            "",
            "all",
            "fp",
            "critical",
            "2026-12-05",
            "me",
            "review",
            "assign",
            "approve",
            "reject",
            "exposure",
            "severity",
            "time",
            "//x",
            VALID_CSRF,
        ]
    ),
    st.text(max_size=20),
)
console_forms = st.lists(st.tuples(st.sampled_from(_FORM_KEYS), _form_values), max_size=8)


def queue_filter_of(pairs: list[tuple[str, str]]) -> None:
    from starlette.datastructures import QueryParams

    from engine.console.web import BadRequest, queue_filter

    try:
        queue_filter(QueryParams(pairs))
    except BadRequest:
        pass
    except Exception as error:
        raise Escape(f"the queue's filters raised {error!r} on {pairs!r}") from error


_CONSOLE: list[Any] = []


def _console_client() -> Any:
    """One console over an empty lake and one signed-in reviewer, made once."""
    if not _CONSOLE:
        from fastapi.testclient import TestClient

        from engine.console.accounts import Accounts, accounts_path, session_secret
        from engine.console.lakeview import LakeView, RuleBook
        from engine.console.web import Console, create_app
        from engine.lake.parquet import Lake

        data = Path(tempfile.mkdtemp(prefix="callsentry-fuzz-console-"))
        Lake(data).prepare()
        accounts = Accounts.load(accounts_path(data))
        accounts.set_user("ana", "reviewer", "fuzz-password")
        accounts.save()
        from engine.console.tariffs import load_tariffs

        view = LakeView(data)
        view.price_with(load_tariffs(TARIFFS), NumberPlan(default_region="GB"))
        console = Console(data, view, RuleBook.read(RULES))
        client = TestClient(create_app(console, session_secret(data)))
        # Entered once, the client keeps one event loop thread for every request; outside
        # a `with`, each request starts a thread and a loop of its own.
        client.__enter__()
        page = client.get("/login").text
        csrf = re.search(r'name="csrf" value="([^"]+)"', page)
        assert csrf is not None
        client.post(
            "/login",
            data={"username": "ana", "password": "fuzz-password", "csrf": csrf.group(1)},
            follow_redirects=False,
        )
        signed_in = re.search(r'name="csrf" value="([^"]+)"', client.get("/").text)
        assert signed_in is not None
        _CONSOLE.append((client, signed_in.group(1)))
    return _CONSOLE[0]


# Where a form goes: each input is one request, to the page its first draw names (the
# fuzzer's bytes choose the page as they choose the pairs), so a budget of executions
# is that many requests.
_CONSOLE_PAGES = (
    ("GET", "/"),
    ("GET", "/entity"),
    ("GET", "/api/alerts"),
    ("POST", "/act"),
    ("GET", "/actions"),
    ("POST", "/actions/1"),
    ("POST", "/actions/x"),
    ("POST", "/login"),
    ("POST", "/logout"),
    ("POST", "/api/alerts/x/review"),
    ("GET", "/no/such/page"),
)
console_requests = st.tuples(st.sampled_from(_CONSOLE_PAGES), console_forms)


def post_console_forms(request: tuple[tuple[str, str], list[tuple[str, str]]]) -> None:
    (method, path), pairs = request
    client, csrf = _console_client()
    pairs = [(key, csrf if value == VALID_CSRF else value) for key, value in pairs]
    try:
        if method == "GET":
            answer = client.get(path, params=pairs, follow_redirects=False)
        else:
            answer = client.post(
                path,
                content=urlencode(pairs),
                headers={"Content-Type": "application/x-www-form-urlencoded"},
                follow_redirects=False,
            )
    except Exception as error:
        raise Escape(f"{method} {path} raised {error!r} on {pairs!r}") from error
    if answer.status_code >= 500:
        raise Escape(f"{method} {path} answered {answer.status_code} on {pairs!r}")


TARGETS = (
    Target("codec", datagrams, decode_datagram),
    Target("key-reader", datagrams, read_key),
    Target("csv", csv_files, read_csv),
    Target("jsonl", jsonl_files, read_jsonl),
    Target("parquet", parquet_files, read_parquet),
    Target("rule-yaml", rule_files(), load_rule_file),
    Target("rule-behaviour", behaviour_rule_files(), load_and_run_rule_file),
    Target("rule-unusual-share", share_rule_files(), load_and_run_rule_file),
    Target("rule-concurrent", concurrent_rule_files(), load_and_run_rule_file),
    Target("rule-paced", paced_rule_files(), load_and_run_rule_file),
    Target("list-yaml", list_files(), load_list_file),
    Target("scenario-yaml", scenario_files(), load_scenario_file),
    Target("model-yaml", model_files(), load_model_file),
    Target("tariff-yaml", tariff_files(), load_tariff_file),
    Target("settings", settings_files(), load_settings_file),
    Target("notify-channel", notify_channel_files(), load_settings_file),
    Target("numbers", numbers(), parse_numbers),
    Target("relay-answer", _answers, read_answer),
    Target("nats-names", _answers, nats_names),
    Target("relay-state", relay_states(), load_relay_state),
    Target("detection-snapshot", snapshot_files(), restore_snapshot_file),
    Target("action-yaml", action_files(), load_action_file),
    Target("exception-yaml", exception_files(), load_exception_file),
    Target("exception-entity", _entities, write_exception_files),
    Target("action-request", alert_fields(), render_requests),
    Target("console-accounts", accounts_files(), load_accounts_file),
    Target("console-filters", console_forms, queue_filter_of),
    Target("console-forms", console_requests, post_console_forms),
)
