"""The ``corral`` command: ``demo``, ``status``, ``down``, ``bench``, ``serve``.

``corral demo`` runs a few concurrent RL-style episodes on the embedded
default (a local Ray cluster, the process driver) and prints them as a table;
``corral status`` shows pools, sessions and containers; ``corral down``
releases everything corral started in a namespace and says what it removed;
``corral serve`` runs the gateway (docs/remote.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Callable, Optional

__all__ = ["main", "run_command"]


def run_command(prog: str, command: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """``command(args)``'s exit code; 2 when it raises a corral error (said on stderr, no trace)."""
    from corral.errors import CorralError

    try:
        return command(args)
    except CorralError as e:
        print(f"{prog}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


def _config(args) -> "object":
    from corral.models import SandboxManagerEnvConfig

    kw = {}
    if getattr(args, "config", None):
        with open(args.config) as f:
            kw = json.load(f)
    kw.setdefault("namespace", args.namespace)
    if getattr(args, "driver", None):
        kw["container_deployment"] = args.driver
    cfg = SandboxManagerEnvConfig.model_validate(kw)
    if getattr(args, "reuse", False):
        t = cfg.sandbox_type(None)
        cfg.sandbox_types[t.name] = t.model_copy(update={"reuse": True})
    return cfg


def _table(rows: list[dict], cols: list[str]) -> str:
    from tabulate import tabulate

    return tabulate([[r.get(c, "") for c in cols] for r in rows], headers=cols, tablefmt="simple")


async def _episode(m, i: int, calls: int) -> dict:
    t0 = time.perf_counter()
    row = {"episode": i}
    try:
        async with await m.acquire_async() as sb:
            row["acquire_ms"] = round((time.perf_counter() - t0) * 1000, 1)
            row["sandbox"] = sb.name[-8:]
            t1 = time.perf_counter()
            for k in range(calls):
                if k % 2 == 0:
                    r = await sb.shell(f"echo step-{k} && python3 -c 'print(sum(range({i + k})))'")
                    row["last_shell"] = r.stdout.split()[-1] if r.ok else f"exit {r.exit_code}"
                else:
                    r = await sb.python(f"acc = globals().get('acc', 0) + {k}\nacc")
                    row["python_state"] = r.text
            row["tools_ms_avg"] = round((time.perf_counter() - t1) * 1000 / max(calls, 1), 1)
        row["ok"] = "yes"
    except Exception as e:  # the demo reports every episode, failed ones included
        row["ok"] = f"{type(e).__name__}: {e}"[:60]
    return row


def cmd_demo(args) -> int:
    from corral.manager import SandboxManager, down

    cfg = _config(args)
    cfg = cfg.model_copy(update={"pool_size": args.episodes})
    print(f"starting corral (namespace {cfg.namespace!r}, driver {cfg.container_deployment!r}) ...", flush=True)
    t0 = time.perf_counter()
    m = SandboxManager(cfg)
    print(f"  actors up in {time.perf_counter() - t0:.1f}s; warming {args.episodes} sandboxes ...", flush=True)
    t1 = time.perf_counter()
    m.reserve(n=0, wait=True, timeout=300)
    print(f"  pool warm in {time.perf_counter() - t1:.1f}s; running {args.episodes} episodes x {args.calls} tool calls",
          flush=True)

    async def run():
        return await asyncio.gather(*(_episode(m, i, args.calls) for i in range(args.episodes)))

    rows = asyncio.run(run())
    print()
    print(_table(rows, ["episode", "sandbox", "acquire_ms", "tools_ms_avg", "last_shell", "python_state", "ok"]))
    st = m.status()
    print(f"\nrecords by state: {st['counts']}")
    if not args.keep:
        out = down(m.config)
        print(f"cleaned up: released {len(out['released'])} sandboxes, stopped {out['actors']} actors")
    return 0 if all(r.get("ok") == "yes" for r in rows) else 1


def cmd_status(args) -> int:
    """Show a running namespace; starts nothing and changes nothing."""
    from corral.manager._sync.ops import Ops
    from corral.manager.cluster import connect

    ops = Ops(connect(_config(args), join_only=True, quiet=True))
    try:
        st = ops.status()
    finally:
        ops.close()
    if args.json:
        print(json.dumps(st, indent=2, default=str))
        return 0
    clocks = "session slots" if st.get("session_mode") == "hosted" else "session actors"
    print(f"namespace {st['namespace']}: {st['active']} active (limit {st['limit'] or 'none'}), "
          f"{len(st['sessions'])} sessions, {st['session_actors']} {clocks} "
          f"(+{st['spare_session_actors']} spare), {st['starts_in_flight']} starts in flight, "
          f"{st['waiting_for_slot']} waiting for a slot; session mode {st.get('session_mode', 'actor')}")
    if st.get("session_hosts"):
        print("\nsession hosts:")
        print(_table([{**h, "node": (h.get("node") or "")[:12]} for h in st["session_hosts"]],
                     ["name", "node", "slots", "bound", "spare", "reaping", "pid"]))
    print("\npools:")
    print(_table(list(st["pools"].values()), ["sandbox_type", "target", "warm", "starting", "resetting", "running",
                                              "waiting", "started_total", "failed_total"]))
    print("\nnodes:")
    print(_table([{"node": n[:12], **v, **v.get("states", {})} for n, v in st["nodes"].items()],
                 ["node", "address", "capacity", "start_limit", "active", "starting", "WARM", "RUNNING"]))
    recs = [r for r in st["records"] if r["state"] not in ("RELEASED", "REPLACED")]
    print(f"\nsandboxes ({len(recs)} not released):")
    for r in recs:
        r["idle_s"] = round(time.time() - r["last_active_at"], 1) if r.get("last_active_at") else ""
        r["node"] = (r.get("node_id") or "")[:12]
    print(_table(recs, ["container_name", "sandbox_type", "state", "session_ctx_id", "node", "url", "idle_s"]))
    return 0


def cmd_down(args) -> int:
    from corral.manager import down

    out = down(_config(args))
    print(f"released {len(out['released'])} sandboxes" + (":" if out["released"] else ""))
    for n in out["released"]:
        print(f"  {n}")
    print(f"stopped {out['actors']} actors; removed {out['swept']} containers left on this machine; "
          f"containers left: {out['containers_left']}")
    return 0 if out["containers_left"] == 0 else 1


def cmd_bench(args) -> int:
    from corral.bench.rollout import run_cli

    return run_cli(args)


def cmd_serve(args) -> int:
    from corral.gateway.cli import run

    return run(args)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="corral", description="Sandboxes for AI agents and RL training, on Ray.")
    p.add_argument("--namespace", default="corral", help="Ray namespace of corral's actors (default: corral)")
    p.add_argument("--config", help="JSON file with a SandboxManagerEnvConfig")
    p.add_argument("--driver", choices=["process", "docker"], help="container_deployment (default: from config)")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="run a few concurrent episodes and print them as a table")
    d.add_argument("--episodes", type=int, default=4)
    d.add_argument("--calls", type=int, default=4)
    d.add_argument("--reuse", action="store_true", help="reset and reuse sandboxes on release")
    d.add_argument("--keep", action="store_true", help="leave the actors and pool running")
    s = sub.add_parser("status", help="pools, sessions and containers")
    s.add_argument("--json", action="store_true")
    sub.add_parser("down", help="release everything corral started in the namespace")
    from corral.bench.rollout import add_arguments as bench_arguments

    bench_arguments(sub.add_parser("bench", help="RL-shaped benchmark: corral vs destroy-on-release, no pool, "
                                                  "direct HTTP (writes DIR/bench.json and DIR/bench.png)"))
    from corral.gateway.cli import add_arguments as serve_arguments

    serve_arguments(sub.add_parser("serve", allow_abbrev=False,  # `--token X` must not pass for --token-file
                                   help="the gateway: corral over HTTP for clients outside the Ray cluster "
                                        "(a Ray actor per node, or --standalone)"))
    sub.add_parser("chaos", help="break corral on purpose and count what it survives (corral chaos --help)",
                   add_help=False)
    args, rest = p.parse_known_args(argv)
    if args.cmd == "chaos":  # its own parser: `corral chaos --driver docker --only ...`
        from corral.chaos import main as chaos_main

        return chaos_main(rest)
    if rest:
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    command = {"demo": cmd_demo, "status": cmd_status, "down": cmd_down, "bench": cmd_bench,
               "serve": cmd_serve}[args.cmd]
    return run_command("corral", command, args)


if __name__ == "__main__":
    sys.exit(main())
