"""`moemesh trace REQUEST_ID [--url http://HOST:PORT]`: a request's waterfall in the terminal, from the gateway's
trace view (`GET /traces/{request_id}?format=json`); `moemesh trace --list` lists the recent requests. Needs
only the standard library (works on the SDK-only install)."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import urllib.error
import urllib.parse
import urllib.request

from moemesh.telemetry import waterfall


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("trace", help="print a request's trace (a waterfall of its spans) from a gateway",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    p.add_argument(
        "request_id", nargs="?", default="", help="the request id (the SDK gives it as chunk.request_id)"
    )
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the gateway's HTTP address")
    p.add_argument("--list", action="store_true", help="list the recent requests instead, newest first")
    p.add_argument("--json", action="store_true", help="print the trace's JSON instead of the waterfall")
    p.add_argument("--timeout", type=float, default=10.0, metavar="S", help="seconds to wait for the gateway")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not args.list and not args.request_id:
        print("error: give a REQUEST_ID, or --list", file=sys.stderr)
        return 2
    base = args.url.rstrip("/")
    if not base.startswith(("http://", "https://")):
        print(f"error: --url={args.url!r} must start with http:// or https://", file=sys.stderr)
        return 2
    path = "/traces" if args.list else f"/traces/{urllib.parse.quote(args.request_id, safe='')}"
    try:
        with urllib.request.urlopen(f"{base}{path}?format=json", timeout=args.timeout) as reply:
            body = json.load(reply)
    except urllib.error.HTTPError as err:
        detail = err.read().decode(errors="replace")
        with contextlib.suppress(ValueError, KeyError, TypeError):
            detail = json.loads(detail)["error"]["message"]
        print(f"error: {base}{path}: HTTP {err.code}: {detail}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as err:
        print(f"error: cannot reach the gateway at {base}: {getattr(err, 'reason', err)}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(body, indent=2))
    elif args.list:
        for s in body["traces"]:
            print(f"{s['request_id']:<24} TTFT {_ms(s['ttft_ms']):>10}  total {_ms(s['total_ms']):>10}  "
                  f"{s['completion_tokens']:>5} tokens  {s['error'] or s['finish_reason']}")  # fmt: skip
    else:
        print(waterfall.text(body))
    return 0


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"
