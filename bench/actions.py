"""Actions: what deciding and doing them costs, against the outbox's plain alert
delivery measured in the same run (figures in bench/README.md, "Actions").

- decide: the lake writer's ActionSink deciding one auto action for each of N alerts
  (one request, one trail row and one delivery each, one transaction) against the
  OutboxSink queueing the same alerts for one webhook (one delivery each);
- do: a courier doing N queued dry-run blocks (each step read, done and written in
  the trail) against a courier handing N deliveries to a destination that does
  nothing;
- idle: the CPU the three idle action couriers take in serve's receiver process over
  a few seconds of wall time.

    .venv/bin/python bench/actions.py [--alerts 2000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.alerts.actionbook import DESTINATIONS, ActionBook
from engine.alerts.actions import ActionSink, action_destinations
from engine.alerts.actionspec import ActionSet, ActionSpec
from engine.alerts.couriers import Courier, Dispatch, RetryPolicy
from engine.alerts.outbox import Outbox, OutboxSink
from engine.detect.alerts import Alert

POLICY = RetryPolicy(give_up_after_s=86_400, first_backoff_s=0.05, max_backoff_s=0.2)


def alerts(count: int) -> list[Alert]:
    return [
        Alert(f"alert-{n:06d}", "risky-destination-forward", "rule", "critical", "forward",
              f"+88213{n:07d}", 0.0, 1.0, 1.0 + n, 1.0, 1.0, f"risky {n}", [f"c{n}"], "v1")
        for n in range(count)
    ]  # fmt: skip


BLOCK = ActionSpec.model_validate(
    {"id": "block", "match": {}, "kind": "block", "dry_run": True, "budget": {"per_hour": 10**5}}
)


class Nothing:
    name = "webhook"  # takes the webhook's deliveries

    def send(self, key: str, payload: bytes) -> None:
        pass


def drain(courier: Courier, outbox: Outbox, name: str) -> float:
    started = time.perf_counter()
    while outbox.counts().get(name) and outbox.counts()[name].pending:
        courier.work()
    return time.perf_counter() - started


def one_round(count: int) -> dict[str, float]:
    made = alerts(count)
    with tempfile.TemporaryDirectory() as folder:
        base = Path(folder)
        outbox = Outbox.of(base / "plain")
        started = time.perf_counter()
        OutboxSink(outbox, ["webhook"]).deliver(made)
        enqueue_s = time.perf_counter() - started
        nothing_s = drain(Courier(outbox, Nothing(), POLICY), outbox, "webhook")
        outbox.close()

        book = ActionBook(Outbox.of(base / "acting"))
        sink = ActionSink(lambda: book, ActionSet((BLOCK,)))
        started = time.perf_counter()
        sink.deliver(made)
        decide_s = time.perf_counter() - started
        destination = next(d for d in action_destinations(book) if d.kind == "block")
        do_s = drain(Courier(book.outbox, destination, POLICY), book.outbox, DESTINATIONS["block"])
        book.close()

        idle = ActionBook(Outbox.of(base / "idle"))
        dispatch = Dispatch(idle.outbox, action_destinations(idle), RetryPolicy())
        cpu = time.process_time()
        dispatch.start()
        threading.Event().wait(3.0)  # wall time the idle couriers poll through
        dispatch.stop()
        idle_cpu_s = (time.process_time() - cpu) / 3.0
        idle.close()
    return {
        "enqueue_s": enqueue_s,
        "decide_s": decide_s,
        "nothing_s": nothing_s,
        "do_s": do_s,
        "idle_cpu_per_s": idle_cpu_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--alerts", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rounds = [one_round(args.alerts) for _ in range(args.rounds)]

    def median(name: str) -> float:
        return statistics.median(r[name] for r in rounds)

    n = args.alerts
    print(f"{n} alerts, median of {args.rounds} rounds")
    print(
        f"queue for one webhook (OutboxSink)   {median('enqueue_s') * 1000:8.1f} ms  "
        f"{n / median('enqueue_s'):9.0f} alerts/s"
    )
    print(
        f"decide one auto action (ActionSink)  {median('decide_s') * 1000:8.1f} ms  "
        f"{n / median('decide_s'):9.0f} alerts/s  "
        f"({median('decide_s') / median('enqueue_s'):.1f}x the webhook's)"
    )
    print(
        f"courier, a destination doing nothing {median('nothing_s') * 1000:8.1f} ms  "
        f"{n / median('nothing_s'):9.0f} deliveries/s"
    )
    print(
        f"courier, dry-run blocks              {median('do_s') * 1000:8.1f} ms  "
        f"{n / median('do_s'):9.0f} actions/s  "
        f"({median('do_s') / median('nothing_s'):.1f}x doing nothing)"
    )
    print(
        f"three idle action couriers           {median('idle_cpu_per_s') * 1000:8.2f} ms CPU "
        "per second of wall time"
    )


if __name__ == "__main__":
    main()
